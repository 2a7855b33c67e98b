"""`enat submit` / `enat jobs` against a real local Ray head with its dashboard: a tiny
pretokenize job (whose driver connects to the cluster and runs Ray tasks there) is
submitted, polled to success and its logs fetched."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from enat.cluster.services import free_port, pid_alive
from enat.cluster.submit_cmd import checkout_package, entrypoint, job_environment
from enat.models import VQGANConfig, build_model
from enat.models.typed_config import ConfigError
from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import make_demo_data
from enat.pipelines.model_io import save_model

BIN = Path(sys.executable).parent


def presenting(token: Path, url: str) -> urllib.request.Request:
    """A request to the Ray dashboard carrying the token in `token` (Ray's bearer header)."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token.read_text()}"})


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` with token authentication, as the cluster manifests start
    it, in its own process group, stopped by that group's PID. Yields (dashboard URL, the
    environment that presents the token, the head's temp dir with its session logs)."""
    temp = tmp_path_factory.mktemp("ray")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    dashboard = free_port()
    env = {**os.environ, **with_token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", "--num-cpus=1", f"--temp-dir={temp}",
               "--include-dashboard=true", "--disable-usage-stats",
               # Every port free-chosen: other Ray instances may run on this machine.
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}"]
    head = subprocess.Popen(command, env=env, stdout=open(temp / "head.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    request = presenting(token, f"{address}/api/version")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2):
                break
        except OSError:
            assert head.poll() is None, (temp / "head.log").read_text()[-2000:]
            time.sleep(1)
    else:
        pytest.fail("the Ray head's dashboard did not come up")
    yield address, with_token, temp
    # `ray start --block` leaves its group on SIGTERM slowly or not at all: give it a
    # moment, then kill what remains of the group it leads.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    assert not pid_alive(head.pid)


def enat(*args, env=None):
    """`enat …` in a subprocess; `env` adds variables to this process's (None removes one)."""
    merged = {**os.environ, **(env or {})}
    env = {name: value for name, value in merged.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "enat.cluster.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_entrypoint_and_environment_never_carry_secrets(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "ENAT_STATE_DIR",
                 "RAY_AUTH_MODE"):  # settings other tests may have left in this process
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3CRET")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("AWS_PROFILE", "team")
    command = ["--", "enat", "data", "demo", "limit=3"]
    assert entrypoint(command, working_dir=False) == "enat data demo limit=3"
    assert entrypoint(["train", "x=1"], working_dir=True) == "python -m enat.cluster.cli train x=1"
    assert job_environment(False) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    # Forwarding credentials forwards where they are, never keys; without a file, it refuses.
    with pytest.raises(ConfigError, match="never keys"):
        job_environment(True)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/shared/aws-credentials")
    assert job_environment(True) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_PROFILE": "team",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/shared/aws-credentials"}


def test_checkout_ships_as_the_enat_package(tmp_path):
    package = checkout_package(tmp_path)
    assert (package / "configs" / "train" / "tiny-enat-demo.yaml").exists()
    assert not list(package.rglob("__pycache__"))
    # Without site-packages (so without the editable install), the shipped copy is what imports.
    probe = "import enat.cluster.command as c; print(c.__file__)"
    found = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                           env={"PYTHONPATH": str(tmp_path)}, check=True)
    assert Path(found.stdout.strip()) == package / "cluster" / "command.py"


@pytest.mark.integration
@pytest.mark.slow
def test_submit_poll_logs_and_list(ray_head, tmp_path, secret_nowhere):
    ray_head, with_token, head_files = ray_head
    make_demo_data(DemoDataConfig(out=str(tmp_path / "data"), limit=12, cc3m_shard_size=5), progress=False)
    tokenizer = VQGANConfig(codebook_size=32, code_dim=8, base_channels=32, channel_mult=(1, 1, 1),
                            image_size=32)
    save_model(str(tmp_path / "tokenizer"), build_model(tokenizer), tokenizer)
    out = tmp_path / "tokens"
    secret = "NEVER-IN-LOGS-123"
    # Endpoint settings travel in the job's runtime env; the job's own `ray.init` must not
    # name them again (Ray refuses two envs that set the same variable).
    settings = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **with_token}
    command = ["--", "enat", "pretokenize", f"source=imagenet:{tmp_path / 'data' / 'imagenet'}", f"out={out}",
               f"tokenizer={tmp_path / 'tokenizer'}", "shard_size=5", "track=false"]
    # Without the cluster's token, or with another one, nothing is submitted: one line, exit 2.
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    for refused_env in ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": None},
                        {**with_token, "RAY_AUTH_TOKEN_PATH": str(wrong)}):
        refused = enat("submit", "--address", ray_head, *command, env={**settings, **refused_env})
        assert refused.returncode == 2, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("enat: error: the Ray cluster refused") and "Traceback" not in refused.stderr
    assert enat("jobs", "list", "--address", ray_head,
                env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": None}).returncode == 2

    submitted = enat("submit", "--address", ray_head, *command, env=settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")

    waited = enat("jobs", "wait", "--address", ray_head, job_id, "--timeout", "300", env=with_token)
    logs = enat("jobs", "logs", "--address", ray_head, job_id, env=with_token).stdout
    assert waited.returncode == 0, logs[-3000:]
    assert enat("jobs", "status", "--address", ray_head, job_id, env=with_token).stdout.strip() == "SUCCEEDED"
    assert "ray: cluster" in logs and secret not in logs
    token = Path(with_token["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert token not in logs and token not in json.dumps(job_info(ray_head, with_token, job_id))
    secret_nowhere(secret, head_files, out)  # the head's session logs, the job's outputs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 12 and len(manifest["splits"]["train"]) == 3
    listed = enat("jobs", "list", "--address", ray_head, env=with_token).stdout
    assert job_id in listed and "SUCCEEDED" in listed
    failing = enat("submit", "--address", ray_head, "--working-dir", "--wait", "--",
                   "data", "demo", "bogus=1", env=with_token)
    assert failing.returncode == 1 and "unknown key 'bogus'" in failing.stdout


def job_info(address: str, with_token: dict[str, str], job_id: str) -> dict:
    """The job as the cluster records it (its runtime env included), read with the token."""
    request = presenting(Path(with_token["RAY_AUTH_TOKEN_PATH"]), f"{address}/api/jobs/{job_id}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
