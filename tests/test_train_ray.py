"""`enat train` under Ray Train on real services: 2 workers, ZeRO-2, tiny ENAT on synthetic
shards in SeaweedFS, MLflow in a SQLite store. One run serves every assertion (a Ray Train
start costs ~25 s): the loss falls over a few hundred steps, checkpoints land in S3, MLflow
holds one run with its metrics, and a worker process SIGKILLed mid-run is replaced by Ray,
the loop resumes from the last complete checkpoint and the run completes, while no
checkpoint folder is ever visible (marked complete) without all of its files."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from enat.cluster.cli import main
from enat.pipelines import runs, storage
from enat.pipelines.model_io import load_model
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

STEPS, EVERY = 300, 100
RUN = "ray-zero2"


def visible_but_incomplete(root: str) -> list[str]:
    """Checkpoints marked complete (before and after listing their files) that lack a file."""
    before = {c.url: c for c in runs.scan(root, RUN)[0]}
    fs, base = storage.filesystem(runs.checkpoints_url(root, RUN))
    files = {p[len(base.rstrip("/")) + 1 :] for p in fs.find(base)} if fs.exists(base) else set()
    after = {c.url for c in runs.scan(root, RUN)[0]}
    return [f"{url}/{name}" for url, c in before.items() if url in after for name in c.meta["files"]
            if f"{url.rsplit('/', 1)[-1]}/{name}" not in files]


class WorkerKiller(threading.Thread):
    """Once the first checkpoint is complete, SIGKILL one Ray Train worker process (a
    descendant of this test process only); meanwhile check what readers could see."""

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.root, self.done = root, threading.Event()
        self.killed: int | None = None
        self.violations: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.violations += visible_but_incomplete(self.root)
                if self.killed is None and runs.latest(self.root, RUN) is not None:
                    workers = [p for p in psutil.Process().children(recursive=True)
                               if "RayTrainWorker" in " ".join(p.cmdline())]
                    if len(workers) == 2:
                        self.killed = max(w.pid for w in workers)
                        os.kill(self.killed, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass
            time.sleep(2.0)  # each look lists the bucket: keep the CPU for training


@pytest.mark.slow
@pytest.mark.integration
def test_two_ray_workers_zero2_on_s3_survive_a_killed_worker(s3_bucket, s3_keys_in_env, tmp_path, monkeypatch,
                                                             secret_nowhere, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    data, root = storage.join(s3_bucket, "data"), storage.join(s3_bucket, "root")
    write_synthetic_shards(data, SyntheticSpec(grid=4, codebook_size=64, num_classes=5, samples=512,
                                               per_shard=128))  # 4 shards: one per reader
    killer = WorkerKiller(root)
    killer.start()
    try:
        code = main(["train", "--config", "tiny-enat-demo", f"run={RUN}", f"root={root}", f"data.url={data}",
                     "model.codebook_size=64", "model.grid_size=4", "model.width=32", "model.heads=2",
                     "model.encoder_depth=2", "model.decoder_depth=1", "model.num_classes=5",
                     f"steps={STEPS}", "batch_size=16", "lr=3e-3", "schedule=constant", "warmup_steps=20",
                     f"checkpoint_every={EVERY}", "log_every=25", "keep_last=2", "zero_stage=2",
                     "mlflow_experiment=ray-test", "launch.num_workers=2", "launch.max_failures=1"])
    finally:
        killer.done.set()
        killer.join()
    assert code == 0
    output = capfd.readouterr()
    printed = output.out + output.err
    # Ray Train's placement group cleaner cannot reach the State API of a local Ray (no
    # dashboard): its warning, once a second, is silenced in every worker; and the workers'
    # log lines reach the console once each (ray_session.WORKER_SETTINGS).
    assert "(RayTrainWorker pid=" in printed and "Failed to query" not in printed
    assert printed.count(f"step {STEPS}/{STEPS} loss") == 1
    assert killer.killed is not None, "the run ended before a worker could be killed"
    assert killer.violations == []

    # Checkpoints in S3: the last two (keep_last), complete; nothing half-written left behind.
    complete, partial = runs.scan(root, RUN)
    assert [c.step for c in complete] == [STEPS - EVERY, STEPS] and partial == []
    assert complete[-1].meta["world_size"] == 2 and complete[-1].meta["zero_stage"] == 2
    assert storage.listdir(storage.join(runs.run_url(root, RUN), "ray"))  # Ray's bookkeeping
    assert type(load_model(complete[-1].ema_url).model).__name__ == "ENAT"

    # MLflow: one run, resumed once, with its metrics; the loss fell clearly.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    mlflow_runs = client.search_runs([client.get_experiment_by_name("ray-test").experiment_id])
    assert len(mlflow_runs) == 1
    found = mlflow_runs[0]
    assert found.info.status == "FINISHED"
    assert found.data.tags["enat.resumed_from"].startswith(runs.checkpoints_url(root, RUN))
    assert found.data.tags["checkpoint.latest"] == complete[-1].url
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s"} <= set(found.data.metrics)
    # The keys were in the environment (as a user may export them); Ray never saw them.
    secret_nowhere(s3_keys_in_env.secret_key, tmp_path, bucket=s3_bucket)
    loss = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert max(loss) == STEPS
    assert loss[STEPS] < loss[25] - 0.5, f"the loss did not fall clearly: {loss}"
