"""Evaluation dispatched as checkpoints land: `enat train ... eval.watch=true` on a real
local Ray (2 Train workers, ZeRO-2, DeepSpeed over gloo) with checkpoints in SeaweedFS and
MLflow in SQLite. The run trains to step 2 (checkpoint, evaluated by that launch's watcher),
then is continued to step 4 by a second launch whose fresh watcher must evaluate step 4
only; a standalone `enat eval watch` afterwards finds nothing left to do. Exactly once is
read from MLflow's metric history: one FID value per checkpoint step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from enat.cluster.cli import main
from enat.evaluation.watch import checkpoints_of, read_records
from enat.models import VQGANConfig, build_model
from enat.pipelines import runs, storage
from enat.pipelines.model_io import load_model, save_model
from enat.pipelines.shards import read_manifest, write_manifest
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

RUN = "watched"
TOKENIZER = VQGANConfig(codebook_size=32, code_dim=8, base_channels=32, channel_mult=(1, 1, 1), image_size=32)


def shards_with_tokenizer(url: str) -> str:
    """Synthetic 8x8 token shards whose manifest names a (random-init) tokenizer export."""
    torch.manual_seed(0)
    tokenizer_url = storage.join(url, "tokenizer")
    save_model(tokenizer_url, build_model(TOKENIZER), TOKENIZER)
    tokenizer = load_model(tokenizer_url)
    data = storage.join(url, "shards")
    write_synthetic_shards(data, SyntheticSpec(grid=8, codebook_size=32, num_classes=3, samples=64,
                                               per_shard=32, tokenizer_id=tokenizer.model_id))
    write_manifest(data, dataclasses.replace(read_manifest(data), tokenizer_url=tokenizer_url,
                                             tokenizer_sha256=tokenizer.sha256))
    return data


def train(root: str, data: str, extractor: str, steps: int) -> int:
    return main(["train", "--config", "tiny-enat-demo", f"run={RUN}", f"root={root}", f"data.url={data}",
                 "model.codebook_size=32", "model.grid_size=8", "model.width=32", "model.heads=2",
                 "model.encoder_depth=1", "model.decoder_depth=1", "model.num_classes=3",
                 f"steps={steps}", "batch_size=8", "warmup_steps=1", "checkpoint_every=2", "log_every=1",
                 "mlflow_experiment=watch-test", "launch.num_workers=2",
                 "eval.watch=true", f"eval.reference={data}", f"eval.extractor={extractor}",
                 "eval.num_samples=6", "eval.batch_size=6", "eval.steps=2", "eval.poll_seconds=1",
                 "eval.num_cpus=0.5"])


def fid_history(run_id: str, extractor_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, f"eval/fid/{extractor_id}")
    return sorted((metric.step, metric.value) for metric in history)


@pytest.mark.slow
@pytest.mark.integration
def test_checkpoints_are_evaluated_once_each_across_watcher_restarts(s3_bucket, small_extractor, tmp_path,
                                                                     monkeypatch, s3_keys_in_env,
                                                                     secret_nowhere):
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store lands in the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root, data = storage.join(s3_bucket, "root"), shards_with_tokenizer(storage.join(s3_bucket, "data"))
    run_url = runs.run_url(root, RUN)
    extractor_id = json.loads(storage.read_bytes(storage.join(small_extractor, "extractor.json")))["id"]

    assert train(root, data, small_extractor, steps=2) == 0
    first = read_records(run_url)
    assert sorted(first) == [2]

    assert train(root, data, small_extractor, steps=4) == 0  # resumes; a new watcher starts
    records = read_records(run_url)
    assert sorted(records) == [2, 4]
    assert records[2] == first[2]  # step 2 was not evaluated again
    assert records[4]["step"] == 4 and records[4]["extractor_id"] == extractor_id
    assert records[4]["checkpoint"].endswith("step-4/ema") and records[4]["fid"] > 0
    assert storage.exists(storage.join(run_url, "evals", "step-4", "grid.png"))

    run_id = json.loads(storage.read_bytes(storage.join(run_url, runs.TRACKING_NAME)))["mlflow_run_id"]
    assert records[2]["mlflow_run_id"] == records[4]["mlflow_run_id"] == run_id
    history = fid_history(run_id, extractor_id)
    assert history == [(2, pytest.approx(records[2]["fid"])), (4, pytest.approx(records[4]["fid"]))]
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "evals/step-4")}
    assert "evals/step-4/grid.png" in artifacts

    # A standalone watcher on the finished run: nothing left, nothing redone.
    assert main(["eval", "watch", run_url, f"reference={data}", f"extractor={small_extractor}",
                 "num_samples=6", "batch_size=6", "steps=2", "poll_seconds=1"]) == 0
    assert read_records(run_url) == records
    assert len(fid_history(run_id, extractor_id)) == 2
    secret_nowhere(s3_keys_in_env.secret_key, tmp_path, bucket=s3_bucket)  # keys were in the env


def test_watch_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", "watch", str(tmp_path), "reference=x.npz", "follow=false"]) == 2
    assert "training run folder" in capsys.readouterr().err
    assert main(["eval", "watch", f"{tmp_path}/runs/r", "follow=false"]) == 2
    assert "reference" in capsys.readouterr().err


def test_a_checkpoint_pruned_between_listing_and_reading_is_skipped(tmp_path):
    root = str(tmp_path / "root")
    for step in (10, 20):
        url = runs.step_url(root, "r", step)
        storage.write_bytes(storage.join(url, runs.TRAIN_CONFIG_NAME), json.dumps({"steps": 20}).encode())
        storage.write_bytes(storage.join(url, runs.MARKER), json.dumps({"step": step}).encode())
    # Pruning deletes step 10's files after the watcher listed its marker.
    storage.remove(storage.join(runs.step_url(root, "r", 10), runs.TRAIN_CONFIG_NAME))
    assert checkpoints_of(f"{root}/runs/r") == [(20, runs.step_url(root, "r", 20), 20)]
