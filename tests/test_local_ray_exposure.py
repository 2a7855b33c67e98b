"""What the private local Ray of an enat command exposes: `enat pretokenize` run as a user
would, with storage keys exported in the shell, starts its own Ray (cluster.ray_session).
Afterwards no file of that Ray session, no object in the bucket and nothing in the MLflow
store holds the secret; while it runs, every socket its Ray listens on is on loopback.

The job runs as `enat pretokenize` in a subprocess, as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from enat.models import VQGANConfig, build_model
from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import make_demo_data
from enat.pipelines.model_io import save_model

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: IPv4 loopback on an IPv6 socket


def listening_addresses(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening inet socket of `root`'s descendants."""
    found = set()
    for process in root.children(recursive=True):
        try:
            name = process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((name, connection.laddr.ip, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that ended while we looked
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_pretokenize_with_keys_in_the_shell_exposes_nothing(s3_bucket, s3_keys_in_env, tmp_path,
                                                            secret_nowhere):
    make_demo_data(DemoDataConfig(out=str(tmp_path / "data"), limit=20, cc3m_shard_size=10), progress=False)
    tokenizer = VQGANConfig(codebook_size=32, code_dim=8, base_channels=32, channel_mult=(1, 1, 1),
                            image_size=32)
    save_model(str(tmp_path / "tokenizer"), build_model(tokenizer), tokenizer)
    # The shell of a user with keys exported; nothing Ray-related set by other tests.
    elsewhere = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")  # credentials as a location
    user_shell = {name: value for name, value in os.environ.items()
                  if not name.startswith("RAY_") and name not in elsewhere}
    user_shell["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # Sample the sockets of the job's process tree (Ray's GCS, raylet, agents, workers) while
    # it runs.
    seen: set[tuple[str, str, int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listening_addresses(psutil.Process()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job = subprocess.run([sys.executable, "-m", "enat.cluster.cli", "pretokenize",
                              "--source", f"imagenet:{tmp_path / 'data' / 'imagenet'}",
                              "--out", f"{s3_bucket}/tokens", "--tokenizer", str(tmp_path / "tokenizer"),
                              "shard_size=8", "workers=2"],
                             capture_output=True, text=True, timeout=600, env=user_shell)
    finally:
        done.set()
        watcher.join()
    assert job.returncode == 0, job.stderr[-3000:] + job.stdout[-2000:]
    assert "written 20" in job.stdout

    assert {name for name, _, _ in seen} >= {"gcs_server", "raylet"}, seen
    exposed = sorted((name, address, port) for name, address, port in seen if address not in LOOPBACK)
    assert not exposed, f"the local Ray listens beyond loopback: {exposed}"
    secret_nowhere(s3_keys_in_env.secret_key, tmp_path, bucket=s3_bucket)
