"""Checkpoint folders on storage: only marked folders count, pruning, crash leftovers, and
the checks that refuse a checkpoint the run cannot continue from (local and SeaweedFS)."""

from __future__ import annotations

import json

import pytest

from enat.pipelines import runs, storage
from enat.pipelines.runs import CheckpointError
from enat.trainer import checkpoint


def fake_checkpoint(root: str, run: str, step: int, complete: bool = True) -> str:
    url = runs.step_url(root, run, step)
    files = ["deepspeed/mp_rank_00_model_states.pt"]
    for name in files:
        storage.write_bytes(storage.join(url, name), b"x")
    if complete:
        meta = {"step": step, "world_size": 2, "zero_stage": 2, "model": {"kind": "enat", "width": 64},
                "files": files}
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
    checkpoint.check_resumable(saved, 2, 2, {"kind": "enat", "width": 64})
    with pytest.raises(CheckpointError, match="written by 2 workers with ZeRO-2; resume with the same"):
        checkpoint.check_resumable(saved, 4, 2, {"kind": "enat", "width": 64})
    with pytest.raises(CheckpointError, match="holds another model \\(differs in: width\\)"):
        checkpoint.check_resumable(saved, 2, 2, {"kind": "enat", "width": 96})


def test_marker_names_outside_the_folder_are_refused():
    files = ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema/model.safetensors"]
    good = runs.Checkpoint("s3://b/runs/r/checkpoints/step-4", 4, {"files": files})
    assert checkpoint.engine_files(good, 1) == [files[0], files[2]]
    for evil in ("deepspeed/../../../home/user/.bashrc", "deepspeed/..\\..\\x"):
        bad = runs.Checkpoint(good.url, 4, {"files": [*files, evil]})
        with pytest.raises(CheckpointError, match="a path outside the checkpoint folder"):
            checkpoint.engine_files(bad, 0)


def test_run_urls_name_the_run_and_step():
    step = runs.step_url("s3://b/demo", "r", 4)
    assert step == "s3://b/demo/runs/r/checkpoints/step-4"
    assert runs.split_run_url(runs.run_url("s3://b/demo", "r")) == ("s3://b/demo", "r")
    with pytest.raises(ValueError, match="not a training run folder"):
        runs.split_run_url("s3://b/demo/r")
    assert runs.checkpoint_label(storage.join(step, runs.EMA_DIR)) == "r-step-4"
    assert runs.checkpoint_label("s3://b/tokenizers/vq") == "vq"
