"""Models: the VQGAN tokenizer, the NAT (U-ViT) baseline, ENAT, and reference-checkpoint loading.

The configs import eagerly (they are plain dataclasses); the torch modules load on first use
(PEP 562), so reading a config or answering `enat --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from enat.models.config import ENATConfig, ModelConfig, NATConfig, VQGANConfig, build_config, config_to_dict

if TYPE_CHECKING:
    from enat.models.build import build_model
    from enat.models.convert import (
        CheckpointMismatch,
        config_from_reference,
        convert_enat,
        convert_uvit,
        convert_vqgan,
        load_reference_checkpoint,
    )
    from enat.models.enat import ENAT, ENATOutput, ReuseState
    from enat.models.layers import Condition
    from enat.models.uvit import UViT
    from enat.models.vqgan import VQGAN

_LAZY = {
    "build_model": "build", "CheckpointMismatch": "convert", "config_from_reference": "convert",
    "convert_enat": "convert", "convert_uvit": "convert", "convert_vqgan": "convert",
    "load_reference_checkpoint": "convert", "ENAT": "enat", "ENATOutput": "enat", "ReuseState": "enat",
    "Condition": "layers", "UViT": "uvit", "VQGAN": "vqgan",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'enat.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"enat.models.{_LAZY[name]}"), name)


__all__ = [
    "ENAT", "VQGAN", "CheckpointMismatch", "Condition", "ENATConfig", "ENATOutput", "ModelConfig",
    "NATConfig", "ReuseState", "UViT", "VQGANConfig", "build_config", "build_model", "config_from_reference",
    "config_to_dict", "convert_enat", "convert_uvit", "convert_vqgan", "load_reference_checkpoint",
]
