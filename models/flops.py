"""FLOPs of one whole generation, counted by torch.utils.flop_counter (not by formula).

Counted for a single image: T steps with classifier-free guidance included as the
strategy asks (the null-condition row doubles each step's batch), optionally plus the
tokenizer's decoder. Convention: one multiply-add = 2 FLOPs (FlopCounterMode's).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from enat.models.generate import generate
from enat.models.layers import Condition
from enat.models.strategy import Strategy


def example_condition(config, batch: int = 1) -> Condition:
    """A valid condition for `config` (class 0, or a short all-real context)."""
    if config.text_conditioned:
        length = config.context_len
        return torch.zeros(batch, length, config.context_dim), torch.ones(batch, length, dtype=torch.bool)
    return torch.zeros(batch, dtype=torch.long)


def generation_flops(model: nn.Module, strategy: Strategy, decoder: nn.Module | None = None,
                     reuse: bool = True) -> int:
    """FLOPs to generate one image; with `decoder` (a VQGAN), decoding included."""
    generator = torch.Generator().manual_seed(0)
    cond = example_condition(model.config)
    counter = FlopCounterMode(display=False)
    with counter:
        ids = generate(model, cond, strategy, generator, reuse=reuse)
        if decoder is not None:
            with torch.no_grad():
                decoder.decode(ids)
    return counter.get_total_flops()
