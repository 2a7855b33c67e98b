"""Models: the VQGAN tokenizer, the NAT (U-ViT) baseline, ENAT, and reference-checkpoint loading."""

from __future__ import annotations

from torch import nn

from enat.models.config import (
    ENATConfig,
    ModelConfig,
    NATConfig,
    VQGANConfig,
    build_config,
    config_to_dict,
)
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


def build_model(config: ModelConfig) -> nn.Module:
    """The freshly initialised model for a config."""
    if isinstance(config, ENATConfig):
        return ENAT(config)
    if isinstance(config, NATConfig):
        return UViT(config)
    if isinstance(config, VQGANConfig):
        return VQGAN(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


__all__ = [
    "ENAT",
    "VQGAN",
    "CheckpointMismatch",
    "Condition",
    "ENATConfig",
    "ENATOutput",
    "ModelConfig",
    "NATConfig",
    "ReuseState",
    "UViT",
    "VQGANConfig",
    "build_config",
    "build_model",
    "config_from_reference",
    "config_to_dict",
    "convert_enat",
    "convert_uvit",
    "convert_vqgan",
    "load_reference_checkpoint",
]
