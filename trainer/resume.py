"""Where a run starts: its latest complete checkpoint (or the one `resume` names), restored on
however many workers the run has now, with the global batch it was trained with.

A checkpoint holds the global batch and the global samples consumed (trainer/data.py). On W
workers the loop takes micro-batches of `batch_size`, so grad_accum becomes
global_batch / (batch_size * W); a global batch that does not split so is a clear error
unless the user sets `global_batch` to a new value on purpose.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist

from enat.models.errors import UserError
from enat.pipelines import runs
from enat.trainer import checkpoint
from enat.trainer.checkpoint import Restored
from enat.trainer.config import TrainConfig


class BatchDoesNotSplit(UserError, ValueError):
    """The global batch is not a multiple of batch_size * workers."""


@dataclass
class Start:
    checkpoint: runs.Checkpoint | None
    restored: Restored | None
    step: int  # the last step trained (0: a new run)
    samples: int  # global samples consumed so far: where the data order continues
    global_batch: int
    grad_accum: int  # micro-steps per step on this many workers


def batch_plan(config: TrainConfig, world: int, saved_global_batch: int | None) -> tuple[int, int]:
    """(global batch, grad_accum) for `world` workers."""
    first = config.global_batch or config.batch_size * config.grad_accum * world
    wanted = config.global_batch or saved_global_batch or first
    per_step = config.batch_size * world
    if wanted % per_step:
        raise BatchDoesNotSplit(
            f"the run's global batch of {wanted} samples does not split into micro-batches of "
            f"batch_size={config.batch_size} on {world} workers ({per_step} per micro-step): choose workers "
            f"and batch_size whose product divides {wanted}, or set global_batch=<a multiple of {per_step}> "
            f"to change it")
    return wanted, wanted // per_step


def _target(config: TrainConfig, rank: int) -> runs.Checkpoint | None:
    """Rank 0 decides (and cleans up crash leftovers); everyone gets the same answer."""
    found: list = [None]
    if rank == 0:
        removed = checkpoint.clean_partial(config.root, config.run)
        if removed:
            print(f"removed {len(removed)} incomplete checkpoint folder(s): {', '.join(removed)}")
        try:
            found = [runs.resume_target(config.root, config.run, config.resume)]
        except runs.CheckpointError as err:
            found = [err]
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], Exception):
        raise found[0]
    return found[0]


def find_start(config: TrainConfig, model: dict) -> Start:
    """Collective: read the checkpoint to continue from, falling back past damaged ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    target = _target(config, rank)
    restored = None
    while target is not None:
        checkpoint.check_resumable(target, model)
        try:
            restored = checkpoint.load(target)
            break
        except checkpoint.CorruptCheckpoint as err:
            # Every rank got the same error (load checks collectively); only the run's own
            # checkpoints have an earlier one to fall back to.
            target = runs.previous(target, config.root, config.run) \
                if target.url.startswith(runs.checkpoints_url(config.root, config.run)) else None
            if target is None:
                raise
            if rank == 0:
                print(f"warning: {err}; resuming from the previous checkpoint {target.url}",
                      file=sys.stderr, flush=True)
    saved = restored.data if restored else {}
    global_batch, grad_accum = batch_plan(config, world, saved.get("global_batch"))
    if rank == 0 and restored is not None:
        print(f"resumed from {target.url} (step {restored.step}, written by {target.meta['world_size']} "
              f"workers at ZeRO-{target.meta['zero_stage']})", flush=True)
        if (global_batch, target.meta["world_size"]) != (saved["global_batch"], world) \
                or grad_accum != config.grad_accum:
            changed = f" (was {saved['global_batch']})" if global_batch != saved["global_batch"] else ""
            print(f"global batch {global_batch}{changed} on {world} workers: grad_accum {grad_accum} x "
                  f"batch_size {config.batch_size} per worker", flush=True)
    return Start(target if restored else None, restored, restored.step if restored else 0,
                 saved.get("samples", 0), global_batch, grad_accum)
