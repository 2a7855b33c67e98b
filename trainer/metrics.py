"""Throughput figures of a training run: model FLOPs per sample, matmul peak, MFU.

MFU = model FLOPs per second achieved / the peak this device reaches on a large matmul
in the dtype in use, measured once per process (a 2048x2048 matmul), not a datasheet
number: on CPUs the datasheet peak is meaningless and on GPUs the measured one is honest.
Model FLOPs are counted by torch.utils.flop_counter (one multiply-add = 2 FLOPs) on one
training micro-step at the mean mask ratio: forward + backward of the trained model, plus
`reuse_prob` times the EMA forward that builds ENAT's reuse state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from enat.models.config import MaskingConfig

_PEAKS: dict[tuple[str, torch.dtype, int, int], float] = {}


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a size x size matmul on `device` in `dtype` (cached per process and size)."""
    key = (str(device), dtype, size, repeats)
    if key not in _PEAKS:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _PEAKS[key] = 2 * size**3 * repeats / (time.perf_counter() - started)
    return _PEAKS[key]


def train_flops_per_sample(model: nn.Module, masking: MaskingConfig, reuse: bool,
                           autocast: Callable[[], AbstractContextManager], device: torch.device,
                           batch: int = 2) -> float:
    """Model FLOPs of one training sample (see the module docstring). Leaves no gradients."""
    from enat.models.flops import example_condition

    config = model.config
    length = config.seq_len
    masked = max(1, min(length - 1, round(masking.beta_a / (masking.beta_a + masking.beta_b) * length)))
    ids = torch.randint(0, config.codebook_size, (batch, length), device=device)
    ids[:, :masked] = config.mask_id
    cond = example_condition(config, batch)
    cond = tuple(c.to(device) for c in cond) if isinstance(cond, tuple) else cond.to(device)
    counter = FlopCounterMode(display=False)
    with counter, autocast():
        out = model(ids, cond)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().sum().backward()
    train = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    prev = 0
    if reuse:
        with FlopCounterMode(display=False) as counter, autocast(), torch.no_grad():
            prev_ids = ids.clone()
            prev_ids[:, : (masked + length) // 2] = config.mask_id  # about half the visible re-masked
            model(prev_ids, cond)
        prev = counter.get_total_flops() * masking.reuse_prob
    return (train + prev) / batch


@dataclass
class Meter:
    """Sums over one logging interval."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    samples: int = 0  # global (all ranks)
    loss_sum: float = 0.0
    loss_count: int = 0
    data_wait: float = 0.0

    def rates(self, seq_len: int, flops_per_sample: float, peak: float, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        samples_per_s = self.samples / elapsed
        return {
            "samples_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * seq_len,
            "mfu": samples_per_s * flops_per_sample / (peak * world) if peak > 0 else 0.0,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_s": self.data_wait / max(self.steps, 1),
            "data_wait_frac": self.data_wait / elapsed,
        }
