"""Full-size reference checkpoints convert onto our models (shapes only, on the meta device),
and the model presets in configs/models build and match the paper sizes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from enat.models import (
    CheckpointMismatch,
    build_config,
    build_model,
    config_from_reference,
    convert_enat,
    convert_uvit,
    convert_vqgan,
)
from enat.models.convert import ENAT_DEAD_KEYS

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("ENAT_REFERENCE_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))
SHAPES_FILE = FIXTURES / "full_size_state_dict_shapes.json"
PRESETS = sorted((REPO / "configs" / "models").glob("*.yaml"))

# Reference builder -> (kind for config_from_reference, converter, keys dropped on purpose).
BUILDERS = {
    "DiT": ("enat", convert_enat, ENAT_DEAD_KEYS),
    "UViT": ("autonat_uvit", convert_uvit, ()),
    "VQModel": ("maskgit_vqgan", convert_vqgan, ()),
}
# Presets that must reproduce a full-size reference model exactly.
PAPER_PRESETS = {
    "enat-l": "ENAT-L_256",
    "enat-b": "ENAT-B_256",
    "enat-s": "ENAT-S_256",
    "autonat-l": "AutoNAT-L",
    "maskgit-vqgan-f16": "VQGAN_vq-f16-jax",
}


def load_entries() -> dict[str, dict]:
    if not SHAPES_FILE.is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    entries = json.loads(SHAPES_FILE.read_text())
    return {name: entry for name, entry in entries.items() if not name.startswith("_")}


def entry_names() -> list[str]:
    if not SHAPES_FILE.is_file():
        return []
    return [name for name in json.loads(SHAPES_FILE.read_text()) if not name.startswith("_")]


def builder_of(entry: dict) -> tuple:
    matches = [spec for word, spec in BUILDERS.items() if re.search(rf"\b{word}\b", entry["builder"])]
    assert len(matches) == 1, f"unknown reference builder: {entry['builder']}"
    return matches[0]


def meta_state_dict(entry: dict) -> dict[str, torch.Tensor]:
    return {item["key"]: torch.empty(item["shape"], device="meta") for item in entry["keys"]}


def load_converted(entry: dict, config) -> torch.nn.Module:
    _, convert, _ = builder_of(entry)
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(convert(meta_state_dict(entry), config), strict=True, assign=True)
    return model


@pytest.mark.parametrize("name", entry_names())
def test_full_size_checkpoint_converts(name: str) -> None:
    entry = load_entries()[name]
    kind, convert, dead = builder_of(entry)
    config = config_from_reference(kind, entry["config"])
    model = load_converted(entry, config)

    dead_params = sum(
        torch.Size(item["shape"]).numel()
        for item in entry["keys"]
        if any(re.fullmatch(pattern, item["key"]) for pattern in dead)
    )
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"] - dead_params
    assert all(p.device.type == "meta" for p in model.parameters())

    # Strictness: a stray reference key or a missing one is an error, not a silent skip.
    state_dict = meta_state_dict(entry)
    with pytest.raises(CheckpointMismatch, match="unmapped reference keys: extra.weight"):
        convert({**state_dict, "extra.weight": torch.empty(1, device="meta")}, config)
    first_key = next(iter(state_dict))
    with pytest.raises(CheckpointMismatch, match="missing"):
        convert({k: v for k, v in state_dict.items() if k != first_key}, config)
    # DataParallel prefixes and position_ids buffers are tolerated.
    wrapped = {f"module.{k}": v for k, v in state_dict.items()}
    wrapped["module.x.position_ids"] = torch.empty(1, 4, device="meta")
    assert convert(wrapped, config).keys() == convert(state_dict, config).keys()


def read_preset(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_on_meta(path: Path) -> None:
    config = build_config(read_preset(path))
    with torch.device("meta"):
        model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("preset,entry_name", sorted(PAPER_PRESETS.items()))
def test_paper_preset_matches_reference(preset: str, entry_name: str) -> None:
    entry = load_entries()[entry_name]
    config = build_config(read_preset(REPO / "configs" / "models" / f"{preset}.yaml"))
    load_converted(entry, config)  # strict: every key and shape must line up


def test_presets_cover_the_paper_sizes() -> None:
    assert {p.stem for p in PRESETS} >= {*PAPER_PRESETS, "tiny-tokenizer", "tiny-enat", "tiny-nat"}


def test_build_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'widht'.*allowed keys: .*width"):
        build_config({"kind": "enat", "widht": 64})
    with pytest.raises(ValueError, match="kind"):
        build_config({"kind": "gan"})
    with pytest.raises(ValueError, match="width"):
        build_config({"kind": "nat", "width": 100, "heads": 3})


def test_tiny_presets_fit_the_tiny_tokenizer() -> None:
    presets = REPO / "configs" / "models"
    tokenizer = build_config(read_preset(presets / "tiny-tokenizer.yaml"))
    assert tokenizer.grid_shape == (8, 8)
    for name in ("tiny-enat", "tiny-nat"):
        config = build_config(read_preset(presets / f"{name}.yaml"))
        assert config.codebook_size == tokenizer.codebook_size
        assert config.grid_shape == tokenizer.grid_shape
