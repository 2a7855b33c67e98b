"""Shared fixtures. No __init__.py in tests/: torch-fidelity's wheel installs a top-level
`tests` package that would shadow ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from enat.cluster.services import S3Endpoint, SeaweedFS

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
def s3_keys_in_env(seaweedfs, monkeypatch) -> S3Endpoint:
    """The fixture server's keys exported as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, as a
    user might: what Ray would copy into its logs unless enat moves them first."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)  # wins over any file
    return seaweedfs


def _ray_sessions() -> set[Path]:
    import os
    import tempfile

    return set((Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray").glob("session_*"))


@pytest.fixture
def secret_nowhere():
    """A check: the secret's bytes are in no file of the Ray sessions started during the
    test (their logs), of the given folders (MLflow stores, outputs) and in no object
    under `bucket`."""
    from enat.pipelines import storage

    before = _ray_sessions()

    def check(secret: str, *folders: Path, bucket: str | None = None) -> None:
        needle, hits = secret.encode(), []
        for folder in (*sorted(_ray_sessions() - before), *folders):
            for path in Path(folder).rglob("*"):
                if path.is_file() and not path.is_symlink():
                    try:
                        if needle in path.read_bytes():
                            hits.append(str(path))
                    except OSError:  # a socket or a file removed while scanning
                        continue
        if bucket:
            fs, root = storage.filesystem(bucket)
            hits += [key for key in fs.find(root) if needle in fs.cat_file(key)]
        assert not hits, f"the secret is in {hits[:5]}"

    return check


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh bucket on the fixture server, as an s3:// URL."""
    import uuid

    from enat.pipelines import storage

    url = f"s3://test-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(url)
    return url



@pytest.fixture(scope="session")
def small_extractor(tmp_path_factory) -> str:
    """`enat eval train-features` on 200 demo images, one epoch: a real registered domain
    extractor, quick to train (its accuracy does not matter to the tests using it)."""
    from enat.cluster.cli import main
    from enat.pipelines.config import DemoDataConfig
    from enat.pipelines.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("features")
    make_demo_data(DemoDataConfig(out=str(root / "data"), limit=200))
    out = str(root / "extractor")
    assert main(["eval", "train-features", "--data", str(root / "data" / "imagenet"), "--out", out,
                 "epochs=1", "width=8", "holdout=0.2"]) == 0
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The tiny VQGAN with seed-0 weights, exported as `enat tokenizer train` would."""
    import torch
    import yaml

    from enat.models import build_config, build_model
    from enat.pipelines.model_io import save_model

    preset = REPO_ROOT / "configs" / "models" / "tiny-tokenizer.yaml"
    config = build_config(yaml.safe_load(preset.read_text()))
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    save_model(folder, build_model(config), config)
    return folder


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo data sets' two layouts with 6 emoji from each of the 10 categories."""
    import collections

    from enat.pipelines.demo_data import list_emoji, write_cc3m_tars, write_imagenet_tree

    by_category = collections.defaultdict(list)
    for emoji in list_emoji():
        by_category[emoji.category].append(emoji)
    chosen = [emoji for category in sorted(by_category) for emoji in by_category[category][:6]]
    root = tmp_path_factory.mktemp("demo")
    write_imagenet_tree(chosen, root / "imagenet")
    write_cc3m_tars(chosen, root / "cc3m", shard_size=25, seed=0)
    return root
