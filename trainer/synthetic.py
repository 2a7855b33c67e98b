"""Synthetic token shards with learnable structure: smoke runs, tests and benchmarks of the
training loop without a tokenizer or images.

Each class has a fixed random token grid; a sample is its class's grid with a share of the
positions replaced by random ids, plus the mirrored grid as its flipped copy. A model that
learns the class patterns predicts most masked ids, so the loss falls far below
ln(codebook_size). Caption data gets a class-dependent embedding as its "text".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enat.pipelines import storage
from enat.pipelines.shards import Manifest, TokenSample, shard_name, write_manifest, write_shard


@dataclass
class SyntheticSpec:
    grid: int = 8
    codebook_size: int = 256
    num_classes: int = 10
    samples: int = 512
    per_shard: int = 64
    noise: float = 0.25  # share of positions replaced by random ids
    text_dim: int = 0  # > 0: caption data with [text_len, text_dim] embeddings instead of labels
    text_len: int = 8
    tokenizer_id: str = "synthetic-000000000000"
    seed: int = 0


def make_samples(spec: SyntheticSpec) -> list[TokenSample]:
    rng = np.random.default_rng(spec.seed)
    patterns = rng.integers(0, spec.codebook_size, (spec.num_classes, spec.grid, spec.grid))
    directions = rng.normal(size=(spec.num_classes, spec.text_dim)) if spec.text_dim else None
    samples = []
    for index in range(spec.samples):
        label = int(rng.integers(spec.num_classes))
        noisy = rng.random((spec.grid, spec.grid)) < spec.noise
        tokens = np.where(noisy, rng.integers(0, spec.codebook_size, noisy.shape), patterns[label])
        sample = TokenSample(key=f"{index:08d}", tokens=tokens.astype(np.uint16),
                             flip_tokens=np.ascontiguousarray(tokens[:, ::-1]).astype(np.uint16),
                             meta={"source": "synthetic", "class": label})
        if directions is None:
            sample.label = label
        else:
            length = int(rng.integers(1, spec.text_len + 1))
            text = np.zeros((spec.text_len, spec.text_dim), np.float16)
            text[:length] = directions[label] + 0.1 * rng.normal(size=(length, spec.text_dim))
            sample.caption, sample.text = f"class {label}", text
            sample.text_mask = np.arange(spec.text_len) < length
        samples.append(sample)
    return samples


def write_synthetic_shards(url: str, spec: SyntheticSpec, split: str = "train") -> Manifest:
    """Shards + manifest.json under `url` (the folder `data.url` points at)."""
    samples = make_samples(spec)
    entries = []
    for index, start in enumerate(range(0, len(samples), spec.per_shard)):
        shard_url = storage.join(url, split, shard_name(index))
        entries.append(write_shard(shard_url, samples[start : start + spec.per_shard]))
    manifest = Manifest(
        tokenizer_id=spec.tokenizer_id, tokenizer_sha256="0" * 64, resolution=spec.grid * 4,
        grid=[spec.grid, spec.grid], codebook_size=spec.codebook_size, source="synthetic",
        classes=None if spec.text_dim else [f"class-{c}" for c in range(spec.num_classes)],
        text_encoder=({"id": "synthetic", "dim": spec.text_dim, "max_len": spec.text_len}
                      if spec.text_dim else None),
        splits={split: entries}, totals={split: len(samples)}, tool_version="synthetic")
    write_manifest(url, manifest)
    return manifest
