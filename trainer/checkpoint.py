"""Checkpoints on storage: published atomically, pruned to the last few, restored.

Where a checkpoint's files live, and how readers find complete checkpoints, is
pipelines/runs.py's. A checkpoint exists once its marker does, so this module writes every
file first and the marker last (rank 0, once every rank has uploaded). A crash mid-save
leaves a folder without a marker, which no reader uses and the next start deletes. Pruning
removes a checkpoint's marker before its files, so a complete-looking folder never lacks a
file.

DeepSpeed saves to a local directory: each rank saves into its own temporary directory and
uploads what it wrote; on resume each rank downloads the shared files plus its own. Every
upload and download waits out an outage of the store (pipelines/s3_retry.py); one that lasts
past the retry window leaves an unmarked folder, which the rerun deletes before resuming.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from enat.models.config import ModelConfig
from enat.pipelines import model_io, runs, storage
from enat.pipelines.runs import Checkpoint, CheckpointError

FORMAT_VERSION = 2  # 2: the marker records every file's sha256


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

    def get(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(f"{self.path}/{name}", str(local))

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.path}/{name}")
        except FileNotFoundError:
            return None


def save(url: str, step: int, engine: Any, ema_model: Any, ema_config: ModelConfig,
         data_position: dict[str, Any], train_config: dict[str, Any], meta: dict[str, Any]) -> Checkpoint:
    """Collective: every rank calls it. Returns the published checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = _Folder(url)
    written: dict[str, str] = {}  # file name -> sha256 of what was uploaded
    with tempfile.TemporaryDirectory(prefix=f"enat-ckpt-{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=runs.DEEPSPEED_DIR, save_latest=False)
        for path in sorted((Path(tmp) / runs.DEEPSPEED_DIR).rglob("*")):
            if path.is_file():
                name = path.relative_to(tmp).as_posix()
                folder.put(path, name)
                written[name] = _sha256_file(path)
    small = {f"{runs.DATA_DIR}/rank-{rank:05d}.json": json.dumps(data_position).encode()}
    if rank == 0:
        weights = model_io.save_model(storage.join(url, runs.EMA_DIR), ema_model, ema_config,
                                      extra={"step": step})
        written[f"{runs.EMA_DIR}/{model_io.WEIGHTS_NAME}"] = weights  # save_model returns its sha256
        ema_config_name = f"{runs.EMA_DIR}/{model_io.CONFIG_NAME}"  # small: read back, hash what was stored
        written[ema_config_name] = hashlib.sha256(folder.read(ema_config_name)).hexdigest()
        small[runs.TRAIN_CONFIG_NAME] = json.dumps(train_config, indent=1).encode()
    for name, data in small.items():
        folder.write(name, data)
        written[name] = hashlib.sha256(data).hexdigest()
    every: list[dict[str, str]] = [{} for _ in range(world)]
    dist.all_gather_object(every, written)  # also the barrier: every rank has uploaded
    digests = {name: digest for files in every for name, digest in files.items()}
    info = {"format_version": FORMAT_VERSION, "step": step, "world_size": world, "time": time.time(),
            "files": sorted(digests), "sha256": digests, **meta}
    if rank == 0:
        storage.write_bytes(storage.join(url, runs.MARKER), json.dumps(info, indent=1).encode())
    dist.barrier()  # nobody moves on (or reports the checkpoint) before it is published
    return Checkpoint(url, step, info)


def check_resumable(checkpoint: Checkpoint, world_size: int, zero_stage: int, model: dict[str, Any]) -> None:
    """Fail with a clear message when this run cannot continue from `checkpoint`."""
    meta = checkpoint.meta
    if (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage):
        raise CheckpointError(
            f"{checkpoint.url} was written by {meta['world_size']} workers with ZeRO-{meta['zero_stage']}; "
            f"resume with the same (num_workers={meta['world_size']} zero_stage={meta['zero_stage']}) "
            f"or start a new run")
    saved = meta["model"]
    differ = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
    if differ:
        raise CheckpointError(f"{checkpoint.url} holds another model (differs in: {', '.join(differ)}); "
                              f"resume with its model config or start a new run")


def engine_files(checkpoint: Checkpoint, rank: int) -> list[str]:
    """The engine files rank `rank` downloads: the shared ones and its own ZeRO partition.
    Names come from the marker, which anyone who can write the bucket can edit: one that
    would land outside the download folder is refused."""
    own = f"zero_pp_rank_{rank}_"
    needed = [f for f in checkpoint.meta["files"] if f.startswith(f"{runs.DEEPSPEED_DIR}/")
              and ("zero_pp_rank_" not in f or posixpath.basename(f).startswith(own))]
    for name in needed:
        if ".." in name.split("/") or "\\" in name:
            raise CheckpointError(f"{checkpoint.url}: its marker lists '{name}', a path outside the "
                                  f"checkpoint folder; enat never writes such names: delete that step "
                                  f"folder to resume from the one before")
    return needed


# The non-tensor types DeepSpeed's engine files hold (found by loading its ZeRO 0-3
# checkpoints with weights_only=True): plain data, no behaviour on unpickling.
_ENGINE_FILE_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


def _refuses_code(path: Path, name: str) -> str | None:
    """DeepSpeed's load_checkpoint reads engine files with torch.load(weights_only=False),
    which calls whatever a pickle names: anyone who can write the bucket could run code on
    every rank. So each file must first load under torch's restricted unpickler (tensors,
    plain containers and the types above); the same bytes are then safe to hand over."""
    import importlib
    import pickle

    import torch

    allowed = []
    for dotted in _ENGINE_FILE_TYPES:
        module, _, attribute = dotted.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        return f"{name} cannot be read as tensors and plain data ({str(err).splitlines()[0][:160]})"
    return None


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


def load(checkpoint: Checkpoint, engine: Any, ema: Any) -> dict[str, Any] | None:
    """Collective: restore the engine and EMA; returns this rank's data position (or None).
    Every file is checked against the sha256 its marker recorded before anything is loaded:
    a damaged checkpoint, or an engine file that would run code when unpickled, raises
    CorruptCheckpoint on every rank and changes nothing."""
    rank = dist.get_rank()
    needed = engine_files(checkpoint, rank)
    expected = checkpoint.meta.get("sha256", {})  # format-1 markers have none
    folder, problems = _Folder(checkpoint.url), []
    with tempfile.TemporaryDirectory(prefix=f"enat-resume-{rank}-") as tmp:
        for name in needed:
            try:
                folder.get(name, Path(tmp) / name)
            except FileNotFoundError:
                problems.append(f"{name} is missing")
                continue
            if name in expected and _sha256_file(Path(tmp) / name) != expected[name]:
                problems.append(f"{name} does not match its sha256")
            elif refused := _refuses_code(Path(tmp) / name, name):
                problems.append(refused)
        small = {name: folder.read(name) for name in (f"{runs.EMA_DIR}/{model_io.WEIGHTS_NAME}",
                                                       f"{runs.DATA_DIR}/rank-{rank:05d}.json")}
        for name, data in small.items():
            if data is None and name in expected:
                problems.append(f"{name} is missing")
            elif data is not None and name in expected and hashlib.sha256(data).hexdigest() != expected[name]:
                problems.append(f"{name} does not match its sha256")
        _check_intact(checkpoint, problems)
        path, _ = engine.load_checkpoint(tmp, tag=runs.DEEPSPEED_DIR, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state from {checkpoint.url}")
    ema.load_state_dict(load_safetensors(small[f"{runs.EMA_DIR}/{model_io.WEIGHTS_NAME}"]))
    data = small[f"{runs.DATA_DIR}/rank-{rank:05d}.json"]
    return json.loads(data) if data is not None else None

