"""Checkpoints on storage: published atomically, pruned to the last few, restored on any
number of workers at any ZeRO stage.

Where a checkpoint's files live, and how readers find complete checkpoints, is
pipelines/runs.py's. A checkpoint exists once its marker does, so this module writes every
file first and the marker last. A crash mid-save leaves a folder without a marker, which no
reader uses and the next start deletes. Pruning removes a checkpoint's marker before its
files, so a complete-looking folder never lacks a file.

The training state is stored as whole tensors by parameter name (trainer/train_state.py
gathers them from DeepSpeed's partitions): fp32 weights and AdamW moments in safetensors,
the step, optimizer step and data position (global samples consumed, and the global batch)
in the marker. So a run written by W workers at ZeRO-s continues on W' workers at ZeRO-s'.
Rank 0 writes everything; on resume every rank reads the files, checks them against the
sha256 the marker recorded, and keeps its own fragment. safetensors holds only tensors:
nothing read back can run code. Every upload and download waits out an outage of the store
(pipelines/s3_retry.py); one that lasts past the retry window leaves an unmarked folder,
which the rerun deletes before resuming.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from enat.models.config import ModelConfig
from enat.pipelines import model_io, runs, storage
from enat.pipelines.runs import Checkpoint, CheckpointError
from enat.trainer import train_state

FORMAT_VERSION = 3  # 3: whole-tensor state any world size loads; 2: DeepSpeed's own files
MODEL_NAME = f"{runs.STATE_DIR}/model.safetensors"
OPTIMIZER_NAME = f"{runs.STATE_DIR}/optimizer.safetensors"
EMA_NAME = f"{runs.EMA_DIR}/{model_io.WEIGHTS_NAME}"


class CorruptCheckpoint(CheckpointError):
    """A file of a marked checkpoint is missing or differs from the sha256 its marker recorded."""


def _remove(url: str) -> None:
    storage.remove(storage.join(url, runs.MARKER))  # first: the folder stops being a checkpoint
    storage.remove(url, recursive=True)


def clean_partial(root: str, run: str) -> list[str]:
    """Delete step folders left without a marker by a crash. Only the run's one writer, the
    holder of its lease (runs.run_lease), may call it: another writer's checkpoint in
    progress has no marker yet either."""
    _, partial = runs.scan(root, run)
    for url in partial:
        storage.remove(url, recursive=True)
    storage.remove_temporaries(runs.checkpoints_url(root, run))
    return partial


def prune(root: str, run: str, keep_last: int) -> list[str]:
    """Keep the newest `keep_last` complete checkpoints; returns the URLs removed."""
    complete, _ = runs.scan(root, run)
    old = complete[:-keep_last] if keep_last > 0 else []
    for checkpoint in old:
        _remove(checkpoint.url)
    return [c.url for c in old]


class _Folder:
    """Files under one step folder, streamed to and from local files. They need no atomic
    write of their own (no temporary key and copy): the marker, written last, publishes them."""

    def __init__(self, url: str):
        self.fs, self.path = storage.filesystem(url)

    def put(self, local: Path, name: str) -> None:
        target = f"{self.path}/{name}"
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.put_file(str(local), target)

    def write(self, name: str, data: bytes) -> None:
        target = f"{self.path}/{name}"
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.pipe_file(target, data)

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.path}/{name}")
        except FileNotFoundError:
            return None


def save(url: str, step: int, engine: Any, ema_model: Any, ema_config: ModelConfig,
         train_config: dict[str, Any], meta: dict[str, Any]) -> Checkpoint:
    """Collective: every rank calls it (the state is gathered from every rank's partition);
    rank 0 writes the files and the marker. Returns the published checkpoint."""
    rank = dist.get_rank()
    weights = train_state.gather_weights(engine)
    moments = train_state.gather_moments(engine)
    adam_step = train_state.adam_step(engine)
    if rank == 0:
        folder, written = _Folder(url), {}
        with tempfile.TemporaryDirectory(prefix="enat-ckpt-") as tmp:
            for name, tensors in ((MODEL_NAME, weights), (OPTIMIZER_NAME, moments)):
                local = Path(tmp) / posixpath.basename(name)
                save_file(tensors, str(local))
                folder.put(local, name)
                written[name] = _sha256_file(local)
        written[EMA_NAME] = model_io.save_model(storage.join(url, runs.EMA_DIR), ema_model, ema_config,
                                                extra={"step": step})  # returns its sha256
        ema_config_name = f"{runs.EMA_DIR}/{model_io.CONFIG_NAME}"  # small: read back, hash what was stored
        written[ema_config_name] = hashlib.sha256(folder.read(ema_config_name)).hexdigest()
        config_bytes = json.dumps(train_config, indent=1).encode()
        folder.write(runs.TRAIN_CONFIG_NAME, config_bytes)
        written[runs.TRAIN_CONFIG_NAME] = hashlib.sha256(config_bytes).hexdigest()
        info = {"format_version": FORMAT_VERSION, "step": step, "adam_step": adam_step,
                "world_size": dist.get_world_size(), "time": time.time(), "files": sorted(written),
                "sha256": written, **meta}
        storage.write_bytes(storage.join(url, runs.MARKER), json.dumps(info, indent=1).encode())
    info_list = [info if rank == 0 else None]
    dist.broadcast_object_list(info_list, src=0)  # also the barrier: nobody moves on before it is published
    return Checkpoint(url, step, info_list[0])


def check_resumable(checkpoint: Checkpoint, model: dict[str, Any]) -> None:
    """Fail with a clear message when this run cannot continue from `checkpoint`."""
    meta = checkpoint.meta
    if meta.get("format_version", 1) < FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint.url} was written by an older enat (checkpoint format "
                              f"{meta.get('format_version', 1)}, DeepSpeed's own files; this one reads "
                              f"format {FORMAT_VERSION}): start a new run, or resume it with the enat "
                              f"that wrote it")
    saved = meta["model"]
    differ = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
    if differ:
        raise CheckpointError(f"{checkpoint.url} holds another model (differs in: {', '.join(differ)}); "
                              f"resume with its model config or start a new run")


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_intact(checkpoint: Checkpoint, problems: list[str]) -> None:
    """Collective: every rank raises CorruptCheckpoint if any rank found a problem, so all
    of them fall back together."""
    every: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, problems)
    found = sorted({problem for rank_problems in every for problem in rank_problems})
    if found:
        raise CorruptCheckpoint(f"{checkpoint.url} is damaged: {', '.join(found[:5])}"
                                + (f" and {len(found) - 5} more" if len(found) > 5 else ""))


@dataclass
class Restored:
    """A checkpoint's state, whole tensors: load `weights` into the model before DeepSpeed
    wraps it, then `train_state.restore(engine, moments, adam_step)`."""

    step: int
    adam_step: int
    weights: dict[str, Tensor]
    moments: dict[str, Tensor]
    ema: dict[str, Tensor]
    data: dict[str, Any]  # {"samples": global samples consumed, "global_batch": ...}


def load(checkpoint: Checkpoint) -> Restored:
    """Collective: read and check a checkpoint's state. Every file is checked against the
    sha256 its marker recorded before anything is used: a damaged checkpoint raises
    CorruptCheckpoint on every rank."""
    expected = checkpoint.meta.get("sha256", {})
    folder, problems, tensors = _Folder(checkpoint.url), [], {}
    for name in (MODEL_NAME, OPTIMIZER_NAME, EMA_NAME):
        data = folder.read(name)
        if data is None:
            problems.append(f"{name} is missing")
        elif hashlib.sha256(data).hexdigest() != expected.get(name):
            problems.append(f"{name} does not match its sha256")
        else:
            try:
                tensors[name] = load_safetensors(data)
            except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
                problems.append(f"{name} is not a safetensors file ({err.__class__.__name__})")
    _check_intact(checkpoint, problems)
    meta = checkpoint.meta
    return Restored(checkpoint.step, meta["adam_step"], tensors[MODEL_NAME], tensors[OPTIMIZER_NAME],
                    tensors[EMA_NAME], meta["data"])
