"""MLflow outages against a real `mlflow server` (SQLite store, artifacts in SeaweedFS),
stopped by PID and restarted on the same port over the same store:
- a training run (one plain process) keeps training while MLflow is down for ~20 s; every
  step's metrics reach MLflow afterwards, in order, and the run ends FINISHED;
- the eval watcher publishes no record for a checkpoint while MLflow cannot take its
  metrics, and publishes it (with exactly one FID value in MLflow) once MLflow is back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from enat.cluster.cli import main
from enat.cluster.services import MLflowServer, ensure_bucket
from enat.evaluation.watch import read_records
from enat.pipelines import runs, storage
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
MODEL = {"kind": "enat", "codebook_size": 32, "grid_size": 4, "width": 32, "heads": 2, "encoder_depth": 1,
         "decoder_depth": 1, "num_classes": 3}
STEPS, EVERY, OUTAGE_FROM, OUTAGE_UNTIL = 60, 10, 10, 30

# Trains in this process; at the checkpoint of OUTAGE_FROM it says so and waits for the
# test to take MLflow down, at OUTAGE_UNTIL it says so and waits for MLflow to be back: the
# steps in between are logged during the outage, the later ones while its backlog is replayed.
RUNNER = """
import pathlib, sys, time
from enat.cluster.config import load_config
from enat.cluster.jobs import TrainJob
from enat.trainer.loop import train
preset, sync, start, until = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def wait_for(name):
    deadline = time.monotonic() + 300
    while not (sync / name).exists():
        assert time.monotonic() < deadline, name
        time.sleep(0.1)

def on_checkpoint(step, url, metrics):
    if step == start:
        (sync / "at-outage").touch()
        wait_for("down")
    elif step == until:
        (sync / "at-until").touch()
        wait_for("up")

train(load_config(TrainJob, preset, []).loop_config(), on_checkpoint=on_checkpoint)
"""


@pytest.fixture
def mlflow_server(seaweedfs, tmp_path, monkeypatch):
    """A real MLflow server for this test (its artifacts in the session's SeaweedFS);
    MLFLOW_TRACKING_URI points at it. Stopped by PID afterwards."""
    ensure_bucket(seaweedfs)
    server = MLflowServer(tmp_path / "mlflow-state")
    server.state_dir.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.start(seaweedfs))
    yield server
    server.stop()


def run_of(name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                               f"tags.`mlflow.runName` = '{name}'")
    assert len(found) == 1
    return client, found[0]


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_logged_while_mlflow_is_down_arrive_after_it_returns(mlflow_server, seaweedfs, tmp_path):
    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=32, num_classes=3,
                                                                  samples=96, per_shard=32))
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({
        "run": "through-outage", "root": str(tmp_path / "root"), "model": MODEL, "steps": STEPS,
        "batch_size": 8, "warmup_steps": 2, "precision": "fp32", "log_every": 1, "checkpoint_every": EVERY,
        "keep_last": 2, "validation": {"samples": 16}, "mlflow_experiment": "outage", "tracking_wait": 120,
        "data": {"url": str(tmp_path / "data"), "readers": 1, "shuffle_window": 16}}))
    (tmp_path / "runner.py").write_text(RUNNER)
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "stderr.txt", "w+")
    process = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(preset), str(sync),
                                str(OUTAGE_FROM), str(OUTAGE_UNTIL)], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not (sync / "at-outage").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run did not reach the outage"
            time.sleep(0.2)
        restart = threading.Thread(target=mlflow_server.restart, args=(seaweedfs, 20.0))
        restart.start()
        while mlflow_server.healthy():
            time.sleep(0.05)
        (sync / "down").touch()
        while not (sync / "at-until").exists():  # training goes on while MLflow is down
            assert restart.is_alive() and process.poll() is None, "training was held by the outage"
            time.sleep(0.1)
        restart.join()
        assert mlflow_server.healthy()
        (sync / "up").touch()
        assert process.wait(timeout=600) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log.seek(0)
    stderr = log.read()

    client, run = run_of("through-outage")
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), key  # each step once
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == list(range(EVERY, STEPS + 1, EVERY))
    assert run.data.params["steps"] == str(STEPS)
    assert run.data.tags["checkpoint.latest"].endswith(f"step-{STEPS}")
    run_url = runs.run_url(str(tmp_path / "root"), "through-outage")
    tracking = json.loads(storage.read_bytes(storage.join(run_url, runs.TRACKING_NAME)))
    assert tracking["mlflow_run_id"] == run.info.run_id
    # One line when the outage starts, one when its backlog is in, nothing lost.
    assert stderr.count("warning: MLflow unreachable") == 1, stderr[-3000:]
    back = re.findall(r"MLflow reachable again after (\d+) s: replayed (\d+) buffered values", stderr)
    assert len(back) == 1 and "did not take" not in stderr and "dropped" not in stderr
    seconds, replayed = map(int, back[0])
    # at least the 20 steps trained while down, ~10 metrics each, plus their tags and val_loss
    assert replayed >= (OUTAGE_UNTIL - OUTAGE_FROM) * 10
    print("", *(line for line in stderr.splitlines() if "MLflow" in line), sep="\n")


@pytest.mark.slow
@pytest.mark.integration
def test_eval_watcher_publishes_a_record_only_once_mlflow_has_the_metrics(mlflow_server, seaweedfs,
                                                                         small_extractor, tmp_path, capsys):
    from test_eval_watch import fid_history, shards_with_tokenizer

    root, data = str(tmp_path / "root"), shards_with_tokenizer(str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "-m", "enat.cluster.cli", "train", "--config", "tiny-enat-demo", "run=watched",
         f"root={root}", f"data.url={data}", "model.codebook_size=32", "model.grid_size=8", "model.width=32",
         "model.heads=2", "model.encoder_depth=1", "model.decoder_depth=1", "model.num_classes=3", "steps=2",
         "batch_size=8", "warmup_steps=1", "checkpoint_every=2", "validation.samples=0",
         "mlflow_experiment=outage", "launch.launcher=process"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_url = runs.run_url(root, "watched")
    client, run = run_of("watched")
    extractor_id = json.loads(storage.read_bytes(storage.join(small_extractor, "extractor.json")))["id"]

    def watch(wait: float) -> int:
        return main(["eval", "watch", run_url, f"reference={data}", f"extractor={small_extractor}",
                     "num_samples=6", "batch_size=6", "steps=2", "follow=false", "num_cpus=0.5",
                     f"tracking_wait={wait}"])

    mlflow_server.stop()
    port = int(os.environ["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    assert watch(2) == 0
    assert read_records(run_url) == {}  # evaluated, but MLflow has not got it: no record
    assert "step 2: evaluation failed, left for a rerun (" in capsys.readouterr().err

    # The rerun waits for MLflow, which comes back on the same port meanwhile.
    comes_back = threading.Timer(5.0, mlflow_server.start, args=(seaweedfs,), kwargs={"port": port})
    comes_back.start()
    try:
        assert watch(180) == 0
    finally:
        comes_back.join()
    records = read_records(run_url)
    assert sorted(records) == [2] and records[2]["mlflow_run_id"] == run.info.run_id
    assert fid_history(run.info.run_id, extractor_id) == [(2, pytest.approx(records[2]["fid"]))]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evals/step-2")}
    assert "evals/step-2/grid.png" in artifacts
