"""Where a training run's things live on storage, and what its checkpoint markers say.

Layout under a storage root:

    runs/<run>/                          run_url(root, run)
      lease.json                         held by the job training the run (run_lease)
      checkpoints/step-<n>/              step_url(root, run, n): one checkpoint
        state/model.safetensors          the fp32 weights, whole tensors by parameter name
        state/optimizer.safetensors      AdamW's moments, likewise: any world size or ZeRO
                                         stage loads them (trainer/train_state.py)
        ema/                             the EMA weights as an exported model
                                         (`pipelines.model_io.load_model` loads it)
        train_config.json                the run's config
        checkpoint.json                  the marker, written last: step, optimizer step,
                                         data position, global batch, every file's sha256

The marker is what makes a checkpoint: object stores have no atomic folder rename, so
readers only consider step folders that have one (trainer/checkpoint.py writes, prunes and
restores checkpoints under that rule). The tokenizer trainer keeps other files in its step
folders but follows the same folder names and marker rule.

Everything here only reads (the lease aside), so evaluation and the cluster commands can
find a run's checkpoints without importing the trainer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from enat.models.errors import UserError
from enat.pipelines import storage
from enat.pipelines.config import LeaseConfig
from enat.pipelines.lease import Lease

RUNS_DIR = "runs"
CHECKPOINTS_DIR = "checkpoints"
MARKER = "checkpoint.json"
STATE_DIR = "state"
EMA_DIR = "ema"
TRAIN_CONFIG_NAME = "train_config.json"
TRACKING_NAME = "tracking.json"  # {"mlflow_run_id": ...}: the loop writes it, evaluations log there
STEP_FOLDER = re.compile(r"step-(\d+)")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete or does not fit the run that wants to resume from it."""


class NotARunFolder(UserError, ValueError):
    """A URL that should name a training run folder, `<root>/runs/<run>`, does not."""


def run_url(root: str, run: str) -> str:
    return storage.join(root, RUNS_DIR, run)


def run_lease(root: str, run: str, owner: str, config: LeaseConfig) -> Lease:
    """The run's lease: one job trains a run at a time (its cleanup and pruning assume it)."""
    return Lease(run_url(root, run), owner, f"run '{run}' ({run_url(root, run)})", config)


def split_run_url(url: str) -> tuple[str, str]:
    """(root, run) of a run folder URL, `<root>/runs/<run>`; NotARunFolder for anything else."""
    root, separator, run = url.rstrip("/").rpartition(f"/{RUNS_DIR}/")
    if not separator or not run:
        raise NotARunFolder(f"{url} is not a training run folder: expected <root>/{RUNS_DIR}/<run>")
    return root, run


def checkpoints_url(root: str, run: str) -> str:
    return storage.join(run_url(root, run), CHECKPOINTS_DIR)


def step_folder_name(step: int) -> str:
    return f"step-{step}"


def step_url(root: str, run: str, step: int) -> str:
    return storage.join(checkpoints_url(root, run), step_folder_name(step))


def checkpoint_label(url: str) -> str:
    """A short name for the model at `url`: `<run>-step-<n>` for a checkpoint's EMA export
    (`.../runs/<run>/checkpoints/step-<n>/ema`), else the folder's own name."""
    parts = url.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-1] == EMA_DIR:
        return f"{parts[-4]}-{parts[-2]}"
    return parts[-1]


@dataclass
class Checkpoint:
    url: str  # the step-<n> folder
    step: int
    meta: dict[str, Any]  # what its marker records

    @property
    def ema_url(self) -> str:
        return storage.join(self.url, EMA_DIR)


def _step_of(url: str) -> int | None:
    match = STEP_FOLDER.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def open_checkpoint(url: str) -> Checkpoint:
    """The complete checkpoint at `url` (a step-<n> folder), or CheckpointError."""
    marker = storage.join(url, MARKER)
    if not storage.exists(marker):
        raise CheckpointError(f"{url} is not a complete checkpoint (no {MARKER}): pick a step-<n> "
                              f"folder that has one")
    meta = json.loads(storage.read_bytes(marker))
    return Checkpoint(url.rstrip("/"), int(meta["step"]), meta)


def scan(root: str, run: str) -> tuple[list[Checkpoint], list[str]]:
    """(complete checkpoints by step, URLs of step folders without a marker), from one
    listing; folders without files (some S3 servers keep emptied folders) do not count."""
    url = checkpoints_url(root, run)
    fs, base = storage.filesystem(url)
    base = base.rstrip("/")
    names: dict[int, set[str]] = {}
    for path in (fs.find(base) if fs.exists(base) else []):
        folder, _, name = path[len(base) + 1 :].partition("/")
        step = _step_of(folder)
        if step is not None:
            names.setdefault(step, set()).add(name)
    complete, partial = [], []
    for step in sorted(names):
        folder = step_folder_name(step)
        if MARKER in names[step]:
            meta = json.loads(fs.cat_file(f"{base}/{folder}/{MARKER}"))
            complete.append(Checkpoint(storage.join(url, folder), step, meta))
        else:
            partial.append(storage.join(url, folder))
    return complete, partial


def latest(root: str, run: str) -> Checkpoint | None:
    complete, _ = scan(root, run)
    return complete[-1] if complete else None


def previous(checkpoint: Checkpoint, root: str, run: str) -> Checkpoint | None:
    """The run's newest complete checkpoint before `checkpoint` (the fallback from a damaged one)."""
    older = [c for c in scan(root, run)[0] if c.step < checkpoint.step]
    return older[-1] if older else None


def resume_target(root: str, run: str, resume: str) -> Checkpoint | None:
    """What a run starts from. `resume` is "auto" (the run's latest checkpoint, or none),
    "never" (a fresh start; an error if the run has checkpoints) or a step-<n> folder URL,
    which is used only while the run has no checkpoint of its own: a restarted run
    continues from its own progress, not again from that folder."""
    own = latest(root, run)
    if resume == "never" and own is not None:
        raise CheckpointError(f"run '{run}' already has checkpoints (latest {own.url}): use "
                              f"resume=auto to continue it, or another run name")
    if own is not None or resume in ("auto", "never"):
        return own
    return open_checkpoint(resume)
