"""A freshly initialised model for a config."""

from __future__ import annotations

from torch import nn

from enat.models.config import ENATConfig, ModelConfig, NATConfig, VQGANConfig
from enat.models.enat import ENAT
from enat.models.uvit import UViT
from enat.models.vqgan import VQGAN


def build_model(config: ModelConfig) -> nn.Module:
    if isinstance(config, ENATConfig):
        return ENAT(config)
    if isinstance(config, NATConfig):
        return UViT(config)
    if isinstance(config, VQGANConfig):
        return VQGAN(config)
    raise TypeError(f"not a model config: {type(config).__name__}")
