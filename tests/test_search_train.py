"""`enat search-train`: ASHA over Beta(a, b) and lr on a real local Ray, each trial a Ray
Train run of the real loop (DeepSpeed over gloo) on synthetic shards in SeaweedFS,
reporting the EMA's val_loss at every rung; a rerun restores the finished experiment."""

from __future__ import annotations

import json

import pytest

from enat.cluster.cli import main
from enat.cluster.jobs import TrainSearchConfig, TrainSearchJob
from enat.cluster.search_train_cmd import trial_config
from enat.models.config import MaskingConfig
from enat.pipelines import storage
from enat.trainer.config import ValidationConfig
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

MODEL = ["model.codebook_size=64", "model.grid_size=4", "model.width=32", "model.heads=2",
         "model.encoder_depth=1", "model.decoder_depth=1", "model.num_classes=5"]


def test_rungs_and_trial_configs_follow_the_search():
    search = TrainSearchConfig(max_steps=600, grace_steps=100, reduction_factor=3, validation_samples=64)
    assert search.rungs() == [100, 300, 600]
    job = TrainSearchJob(masking=MaskingConfig(beta_a=12.0, beta_b=3.0, reuse_prob=0.5), warmup_steps=100,
                         validation=ValidationConfig(samples=0), ema_decay=0.9999, search=search)
    config = trial_config(job, {"beta_a": 2.0, "beta_b": 5.0, "lr": 1e-3}, "abc_00001")
    assert type(config).__name__ == "TrainConfig"  # what the workers get: no driver-only sections
    assert config.run == "search-train-abc_00001" and config.steps == 600
    assert config.checkpoint_every == 100 and config.validation.samples == 64
    assert config.masking == MaskingConfig(beta_a=2.0, beta_b=5.0, reuse_prob=0.5) and config.lr == 1e-3
    assert config.warmup_steps == 50  # warmup ends before the first rung
    assert config.ema_decay == pytest.approx(0.9)  # forgets the init weights by the first rung


def test_bad_search_keys_fail_with_one_line(capsys):
    assert main(["search-train", "--config", "tiny-enat-demo", "data.url=x", "search.max_steps=5",
                 "search.grace_steps=10"]) == 2
    assert "search.max_steps" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_asha_stops_trailing_trials_and_a_rerun_restores(s3_bucket, s3_keys_in_env, tmp_path, monkeypatch,
                                                         secret_nowhere):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data, root = storage.join(s3_bucket, "data"), storage.join(s3_bucket, "root")
    write_synthetic_shards(data, SyntheticSpec(grid=4, codebook_size=64, num_classes=5, samples=128,
                                               per_shard=64))
    args = ["search-train", "--config", "tiny-enat-demo", f"root={root}", f"data.url={data}", *MODEL,
            "batch_size=8", "launch.num_workers=1", "log_every=2", "data.readers=1",
            "search.trials=4", "search.max_steps=4", "search.grace_steps=2", "search.reduction_factor=2",
            "search.validation_samples=32", "search.lr=[1e-4, 1e-2]"]
    assert main(args) == 0
    summary = json.loads(storage.read_bytes(storage.join(root, "runs", "search-train", "best.json")))
    trials = summary["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    assert all(t["steps"] in (2, 4) for t in trials)  # the rungs
    finished = [t for t in trials if t["steps"] == 4]
    assert finished and summary["best"]["val_loss"] == min(t["val_loss"] for t in finished)
    assert summary["steps_trained"] < summary["steps_without_early_stopping"]  # ASHA stopped some
    assert len({round(t["val_loss"], 6) for t in trials}) == 4  # each trial trained its own setting
    best_yaml = storage.read_bytes(storage.join(root, "runs", "search-train", "best.yaml")).decode()
    assert f"beta_a: {summary['best']['beta_a']:.4g}" in best_yaml
    # Each trial is a training run of its own, with its checkpoints in the root.
    assert storage.exists(storage.join(summary["best"]["checkpoint"], "checkpoint.json"))

    assert main(args) == 0  # restored: the finished experiment, no new trial
    again = json.loads(storage.read_bytes(storage.join(root, "runs", "search-train", "best.json")))
    assert again["best"] == summary["best"] and len(again["trials"]) == 4
    # Tune pickled its storage filesystem into the bucket, and copied the environment to
    # every trial: neither holds the keys the environment had.
    secret_nowhere(s3_keys_in_env.secret_key, tmp_path, bucket=s3_bucket)
