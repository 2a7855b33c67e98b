"""Shared fixtures. No __init__.py in tests/: torch-fidelity's wheel installs a top-level
`tests` package that would shadow ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.services import S3Endpoint, SeaweedFS

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> S3Endpoint:
    """A real SeaweedFS S3 server on free ports in a temp dir, stopped after the session."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch) -> S3Endpoint:
    """The process environment pointed at the fixture server (restored after the test)."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    return seaweedfs


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh bucket on the fixture server, as an s3:// URL."""
    import uuid

    from pipelines import storage

    url = f"s3://test-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(url)
    return url

