"""Embedded services for a machine with no cloud: SeaweedFS as the S3 server, MLflow.

State lives in one folder (default `.enat/`): the SeaweedFS data, generated credentials
(mode 0600), `services.json` with the PIDs and ports of what runs, logs, and the MLflow
SQLite store. Servers bind 127.0.0.1 on free ports and are stopped by PID only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from enat.cluster.ray_session import KEY_VARIABLES

DEFAULT_STATE_DIR = ".enat"
DEFAULT_BUCKET = "enat"


class ServiceError(RuntimeError):
    pass


PROFILE = "enat-local"  # the profile of the embedded server in its credentials file


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    credentials_file: str  # an AWS shared-credentials file (mode 0600) holding PROFILE

    def env(self) -> dict[str, str]:
        """Where the credentials are, never what they are: Ray copies its driver's
        AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to every Tune trial (and its runtime-env
        agent logs them); a file path it may copy. botocore reads the file in each process."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_SHARED_CREDENTIALS_FILE": self.credentials_file,
            "AWS_PROFILE": PROFILE,
        }


def free_port(with_grpc_twin: bool = False) -> int:
    """A free TCP port on 127.0.0.1; SeaweedFS also binds port+10000 for gRPC."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not with_grpc_twin:
            return port
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise ServiceError("could not find a free port")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def stop_pid(pid: int, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; `group` signals the whole process
    group the PID leads (servers started in their own session fork workers into it)."""
    if not pid_alive(pid):
        return
    send = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        send(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        send(pid, signal.SIGKILL)


def _executable(name: str) -> str:
    """An executable from this environment's bin folder first (where wheels put them)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"'{name}' not found: install enat's dependencies (make install)")
    return found


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


class SeaweedFS:
    """One `weed mini` server (S3 API) with its data and credentials under `state_dir`."""

    PORTS = ("s3_port", "master_port", "volume_port", "filer_port", "admin_port")

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir).resolve()
        self.credentials_path = self.state_dir / "credentials.json"
        self.aws_credentials_path = self.state_dir / "aws-credentials"
        self.info_path = self.state_dir / "seaweedfs.json"

    def credentials(self) -> tuple[str, str]:
        """Generated once, then reused: (access key, secret key)."""
        if not self.credentials_path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            creds = {"access_key": "enat" + secrets.token_hex(6), "secret_key": secrets.token_hex(20)}
            _write_private(self.credentials_path, json.dumps(creds))
        creds = json.loads(self.credentials_path.read_text())
        if not self.aws_credentials_path.exists():
            _write_private(self.aws_credentials_path,
                           f"[{PROFILE}]\naws_access_key_id = {creds['access_key']}\n"
                           f"aws_secret_access_key = {creds['secret_key']}\n")
        return creds["access_key"], creds["secret_key"]

    def info(self) -> dict | None:
        return json.loads(self.info_path.read_text()) if self.info_path.exists() else None

    def endpoint(self) -> S3Endpoint | None:
        info = self.info()
        if not info:
            return None
        access, secret = self.credentials()
        return S3Endpoint(f"http://127.0.0.1:{info['s3_port']}", access, secret,
                          str(self.aws_credentials_path))

    def healthy(self) -> bool:
        info = self.info()
        if not info or not pid_alive(info["pid"]):
            return False
        # The S3 API answers an anonymous GET / with 403 once it serves.
        return _http_status(f"http://127.0.0.1:{info['s3_port']}/") in (200, 403)

    def start(self, timeout: float = 60.0) -> S3Endpoint:
        """Start the server unless it already runs; returns its endpoint."""
        if self.healthy():
            return self.endpoint()
        self.stop()
        return self._launch({name: free_port(with_grpc_twin=True) for name in self.PORTS}, timeout)

    @contextlib.contextmanager
    def stopped(self, timeout: float = 60.0) -> Iterator[None]:
        """The running server stopped for the block, then started again on the same ports with
        the same data: an outage after which clients find it at the same endpoint."""
        info = self.info()
        if not info:
            raise ServiceError(f"SeaweedFS is not running (no {self.info_path})")
        self.stop()
        try:
            yield
        finally:
            self._launch({name: info[name] for name in self.PORTS}, timeout)

    def _launch(self, ports: dict[str, int], timeout: float) -> S3Endpoint:
        access, secret = self.credentials()
        identity = {"name": "enat", "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        s3_config = self.state_dir / "s3.json"
        _write_private(s3_config, json.dumps({"identities": [identity]}))
        data_dir = self.state_dir / "seaweedfs"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            _executable("weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.port={ports['s3_port']}", f"-s3.config={s3_config}",
            f"-master.port={ports['master_port']}", f"-volume.port={ports['volume_port']}",
            f"-filer.port={ports['filer_port']}", f"-admin.port={ports['admin_port']}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        log = open(self.state_dir / "seaweedfs.log", "ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   cwd=self.state_dir)
        log.close()
        self.info_path.write_text(json.dumps({"pid": process.pid, **ports}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(f"SeaweedFS exited with code {process.returncode}; "
                                   f"see {self.state_dir / 'seaweedfs.log'}")
            if self.healthy():
                return self.endpoint()
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"SeaweedFS did not serve S3 within {timeout:.0f} s; "
                           f"see {self.state_dir / 'seaweedfs.log'}")

    def stop(self) -> None:
        info = self.info()
        if info:
            stop_pid(info["pid"])
            self.info_path.unlink(missing_ok=True)


class MLflowServer:
    """An optional `mlflow server` over the SQLite store, artifacts in the S3 bucket."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir).resolve()
        self.info_path = self.state_dir / "mlflow-server.json"

    def info(self) -> dict | None:
        return json.loads(self.info_path.read_text()) if self.info_path.exists() else None

    def healthy(self) -> bool:
        info = self.info()
        return bool(info and pid_alive(info["pid"])
                    and _http_status(f"http://127.0.0.1:{info['port']}/health") == 200)

    def start(self, s3: S3Endpoint, timeout: float = 90.0, port: int | None = None) -> str:
        """Start the server unless it runs (on a free port, or `port`); returns its URL."""
        if self.healthy():
            return f"http://127.0.0.1:{self.info()['port']}"
        self.stop()
        port = port or free_port()
        env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.url,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [
            _executable("mlflow"), "server", "--backend-store-uri", sqlite_uri(self.state_dir),
            "--artifacts-destination", f"s3://{DEFAULT_BUCKET}/mlflow", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1",
        ]
        log = open(self.state_dir / "mlflow-server.log", "ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.info_path.write_text(json.dumps({"pid": process.pid, "port": port}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(f"mlflow server exited; see {self.state_dir / 'mlflow-server.log'}")
            if self.healthy():
                return f"http://127.0.0.1:{port}"
            time.sleep(0.5)
        self.stop()
        raise ServiceError(f"mlflow server did not start within {timeout:.0f} s")

    def stop(self) -> None:
        info = self.info()
        if info:
            stop_pid(info["pid"], group=True)
            self.info_path.unlink(missing_ok=True)

    def restart(self, s3: S3Endpoint, down_seconds: float = 0.0) -> str:
        """Stop the server, leave it down for `down_seconds`, start it again on the same
        port over the same store: clients keep their MLFLOW_TRACKING_URI (an outage drill)."""
        info = self.info()
        if not info:
            raise ServiceError("no MLflow server to restart")
        self.stop()
        time.sleep(down_seconds)
        return self.start(s3, port=info["port"])


def sqlite_uri(state_dir: Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'mlflow.db'}"


def tracking_uri(state_dir: Path) -> str:
    server = MLflowServer(state_dir)
    info = server.info()
    if info and pid_alive(info["pid"]):
        return f"http://127.0.0.1:{info['port']}"
    return sqlite_uri(state_dir)


def ensure_bucket(endpoint: S3Endpoint, bucket: str = DEFAULT_BUCKET) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key=endpoint.access_key, secret=endpoint.secret_key,
                           endpoint_url=endpoint.url, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def up(state_dir: Path, with_mlflow_server: bool = False) -> dict[str, str]:
    """Start what is not running; returns the environment that points at it."""
    # Credentials, the data and the MLflow store live here: this user's alone.
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    endpoint = SeaweedFS(state_dir).start()
    ensure_bucket(endpoint)
    if with_mlflow_server:
        MLflowServer(state_dir).start(endpoint)
    return environment(state_dir)


def down(state_dir: Path) -> None:
    MLflowServer(state_dir).stop()
    SeaweedFS(state_dir).stop()


def status(state_dir: Path) -> dict[str, str]:
    seaweed, server = SeaweedFS(state_dir), MLflowServer(state_dir)
    endpoint = seaweed.endpoint()
    return {
        "seaweedfs": f"running at {endpoint.url}" if seaweed.healthy() else "stopped",
        "mlflow": (f"server at {tracking_uri(state_dir)}" if server.healthy()
                   else f"no server; runs go to {sqlite_uri(state_dir)}"),
    }


def environment(state_dir: Path) -> dict[str, str]:
    """AWS_* and MLFLOW_TRACKING_URI for the embedded services ({} when S3 is down)."""
    seaweed = SeaweedFS(state_dir)
    if not seaweed.healthy():
        return {}
    return {**seaweed.endpoint().env(), "MLFLOW_TRACKING_URI": tracking_uri(state_dir)}


def apply_environment(state_dir: Path) -> None:
    """Point this process at the embedded services unless the user configured others.
    Keys in the environment would win over the credentials file: they belong to another
    store, so they are dropped."""
    if "AWS_ENDPOINT_URL" not in os.environ:
        env = environment(state_dir)
        if env:
            for key in KEY_VARIABLES:
                os.environ.pop(key, None)
        for key, value in env.items():
            if key.startswith("AWS_"):
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(state_dir))
