"""`enat sample`, `enat eval train-features` and `enat eval checkpoint` end to end on a tiny
random-init ENAT and tokenizer exported the way training exports them, with a real
torch-fidelity extractor, real storage (local and SeaweedFS S3) and a real MLflow store."""

from __future__ import annotations

import io
import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from enat.cluster.cli import main
from enat.evaluation.sampling import SamplingError, class_balanced_labels, load_sampler
from enat.evaluation.strategy_io import StrategyError, load_strategy, save_strategy
from enat.models import ENATConfig, VQGANConfig, build_model
from enat.models.strategy import Strategy
from enat.pipelines import storage
from enat.pipelines.model_io import load_model, save_model
from enat.pipelines.shards import Manifest, TokenSample, shard_name, write_manifest, write_shard

TOKENIZER = VQGANConfig(codebook_size=32, code_dim=8, base_channels=32, channel_mult=(1, 1, 1), image_size=32)
MODEL = ENATConfig(codebook_size=32, grid_size=8, width=32, heads=2, num_classes=3, encoder_depth=1,
                   decoder_depth=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A training run's layout: tokenizer export, token shards + manifest, a checkpoint whose
    train_config.json names the shards, the EMA export under step-5/ema."""
    root = tmp_path_factory.mktemp("root")
    torch.manual_seed(0)
    tokenizer_url = str(root / "tokenizer")
    save_model(tokenizer_url, build_model(TOKENIZER), TOKENIZER)
    tokenizer = load_model(tokenizer_url)
    shards_url = str(root / "shards")
    rng = np.random.default_rng(0)
    samples = [TokenSample(f"{i:09d}", rng.integers(0, 32, (8, 8)).astype(np.uint16), label=i % 3)
               for i in range(24)]
    entry = write_shard(storage.join(shards_url, "train", shard_name(0)), samples)
    write_manifest(shards_url, Manifest(tokenizer.model_id, tokenizer.sha256, 32, [8, 8], 32,
                                        classes=["a", "b", "c"], splits={"train": [entry]},
                                        tokenizer_url=tokenizer_url))
    step = root / "runs" / "tiny" / "checkpoints" / "step-5"
    save_model(str(step / "ema"), build_model(MODEL), MODEL, extra={"step": 5})
    (step / "train_config.json").write_text(json.dumps({"data": {"url": shards_url}}))
    return {"root": root, "step": str(step), "tokenizer": tokenizer_url, "shards": shards_url}


def sample_cli(step: str, out: str, *extra: str) -> int:
    return main(["sample", step, f"out={out}", "num_samples=12", "batch_size=5", "precision=fp32", *extra])


def npz_of(url: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(url, "samples.npz")))) as data:
        return data["arr_0"], data["arr_1"]


def test_class_balanced_labels_match_enat_evaluation():
    assert class_balanced_labels(9, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    labels = class_balanced_labels(10, 4)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]
    assert np.bincount(labels).tolist() == [3, 3, 2, 2]


def test_strategy_files_round_trip_and_fail_clearly(tmp_path):
    assert load_strategy("default", 5) == Strategy.default(5)
    assert load_strategy("default").steps == 8
    strategy = Strategy.default(4, cfg_scale=3.0)
    save_strategy(str(tmp_path / "s.yaml"), strategy)
    assert load_strategy(str(tmp_path / "s.yaml")) == strategy
    assert load_strategy(str(tmp_path / "s.yaml"), 4) == strategy
    with pytest.raises(StrategyError, match="has 4 steps but steps=8"):
        load_strategy(str(tmp_path / "s.yaml"), 8)
    (tmp_path / "bad.yaml").write_text("manual_ratios: [0.5]\nratios: [1]\n")
    with pytest.raises(StrategyError, match="unknown: \\['ratios'\\]"):
        load_strategy(str(tmp_path / "bad.yaml"))
    with pytest.raises(StrategyError, match="no strategy file at"):
        load_strategy(str(tmp_path / "missing.yaml"))


@pytest.mark.slow
@pytest.mark.integration
def test_sample_writes_pngs_npz_grid_deterministically(run, tmp_path, s3_bucket):
    out = str(tmp_path / "samples")
    assert sample_cli(run["step"], out, "seed=3") == 0  # the tokenizer is found through the manifest
    pngs = sorted(Path(out, "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(12)]
    images, labels = npz_of(out)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert np.array_equal(np.asarray(Image.open(pngs[7])), images[7])
    with Image.open(Path(out, "grid.png")) as grid:
        assert grid.size == (8 * 34 + 2, 3 * 34 + 2)  # one row per class, 8 columns
    summary = json.loads(Path(out, "sample.json").read_text())
    assert summary["tokenizer"] == run["tokenizer"] and summary["steps"] == 8 and summary["generated"] == 12
    assert load_strategy(str(Path(out, "strategy.yaml"))) == Strategy.default(8)

    again = f"{s3_bucket}/samples"  # the same seed, written to S3: the same images
    assert sample_cli(run["step"], again, "seed=3", f"tokenizer={run['tokenizer']}") == 0
    assert np.array_equal(npz_of(again)[0], images)
    assert len(storage.listdir(storage.join(again, "images"))) == 12
    other = str(tmp_path / "other")
    assert sample_cli(run["step"], other, "seed=4", "npz=false", "png=false") == 0
    assert not Path(other, "samples.npz").exists() and Path(other, "grid.png").exists()
    with Image.open(Path(other, "grid.png")) as grid, Image.open(Path(out, "grid.png")) as first:
        assert not np.array_equal(np.asarray(grid), np.asarray(first))


@pytest.mark.slow
def test_sample_resumes_and_refuses_other_settings(run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert sample_cli(run["step"], str(out), "seed=1") == 0
    images, _ = npz_of(str(out))
    (out / "images" / "000007.png").unlink()
    (out / "samples.npz").unlink()
    assert sample_cli(run["step"], str(out), "seed=1") == 0
    summary = json.loads((out / "sample.json").read_text())
    assert (summary["generated"], summary["resumed"]) == (5, 7)  # only batch 5..9 is redone
    assert np.array_equal(npz_of(str(out))[0], images)
    assert sample_cli(run["step"], str(out), "seed=2") == 2
    assert "holds samples made with other settings" in capsys.readouterr().err


def test_sampler_needs_a_known_tokenizer(run, tmp_path):
    lone = str(tmp_path / "lone")
    save_model(lone, build_model(MODEL), MODEL)
    with pytest.raises(SamplingError, match="pass tokenizer=<URL>"):
        load_sampler(lone, device="cpu")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_sampler(str(tmp_path / "nothing"), device="cpu")
    sampler = load_sampler(lone, run["tokenizer"], device="cpu")
    assert sampler.resolution == 32 and sampler.tokenizer_url == run["tokenizer"]


@pytest.fixture
def extractor(small_extractor) -> str:
    return small_extractor


@pytest.mark.slow
def test_train_features_writes_a_registered_extractor(extractor):
    meta = json.loads(Path(extractor, "extractor.json").read_text())
    assert meta["id"].startswith("domain-") and len(meta["id"]) == len("domain-") + 12
    assert meta["images"] == 200 and meta["holdout_images"] + meta["train_images"] == 200
    assert 0.0 <= meta["holdout_accuracy"] <= 1.0 and len(meta["classes"]) >= 2
    assert Path(extractor, "extractor.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_eval_checkpoint_logs_metrics_grid_and_strategy_to_mlflow(run, extractor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store lands in the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "eval"
    assert main(["eval", "checkpoint", run["step"], f"reference={run['shards']}", f"extractor={extractor}",
                 "num_samples=12", "batch_size=6", "steps=4", f"out={out}", "run_name=tiny-eval"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    extractor_id = json.loads(Path(extractor, "extractor.json").read_text())["id"]
    assert result["extractor_id"] == extractor_id and result["num_samples"] == 12 and result["steps"] == 4
    assert result["fid"] > 0 and "kid" in result and result["is"] >= 1.0
    assert 0 < result["gflops_per_image"] < result["gflops_per_image_with_decoder"]
    assert result["images_per_s"] > 0 and result["step"] == 5 and Path(result["grid"]).is_file()

    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        metrics = dict(con.execute("select key, value from metrics").fetchall())
        params = dict(con.execute("select key, value from params").fetchall())
        run_id = con.execute("select run_uuid from runs where name = 'tiny-eval'").fetchone()[0]
    assert metrics[f"fid/{extractor_id}"] == pytest.approx(result["fid"])
    assert "fid" not in metrics and {"gflops_per_image", "images_per_s"} <= set(metrics)
    assert params["extractor_id"] == extractor_id and params["seed"] == "0" and params["num_samples"] == "12"
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"grid.png", "strategy.yaml"} <= artifacts


@pytest.mark.slow
@pytest.mark.integration
def test_search_command_writes_strategy_plots_summary_and_nested_runs(run, extractor, tmp_path, monkeypatch,
                                                                      s3_keys_in_env, secret_nowhere):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "search"
    scratch_before = set(Path(tempfile.gettempdir()).glob("enat-search-*"))
    assert main(["search", run["step"], "--steps", "2", f"reference={run['shards']}",
                 f"extractor={extractor}", "updates=1", "num_samples=6", "batch_size=6", "concurrency=1",
                 f"out={out}", "validation_samples=6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations_this_run"] == 8  # 4T-1 for T=2, + 1 for the point the step reached
    assert summary["fid_initial_fresh_seeds"] > 0 and summary["fid_searched_fresh_seeds"] > 0
    assert load_strategy(str(out / "strategy.yaml")).steps == 2
    assert (out / "fid_vs_update.png").is_file() and (out / "schedule.png").is_file()
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        parent = con.execute("select run_uuid from runs where name = 'search'").fetchone()[0]
        children = con.execute("select count(*) from tags where key = 'mlflow.parentRunId' and value = ?",
                               (parent,)).fetchone()[0]
    assert children == 8
    assert set(Path(tempfile.gettempdir()).glob("enat-search-*")) <= scratch_before  # scratch removed
    # AWS keys were in the environment: Tune copies them to its trials unless enat moved them.
    secret_nowhere(s3_keys_in_env.secret_key, tmp_path)
