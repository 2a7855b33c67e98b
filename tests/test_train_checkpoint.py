"""Checkpoint folders on storage: only marked folders count, pruning, crash leftovers, the
checks that refuse a checkpoint the run cannot continue from (local and SeaweedFS), and the
global batch kept across world sizes."""

from __future__ import annotations

import json

import pytest

from enat.pipelines import runs, storage
from enat.pipelines.runs import CheckpointError
from enat.trainer import checkpoint
from enat.trainer.config import TrainConfig
from enat.trainer.resume import BatchDoesNotSplit, batch_plan


def fake_checkpoint(root: str, run: str, step: int, complete: bool = True, version: int = 3) -> str:
    url = runs.step_url(root, run, step)
    files = ["state/model.safetensors"]
    for name in files:
        storage.write_bytes(storage.join(url, name), b"x")
    if complete:
        meta = {"format_version": version, "step": step, "world_size": 2, "zero_stage": 2,
                "model": {"kind": "enat", "width": 64}, "files": files}
        storage.write_bytes(storage.join(url, runs.MARKER), json.dumps(meta).encode())
    return url


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3_bucket"), "root")


def test_only_marked_folders_are_checkpoints_and_pruning_keeps_the_newest(root):
    for step in (10, 20, 30):
        fake_checkpoint(root, "r", step)
    half = fake_checkpoint(root, "r", 40, complete=False)  # a crash during the save of step 40
    complete, partial = runs.scan(root, "r")
    assert [c.step for c in complete] == [10, 20, 30] and partial == [half]
    assert runs.latest(root, "r").step == 30
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        runs.open_checkpoint(half)

    removed = checkpoint.prune(root, "r", keep_last=2)
    assert removed == [runs.step_url(root, "r", 10)]
    assert not storage.exists(storage.join(runs.step_url(root, "r", 10), runs.MARKER))
    assert checkpoint.clean_partial(root, "r") == [half]
    complete, partial = runs.scan(root, "r")
    assert [c.step for c in complete] == [20, 30] and partial == []
    assert runs.open_checkpoint(runs.step_url(root, "r", 30)).meta["zero_stage"] == 2
    assert runs.latest(root, "other-run") is None


def test_resume_checks_name_what_differs(tmp_path):
    saved = runs.open_checkpoint(fake_checkpoint(str(tmp_path), "r", 5))
    checkpoint.check_resumable(saved, {"kind": "enat", "width": 64})
    with pytest.raises(CheckpointError, match="holds another model \\(differs in: width\\)"):
        checkpoint.check_resumable(saved, {"kind": "enat", "width": 96})
    older = runs.open_checkpoint(fake_checkpoint(str(tmp_path), "r", 6, version=2))
    with pytest.raises(CheckpointError, match="written by an older enat \\(checkpoint format 2"):
        checkpoint.check_resumable(older, {"kind": "enat", "width": 64})


def test_the_global_batch_is_kept_on_any_world_size_by_grad_accum():
    config = TrainConfig(batch_size=6, grad_accum=1)
    assert batch_plan(config, world=2, saved_global_batch=None) == (12, 1)  # a new run
    assert batch_plan(config, world=1, saved_global_batch=12) == (12, 2)  # resumed on fewer workers
    assert batch_plan(config, world=2, saved_global_batch=24) == (24, 2)
    with pytest.raises(BatchDoesNotSplit, match="global batch of 12 samples does not split into "
                                                "micro-batches of batch_size=6 on 4 workers"):
        batch_plan(config, world=4, saved_global_batch=12)
    changed = TrainConfig(batch_size=6, global_batch=24)  # the user changes it on purpose
    assert batch_plan(changed, world=4, saved_global_batch=12) == (24, 1)
    assert batch_plan(TrainConfig(batch_size=6, grad_accum=3), world=2, saved_global_batch=None) == (36, 3)


def test_run_urls_name_the_run_and_step():
    step = runs.step_url("s3://b/demo", "r", 4)
    assert step == "s3://b/demo/runs/r/checkpoints/step-4"
    assert runs.split_run_url(runs.run_url("s3://b/demo", "r")) == ("s3://b/demo", "r")
    with pytest.raises(ValueError, match="not a training run folder"):
        runs.split_run_url("s3://b/demo/r")
    assert runs.checkpoint_label(storage.join(step, runs.EMA_DIR)) == "r-step-4"
    assert runs.checkpoint_label("s3://b/tokenizers/vq") == "vq"
