"""The optimizer's state in a form that fits any world size and ZeRO stage.

DeepSpeed partitions the fp32 master weights and the AdamW moments across ranks, by a
layout that depends on the world size and the stage. A checkpoint stores them instead as
whole tensors per parameter name (what DeepSpeed's universal checkpoint holds too), so any
number of workers at any stage can load them: every rank hands over the full tensor and
keeps its own fragment. We use DeepSpeed's fragment API (deepspeed.utils
safe_get/set_full_*) rather than its universal-checkpoint converter: the converter needs
every rank's files on one machine and a second pass, and its pickles would have to be
vetted before loading, while whole tensors go straight into safetensors.

The weights themselves are loaded into the model before DeepSpeed wraps it (the engine
builds its fp32 copies from the model), so only the moments and the step count go in here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW that does the update: wrapped by ZeRO 1-3, the engine's own at stage 0."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _partitioned(engine: Any) -> bool:
    return engine.zero_optimization_stage() > 0


def adam_step(engine: Any) -> int:
    """Optimizer steps taken (AdamW's bias correction counts them); 0 before the first."""
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _whole(param: Tensor, value: Tensor) -> Tensor:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 leaves the module's tensor empty
    return value.detach().float().cpu().reshape(shape).clone()


def gather_weights(engine: Any) -> dict[str, Tensor]:
    """Collective: the fp32 master weights, whole, by parameter name, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: _whole(param, safe_get_full_fp32_param(param) if _partitioned(engine) else param)
            for name, param in engine.module.named_parameters()}


def gather_moments(engine: Any) -> dict[str, Tensor]:
    """Collective: every AdamW moment, whole, as "<moment>/<name>", on the CPU."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner, out = _inner_optimizer(engine), {}
    for name, param in engine.module.named_parameters():
        for key in MOMENTS:
            if _partitioned(engine):
                value = safe_get_full_optimizer_state(param, key)  # every rank takes part
            else:
                value = inner.state[param][key] if param in inner.state else torch.zeros_like(param)
            out[f"{key}/{name}"] = _whole(param, value)
    return out


def _materialize(engine: Any, step: int) -> None:
    """Give every tensor the optimizer updates its AdamW state (torch creates it lazily at the
    first step) with `step` steps taken, and point ZeRO-1/2's per-parameter views at it."""
    inner = _inner_optimizer(engine)
    # ZeRO-3 hands its flat fp32 partitions to AdamW one at a time, during the step only.
    updated = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) \
        or [tensor for group in inner.param_groups for tensor in group["params"]]
    for tensor in updated:
        state = inner.state[tensor]
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(tensor, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step))
    for param in engine.module.parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # ZeRO 1/2: this rank's fragment of the flat partition
            flat = inner.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, inner.state[flat])


def restore(engine: Any, moments: dict[str, Tensor], step: int) -> None:
    """Collective: load `moments` (from `gather_moments`, any world size and stage) and the step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _materialize(engine, step)
    inner = _inner_optimizer(engine)
    missing = [f"{key}/{name}" for name, _ in engine.module.named_parameters() for key in MOMENTS
               if f"{key}/{name}" not in moments]
    if missing:
        raise KeyError(f"the checkpoint has no optimizer state for {missing[0]} "
                       f"(and {len(missing) - 1} more)")
    for name, param in engine.module.named_parameters():
        for key in MOMENTS:
            value = moments[f"{key}/{name}"]
            if hasattr(param, "ds_id"):
                _set_zero3_fragment(param, value.to(engine.device), key)
            elif _partitioned(engine):
                safe_set_full_optimizer_state(param, value.to(engine.device), key)
            else:
                inner.state[param][key].copy_(value)


def _set_zero3_fragment(param: Tensor, value: Tensor, key: str) -> None:
    """What safe_set_full_optimizer_state does under ZeRO-3, for partitions padded at the end:
    DeepSpeed 0.19's version slices past the end of a tensor whose size does not divide by
    the world size."""
    optimizer = param._z3_optimizer
    fragment, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                          optim_state_key=key)
    start = fragment.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start: start + fragment.numel()]
    fragment.zero_()
    fragment[: piece.numel()].copy_(piece)


def set_schedule(engine: Any, step: int) -> None:
    """Put the LR scheduler (a LambdaLR) and the engine's counters where `step` steps leave them."""
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    engine.global_steps = step


def load_weights(model: torch.nn.Module, weights: dict[str, Tensor]) -> None:
    """Copy a checkpoint's whole fp32 weights into a model not yet wrapped by DeepSpeed."""
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        odd = sorted(set(params) ^ set(weights))
        raise KeyError(f"the checkpoint's weights do not fit the model (first difference: {odd[0]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
