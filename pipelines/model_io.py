"""Exported models on storage: a folder with `model.safetensors` and `config.json`.

This is how a trained tokenizer reaches pretokenization, and how a training run's EMA
weights reach evaluation, without DeepSpeed or pickle. The model's id is its config kind
plus the first 12 hex digits of the weights' sha256, so shards record exactly which
weights made them. `load_tokenizer` also reads a released MaskGIT VQGAN checkpoint file,
converted as it loads (models/convert.py).

Domain classifiers (models/classifier.py: the FID extractor, the tokenizer's perceptual
network) are saved as `extractor.safetensors` + `extractor.json` (classes, width,
resolution, held-out accuracy), with the id `domain-<sha12 of the weights>`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from enat.models import VQGANConfig, build_config, build_model, config_to_dict, load_reference_checkpoint
from enat.models.classifier import DomainNet
from enat.models.config import ModelConfig
from enat.models.errors import MissingInput, UserError
from enat.pipelines import storage

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CLASSIFIER_WEIGHTS = "extractor.safetensors"
CLASSIFIER_META = "extractor.json"
# A tokenizer URL ending in one of these is a released checkpoint file, not an exported folder.
REFERENCE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")
DEFAULT_REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs/models/maskgit-vqgan-f16.yaml"


class ClassifierMismatch(UserError, ValueError):
    """A domain classifier's weights are not the ones its metadata names."""


class NotATokenizer(UserError, ValueError):
    """A tokenizer URL holds another kind of model than a VQGAN."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    sha256: str  # of the safetensors bytes
    url: str

    @property
    def model_id(self) -> str:
        return f"{config_to_dict(self.config)['kind']}-{self.sha256[:12]}"


def save_model(url: str, model: nn.Module, config: ModelConfig, extra: dict | None = None) -> str:
    """Publish weights and config under `url` (weights first, config last: a folder with a
    config.json is complete). Returns the weights' sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state)
    storage.write_bytes(storage.join(url, WEIGHTS_NAME), data)
    meta = {"model": config_to_dict(config), **(extra or {})}
    storage.write_bytes(storage.join(url, CONFIG_NAME), json.dumps(meta, indent=1).encode())
    return hashlib.sha256(data).hexdigest()


def load_model(url: str, device: str | torch.device = "cpu") -> LoadedModel:
    """The model saved by `save_model`, in eval mode on `device`."""
    config_url = storage.join(url, CONFIG_NAME)
    if not storage.exists(config_url):
        raise MissingInput(f"no exported model at {url} (expected {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}); train or export one first")
    meta = json.loads(storage.read_bytes(config_url))
    config = build_config(meta["model"])
    data = storage.read_bytes(storage.join(url, WEIGHTS_NAME))
    model = build_model(config)
    model.load_state_dict(load_safetensors(data), strict=True)
    return LoadedModel(model.to(device).eval(), config, hashlib.sha256(data).hexdigest(), url)


def load_tokenizer(url: str, config_path: str = "", device: str | torch.device = "cpu") -> LoadedModel:
    """A VQGAN as a LoadedModel: an exported folder, or a released MaskGIT VQGAN checkpoint
    file converted with models.convert (config: `config_path`, default maskgit-vqgan-f16)."""
    if not url.endswith(REFERENCE_SUFFIXES):
        loaded = load_model(url, device)
        if not isinstance(loaded.config, VQGANConfig):
            raise NotATokenizer(f"{url} holds a {type(loaded.config).__name__}, not a VQGAN tokenizer")
        return loaded
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise MissingInput(f"no tokenizer checkpoint at {url}") from None
    if url.endswith(".safetensors"):
        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    preset = Path(config_path) if config_path else DEFAULT_REFERENCE_CONFIG
    config = build_config(yaml.safe_load(preset.read_text()))
    model = load_reference_checkpoint("maskgit_vqgan", state, config).to(device)
    return LoadedModel(model, config, hashlib.sha256(data).hexdigest(), url)


def classifier_id(weights: bytes) -> str:
    return f"domain-{hashlib.sha256(weights).hexdigest()[:12]}"


def save_classifier(url: str, net: DomainNet, meta: dict) -> dict:
    """Publish a trained classifier (weights first, metadata last); returns the metadata
    with its `id`. `meta` must hold `classes`, `width` and `resolution`."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state)
    meta = {"id": classifier_id(weights), **meta}
    storage.write_bytes(storage.join(url, CLASSIFIER_WEIGHTS), weights)
    storage.write_bytes(storage.join(url, CLASSIFIER_META), json.dumps(meta, indent=1).encode())
    return meta


def load_classifier(url: str, device: str | torch.device = "cpu") -> tuple[DomainNet, dict]:
    """The classifier saved at `url` (eval mode) and its metadata; the weights must match the id."""
    meta_url = storage.join(url, CLASSIFIER_META)
    if not storage.exists(meta_url):
        raise MissingInput(f"no domain classifier at {url} (expected {CLASSIFIER_META}); "
                           f"train one with `enat eval train-features`")
    meta = json.loads(storage.read_bytes(meta_url))
    data = storage.read_bytes(storage.join(url, CLASSIFIER_WEIGHTS))
    if classifier_id(data) != meta["id"]:
        raise ClassifierMismatch(f"domain classifier at {url}: weights do not match the id {meta['id']} in "
                         f"{CLASSIFIER_META} (a partial or edited copy); retrain or recopy it")
    net = DomainNet(len(meta["classes"]), meta["width"])
    net.load_state_dict(load_safetensors(data), strict=True)
    return net.to(device).eval(), meta
