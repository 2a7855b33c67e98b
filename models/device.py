"""Run-time device choice and bf16 capability, shared by training, sampling and evaluation."""

from __future__ import annotations

import torch

from enat.models.typed_config import ConfigError


def pick_device(choice: str) -> torch.device:
    """"auto" = cuda when a GPU is visible, else cpu; an explicit cuda without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bad value for 'device': cuda requested but no GPU is visible; use device=auto")
    return torch.device(choice)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (GPUs that say so; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = [getattr(torch.cpu, name, lambda: False) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in native)
