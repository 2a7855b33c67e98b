"""The learning-rate schedule of both trainers (generator and tokenizer): a linear warmup,
then either constant or a cosine decay that reaches its floor at the last step."""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["constant", "cosine"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: Decay = "cosine",
                  min_ratio: float = 0.0) -> float:
    """The share of the peak learning rate at optimizer step `step` (1-based): step/warmup
    during the warmup, then 1 ("constant") or a cosine from 1 down to `min_ratio` at
    `total_steps` (and `min_ratio` after it)."""
    if step <= warmup_steps:
        return step / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
