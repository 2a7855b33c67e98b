"""An elastic run on a two-node Ray cluster on this machine: `ray start --head` and a second
`ray start --address=…`, one CPU each, on free ports, stopped by their process groups.
`enat train launch.num_workers=1-2` starts on 2 workers; the second node is killed mid-run and
the run continues on 1 worker (grad_accum 2, the same global batch); the node comes back and
the run grows back to 2 workers. It completes with every step's loss logged once, and the
world size of every step in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enat.cluster.services import free_port
from enat.pipelines import runs, storage
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

STEPS, EVERY = 1200, 50
RAY = str(Path(sys.executable).parent / "ray")


class RayNode:
    """`ray start --block` in its own process group; `stop()` ends the group (the raylet and
    the workers it started), as a preempted machine would vanish."""

    def __init__(self, log: Path, temp: Path, head_port: int | None = None):
        self.port = head_port or free_port()
        # Its own temp dir: `ray start --head` leaves the cluster's address there, and a later
        # ray.init() without an address (another test) would try to join that dead cluster.
        common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}"]
        if head_port is None:
            command = [RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                       f"--ray-client-server-port={free_port()}", *common]
        else:
            command = [RAY, "start", f"--address=127.0.0.1:{head_port}", *common]
        # enat's CLI sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (a local Ray stays on loopback),
        # which also makes `ray start` refuse to join a cluster: not wanted for these nodes.
        env = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env["RAY_AUTH_MODE"] = "disabled"
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()


def alive_nodes(port: int) -> int:
    """How many nodes the cluster's GCS counts alive (asked from a process of its own: this one
    must not join the cluster)."""
    probe = (f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR', log_to_driver=False); "
             "print(sum(node['Alive'] for node in ray.nodes()))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return int(result.stdout.split()[-1]) if result.returncode == 0 and result.stdout.split() else 0


def markers(root: str) -> dict[int, int]:
    """step -> world size of every complete checkpoint of the run so far."""
    return {c.step: c.meta["world_size"] for c in runs.scan(root, "elastic")[0]}


def wait_for(condition, what: str, trainer: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert trainer.poll() is None, f"training ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.integration
def test_an_elastic_run_loses_a_node_continues_and_grows_back(s3_bucket, tmp_path, tmp_path_factory):
    data, root = storage.join(s3_bucket, "data"), storage.join(s3_bucket, "root")
    write_synthetic_shards(data, SyntheticSpec(grid=4, codebook_size=64, num_classes=5, samples=512,
                                               per_shard=64))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    temp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths live under it
    head = RayNode(tmp_path / "head.log", temp)
    second = RayNode(tmp_path / "second.log", temp, head_port=head.port)
    nodes = [head, second]
    deadline = time.monotonic() + 120
    while alive_nodes(head.port) < 2:  # an elastic run starts on what is there: let both join first
        assert time.monotonic() < deadline, "the two Ray nodes did not come up"
        time.sleep(1)
    train_log = tmp_path / "train.log"
    command = [sys.executable, "-m", "enat.cluster.cli", "train", "--config", "tiny-enat-demo", "run=elastic",
               f"root={root}", f"data.url={data}", "model.codebook_size=64", "model.grid_size=4",
               "model.width=32", "model.heads=2", "model.encoder_depth=2", "model.decoder_depth=1",
               "model.num_classes=5", f"steps={STEPS}", "batch_size=8", "lr=3e-3", "warmup_steps=20",
               f"checkpoint_every={EVERY}", "log_every=1", "keep_last=50", "zero_stage=2", "precision=fp32",
               "validation.samples=0", "mlflow_experiment=elastic", "launch.num_workers=1-2",
               "launch.resize_check_s=5", "launch.max_failures=-1"]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{head.port}", "MLFLOW_TRACKING_URI": tracking,
           "OMP_NUM_THREADS": "1"}
    try:
        with open(train_log, "wb") as log:
            trainer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: 2 in markers(root).values(), "checkpoint by 2 workers", trainer)
                second.stop()  # the node is preempted mid-run
                wait_for(lambda: 1 in markers(root).values(), "checkpoint by 1 worker", trainer)
                nodes.append(RayNode(tmp_path / "second-again.log", temp, head_port=head.port))  # it returns
                wait_for(lambda: any(size == 2 and step > min(s for s, n in markers(root).items() if n == 1)
                                     for step, size in markers(root).items()),
                         "checkpoint by 2 workers again", trainer)
                assert trainer.wait(timeout=900) == 0, train_log.read_text()[-5000:]
            finally:
                if trainer.poll() is None:
                    trainer.kill()
                    trainer.wait()
    finally:
        for node in nodes:
            node.stop()
    output = train_log.read_text()
    assert f"run elastic finished at step {STEPS}" in output
    assert "on 1 workers: grad_accum 2 x batch_size 8 per worker" in output  # the same global batch

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    found = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run_id = found[0].info.run_id
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # every step, once
    sizes = {m.step: m.value for m in client.get_metric_history(run_id, "world_size")}
    assert sorted(sizes) == list(range(1, STEPS + 1))
    shrunk = [step for step in sorted(sizes) if sizes[step] == 1]
    assert shrunk and sizes[1] == 2 and sizes[STEPS] == 2  # 2, then 1, then 2 again
    assert all(sizes[step] == 1 for step in range(shrunk[0], shrunk[-1] + 1))
