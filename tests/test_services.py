"""`enat services` against real processes in a temp state dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from enat.cluster.services import pid_alive


def enat(state, *args):
    return subprocess.run([sys.executable, "-m", "enat.cluster.cli", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.integration
def test_up_is_idempotent_status_tells_the_truth_and_down_stops(tmp_path):
    state = tmp_path / "state"
    assert enat(state, "services", "status").returncode == 3
    try:
        first = enat(state, "services", "up")
        assert first.returncode == 0, first.stderr
        assert state.stat().st_mode & 0o777 == 0o700
        pid = json.loads((state / "seaweedfs.json").read_text())["pid"]
        second = enat(state, "services", "up")
        assert second.returncode == 0
        assert json.loads((state / "seaweedfs.json").read_text())["pid"] == pid
        assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]  # same endpoint
        assert pid_alive(pid)

        status = enat(state, "services", "status")
        assert status.returncode == 0 and "running at http://127.0.0.1:" in status.stdout
        assert oct(os.stat(state / "credentials.json").st_mode & 0o777) == "0o600"
        # Only the S3 port checks keys; master, volume, filer and admin take none: every
        # port the server listens on is on loopback.
        listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 5 and all(address.ip == "127.0.0.1" for address in listening)

        env = enat(state, "services", "env").stdout.splitlines()
        keys = [line.split("=")[0] for line in env]
        # Where the credentials are, never what they are; keys of another store are unset.
        assert keys == ["unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN",
                        "export AWS_ENDPOINT_URL", "export AWS_SHARED_CREDENTIALS_FILE",
                        "export AWS_PROFILE", "export MLFLOW_TRACKING_URI"]
        secret = json.loads((state / "credentials.json").read_text())["secret_key"]
        assert secret not in "\n".join(env)
        assert oct(os.stat(state / "aws-credentials").st_mode & 0o777) == "0o600"
        assert secret in (state / "aws-credentials").read_text()
    finally:
        assert enat(state, "services", "down").returncode == 0
    assert not pid_alive(pid)
    status = enat(state, "services", "status")
    assert status.returncode == 3 and "seaweedfs: stopped" in status.stdout
    assert enat(state, "services", "env").returncode == 3


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_server_starts_with_artifacts_in_seaweedfs(tmp_path):
    state = tmp_path / "state"
    try:
        result = enat(state, "services", "up", "--mlflow")
        assert result.returncode == 0, result.stderr
        uri = [line for line in enat(state, "services", "env").stdout.splitlines()
               if "MLFLOW_TRACKING_URI" in line][0].split("=", 1)[1]
        assert uri.startswith("http://127.0.0.1:")
        import urllib.request

        with urllib.request.urlopen(uri + "/health", timeout=5) as response:
            assert response.status == 200
        # An artifact logged through the server lands in SeaweedFS (the server writes it with boto3).
        probe = (
            "import sys\n"
            "from mlflow.tracking import MlflowClient\n"
            "client = MlflowClient(sys.argv[1])\n"
            "run = client.create_run(client.create_experiment('artifacts')).info.run_id\n"
            "client.log_text(run, 'kept in seaweedfs', 'probe.txt')\n"
            "from enat.pipelines import storage\n"
            "fs, root = storage.filesystem('s3://enat/mlflow')\n"
            "print([key for key in fs.find(root) if key.endswith('/probe.txt')])\n")
        settings = dict(line.removeprefix("export ").split("=", 1)
                        for line in enat(state, "services", "env").stdout.splitlines() if "=" in line)
        env = {**os.environ, **{name: value.strip("'\"") for name, value in settings.items()}}
        logged = subprocess.run([sys.executable, "-c", probe, uri], capture_output=True, text=True,
                                timeout=120, env=env)
        assert logged.returncode == 0, logged.stderr[-2000:]
        assert "/probe.txt" in logged.stdout
    finally:
        enat(state, "services", "down")
    assert "mlflow: no server" in enat(state, "services", "status").stdout
