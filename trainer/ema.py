"""Exponential moving average of the trained weights, correct under every ZeRO stage.

The EMA is a full, unpartitioned fp32 copy of the model on every rank: ENAT's reuse
training runs it forward each step (on the rank's own batch), and evaluation loads it
without DeepSpeed. Under ZeRO-3 the trained parameters are partitioned across ranks (each
holds a shard, the module's tensors are empty), so the update gathers them a group at a
time with deepspeed.zero.GatheredParameters; under ZeRO 0-2 every rank holds them whole.
Every rank applies the same update to the same values, so the copies stay identical.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Elements gathered at once under ZeRO-3: bounds the extra memory of an update.
GATHER_BUDGET = 50_000_000


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        """`model` must be the freshly built (not yet DeepSpeed-wrapped) model."""
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @staticmethod
    def _partitioned(params: list[nn.Parameter]) -> bool:
        return any(hasattr(p, "ds_id") for p in params)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * source, for every parameter."""
        named = list(source.named_parameters())
        targets = dict(self.model.named_parameters())
        weight = 1.0 - self.decay
        if not self._partitioned([p for _, p in named]):
            for name, param in named:
                targets[name].lerp_(param.detach().float(), weight)
            return
        import deepspeed

        group: list[tuple[str, nn.Parameter]] = []
        size = 0
        for index, (name, param) in enumerate(named):
            group.append((name, param))
            size += param.ds_numel
            if size >= GATHER_BUDGET or index == len(named) - 1:
                with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                    for group_name, group_param in group:
                        targets[group_name].lerp_(group_param.detach().float(), weight)
                group, size = [], 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
