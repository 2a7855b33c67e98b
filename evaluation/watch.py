"""Evaluate a training run's checkpoints as they land, each exactly once.

The ledger is the run's storage, not the watcher's memory: evaluating step n ends by
publishing `{run}/evals/step-<n>.json` (atomically, after MLflow has confirmed the metrics),
and a checkpoint counts as evaluated once that record exists. A restarted watcher therefore
re-reads the ledger and only picks up what has no record; only an evaluation that was cut
off mid-way runs again. One watcher per run: two at once could evaluate a step twice, so a
watcher holds the lease `evals/lease.json` (watch_lease).

An evaluation whose metrics MLflow has not taken within `tracking_wait` seconds (MLflow
unreachable) fails without a record, so a rerun evaluates and logs that checkpoint again;
so does one of a tracked training run whose MLflow run is not created yet (MLflow was down
when training started).

This module is the work of one evaluation and the bookkeeping around it; dispatching the
work as Ray tasks is cluster/eval_watch.py's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from enat.evaluation.config import WatchConfig
from enat.pipelines import runs, storage
from enat.pipelines.config import LeaseConfig
from enat.pipelines.lease import Lease

EVALS_DIR = "evals"
RECORD = re.compile(r"step-(\d+)\.json")


def evals_url(run_url: str) -> str:
    return storage.join(run_url, EVALS_DIR)


def record_url(run_url: str, step: int) -> str:
    return storage.join(evals_url(run_url), f"step-{step}.json")


def watch_lease(run_url: str, owner: str, config: LeaseConfig) -> Lease:
    """The lease of the run's evaluations: one watcher per run."""
    return Lease(evals_url(run_url), owner, f"the evaluations of {run_url}", config)


def read_records(run_url: str) -> dict[int, dict[str, Any]]:
    """The run's published evaluation records by step."""
    folder = evals_url(run_url)
    records = {}
    for name in storage.listdir(folder):
        match = RECORD.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
        if match:
            record = storage.read_bytes(storage.join(folder, match.group(0)))
            records[int(match.group(1))] = json.loads(record)
    return records


def checkpoints_of(run_url: str) -> list[tuple[int, str, int]]:
    """(step, checkpoint URL, the run's final step) of every complete checkpoint, by step."""
    complete, _ = runs.scan(*runs.split_run_url(run_url))
    found = []
    for ckpt in complete:
        try:
            config = json.loads(storage.read_bytes(storage.join(ckpt.url, runs.TRAIN_CONFIG_NAME)))
        except FileNotFoundError:
            continue  # pruned between the listing and this read: nothing left to evaluate
        found.append((ckpt.step, ckpt.url, int(config["steps"])))
    return found


def training_run_id(run_url: str) -> str | None:
    """The MLflow run the training loop logs to, if it tracks."""
    url = storage.join(run_url, runs.TRACKING_NAME)
    return json.loads(storage.read_bytes(url)).get("mlflow_run_id") if storage.exists(url) else None


def _tracks(checkpoint_url: str) -> bool:
    config = json.loads(storage.read_bytes(storage.join(checkpoint_url, runs.TRAIN_CONFIG_NAME)))
    return bool(config.get("tracking", True))


def evaluate_step(config: WatchConfig, step: int, checkpoint_url: str) -> dict[str, Any]:
    """Evaluate one checkpoint's EMA weights, log the metrics into the training run's MLflow
    run at `step`, then publish the record. Returns the record."""
    from enat.evaluation.evaluate import evaluate_checkpoint, evaluation_metrics
    from enat.pipelines.tracking import Tracker, TrackingUndelivered

    out = storage.join(evals_url(config.run), f"step-{step}")
    ema_url = storage.join(checkpoint_url, runs.EMA_DIR)
    result = evaluate_checkpoint(ema_url, "", config.strategy, config.num_samples,
                                 config.seed, config.reference, config.extractor, steps=config.steps or None,
                                 batch_size=config.batch_size, out=out, captions=config.captions,
                                 device=config.device, progress=False)
    run_id = training_run_id(config.run)
    if run_id:
        tracker = Tracker("", "", run_id=run_id, wait=config.tracking_wait)
        tracker.log_metrics(evaluation_metrics(result, prefix="eval/"), step=step)
        tracker.set_tags({"eval.extractor_id": result["extractor_id"], "eval.strategy": result["strategy"],
                          "eval.num_samples": result["num_samples"], "eval.seed": result["seed"]})
        tracker.log_bytes(storage.read_bytes(result["grid"]), "grid.png", f"evals/step-{step}")
        if not tracker.close():
            raise TrackingUndelivered(f"MLflow did not take step {step}'s metrics within "
                                      f"{config.tracking_wait:g} s; no record published, a rerun "
                                      f"evaluates it")
    elif _tracks(checkpoint_url):
        raise TrackingUndelivered(f"the training run tracks to MLflow but its run is not created yet "
                                  f"(MLflow unreachable?); no record for step {step}, a rerun evaluates it")
    record = {key: value for key, value in result.items() if key != "strategy_yaml"}
    record.update(step=step, mlflow_run_id=run_id)
    storage.write_bytes(record_url(config.run, step), json.dumps(record, indent=1).encode())
    return record
