"""Sampling: a checkpoint's EMA weights + a strategy -> uint8 images, batched and seeded.

The model is an exported EMA folder (`pipelines.model_io` format); training writes one per
checkpoint at `{root}/runs/<run>/checkpoints/step-<n>/ema/`, and either that folder or the
step folder may be given. The tokenizer is an exported VQGAN (or a released checkpoint
file, as pretokenization accepts); when none is given it is found through the checkpoint:
the step folder's train_config.json names the training shards, whose manifest.json
records the tokenizer's URL and id (the id is checked against the loaded weights).

Conditions: class-balanced labels as ENAT evaluates (N // C images of every class, sorted by
class; the remainder goes to the first classes), or captions from a text file (one per line,
used in turn) embedded by pipelines/text_encoder.py for a text-conditioned model. A line
may be `caption<TAB>class name`: the class its caption shows, which evaluation uses for
class consistency (plain lines name no class). The class names of a class-conditional
model's ids come from its training shards' manifest (Sampler.class_names).

Randomness: batch i uses a generator seeded from (seed, i), so the same seed, batch size
and inputs give the same images on any machine and after a resumed run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from enat.evaluation.config import SampleConfig
from enat.evaluation.image_sets import decode_to_uint8
from enat.models.device import bf16_supported, pick_device
from enat.models.errors import MissingInput, UserError
from enat.models.generate import generate
from enat.models.strategy import Strategy
from enat.pipelines import runs, shards, storage
from enat.pipelines.model_io import CONFIG_NAME, load_model, load_tokenizer


class SamplingError(UserError, ValueError):
    """A checkpoint, tokenizer or condition that cannot be sampled from."""


@dataclass
class Sampler:
    model: nn.Module
    model_id: str
    checkpoint_url: str  # the exported EMA folder
    tokenizer: nn.Module
    tokenizer_id: str
    tokenizer_url: str
    device: torch.device
    autocast: torch.dtype | None  # None: plain fp32
    reuse: bool = True
    text_encoder: object | None = None  # pipelines.text_encoder.TextEncoder for text models
    class_names: list[str] | None = None  # the training shards' class names, when recorded

    @property
    def config(self):
        return self.model.config

    @property
    def resolution(self) -> int:
        return self.tokenizer.config.image_size


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 where the hardware runs it natively ("auto"), on request ("bf16"), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_supported(device) else None


def resolve_checkpoint(url: str) -> str:
    """The exported EMA folder of `url` (a step-<n> folder or the export itself)."""
    if storage.exists(storage.join(url, CONFIG_NAME)):
        return url
    ema = storage.join(url, runs.EMA_DIR)
    if storage.exists(storage.join(ema, CONFIG_NAME)):
        return ema
    raise MissingInput(f"no exported model at {url} or {ema}: pass a checkpoint folder "
                       f"(runs/<run>/checkpoints/step-<n>) or its ema/ export")


def training_manifest(ema_url: str) -> shards.Manifest | None:
    """The manifest of the shards the checkpoint at `ema_url` was trained on, when its step
    folder's train_config.json names them and they still exist."""
    step_url = ema_url.rstrip("/").removesuffix(f"/{runs.EMA_DIR}")
    train_config = storage.join(step_url, runs.TRAIN_CONFIG_NAME)
    data_url = ""
    if step_url != ema_url.rstrip("/") and storage.exists(train_config):
        data_url = json.loads(storage.read_bytes(train_config)).get("data", {}).get("url", "")
    if data_url and storage.exists(storage.join(data_url, shards.MANIFEST_NAME)):
        return shards.read_manifest(data_url)
    return None


def find_tokenizer(ema_url: str) -> tuple[str, str | None]:
    """(tokenizer URL, expected tokenizer id or None) recorded for the checkpoint at `ema_url`."""
    meta = json.loads(storage.read_bytes(storage.join(ema_url, CONFIG_NAME)))
    if meta.get("tokenizer_url"):
        return meta["tokenizer_url"], meta.get("tokenizer_id")
    manifest = training_manifest(ema_url)
    if manifest is not None and manifest.tokenizer_url:
        return manifest.tokenizer_url, manifest.tokenizer_id
    raise SamplingError(f"cannot tell which tokenizer decodes {ema_url} (no train_config.json with "
                        f"data.url whose manifest records tokenizer_url): pass tokenizer=<URL>")


def load_sampler(checkpoint: str, tokenizer: str = "", device: str = "auto", precision: str = "auto",
                 reuse: bool = True, text_encoder: str = "minilm") -> Sampler:
    torch_device = pick_device(device)
    ema_url = resolve_checkpoint(checkpoint)
    expected_id = None
    if not tokenizer:
        tokenizer, expected_id = find_tokenizer(ema_url)
    loaded = load_model(ema_url, torch_device)
    if not hasattr(loaded.config, "mask_id"):
        raise SamplingError(f"{ema_url} holds a {type(loaded.config).__name__}, not a token transformer")
    vq = load_tokenizer(tokenizer, device=torch_device)
    if expected_id and vq.model_id != expected_id:
        raise SamplingError(f"tokenizer at {tokenizer} is {vq.model_id} but the checkpoint was trained on "
                            f"shards made with {expected_id}: pass the right tokenizer")
    if vq.config.codebook_size != loaded.config.codebook_size:
        raise SamplingError(f"tokenizer codebook {vq.config.codebook_size} != model's "
                            f"{loaded.config.codebook_size}: pass the tokenizer the model was trained with")
    encoder = None
    if loaded.config.text_conditioned:
        from enat.pipelines.config import TextEncoderConfig
        from enat.pipelines.text_encoder import TextEncoder

        encoder = TextEncoder(TextEncoderConfig(name=text_encoder, max_len=loaded.config.context_len),
                              device=str(torch_device))
        if encoder.info["dim"] != loaded.config.context_dim:
            raise SamplingError(f"text encoder {encoder.info['id']} gives {encoder.info['dim']}-d vectors "
                                f"but the model takes {loaded.config.context_dim}-d: pick its encoder")
    manifest = training_manifest(ema_url)
    return Sampler(loaded.model, loaded.model_id, ema_url, vq.model, vq.model_id, tokenizer, torch_device,
                   autocast_dtype(torch_device, precision), reuse, encoder,
                   manifest.classes if manifest is not None else None)


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """N // C of every class in class order, then one more each for the first N % C classes."""
    per_class = np.repeat(np.arange(num_classes), num_samples // num_classes)
    return np.concatenate([per_class, np.arange(num_samples % num_classes)]).astype(np.int64)


def read_captions(url: str) -> list[tuple[str, str | None]]:
    """(caption, class name or None) per non-empty line. A line `caption<TAB>class` names
    the class its caption shows (used for class consistency); a plain line names none."""
    try:
        lines = storage.read_bytes(url).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise SamplingError(f"captions file not found: {url}") from None
    captions = []
    for line in lines:
        caption, _, name = line.partition("\t")
        if caption.strip():
            captions.append((caption.strip(), name.strip() or None))
    if not captions:
        raise SamplingError(f"captions file {url} has no caption (one per line)")
    return captions


@dataclass
class Conditions:
    """What each sample is conditioned on: class labels or captions (with the class name
    each caption shows, where the captions file gives one)."""

    labels: np.ndarray | None = None
    captions: list[str] | None = None
    caption_classes: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.captions)

    def slice(self, start: int, stop: int) -> Conditions:
        if self.labels is not None:
            return Conditions(labels=self.labels[start:stop])
        return Conditions(captions=self.captions[start:stop],
                          caption_classes=None if self.caption_classes is None
                          else self.caption_classes[start:stop])


def make_conditions(sampler: Sampler, num_samples: int, captions_url: str = "") -> Conditions:
    if sampler.config.text_conditioned:
        if not captions_url:
            raise SamplingError("the model is text-conditioned: pass captions=<text file, one per line>")
        lines = read_captions(captions_url)
        chosen = [lines[i % len(lines)] for i in range(num_samples)]
        return Conditions(captions=[c for c, _ in chosen], caption_classes=[n for _, n in chosen])
    if captions_url:
        raise SamplingError("the model is class-conditional: captions apply to text-conditioned models only")
    return Conditions(labels=class_balanced_labels(num_samples, sampler.config.num_classes))


def model_condition(sampler: Sampler, conditions: Conditions):
    if conditions.labels is not None:
        return torch.from_numpy(conditions.labels).to(sampler.device)
    context, mask = sampler.text_encoder.encode(conditions.captions)
    return (torch.from_numpy(context).float().to(sampler.device), torch.from_numpy(mask).to(sampler.device))


def batch_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(repr(("sample", seed, index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generate_images(sampler: Sampler, strategy: Strategy, conditions: Conditions, seed: int,
                    index: int) -> Tensor:
    """uint8 [B, 3, R, R] for one batch of conditions (batch `index` of the run)."""
    generator = torch.Generator().manual_seed(batch_seed(seed, index))
    autocast = (torch.autocast(sampler.device.type, dtype=sampler.autocast) if sampler.autocast
                else contextlib.nullcontext())
    with autocast:
        ids = generate(sampler.model, model_condition(sampler, conditions), strategy, generator,
                       reuse=sampler.reuse)
        return decode_to_uint8(sampler.tokenizer, ids)


@dataclass
class SampleBatch:
    index: int
    start: int
    images: Tensor  # uint8 [B, 3, R, R] on the CPU
    conditions: Conditions


def iter_samples(sampler: Sampler, strategy: Strategy, conditions: Conditions, batch_size: int, seed: int,
                 progress: bool = True) -> Iterator[SampleBatch]:
    starts = range(0, len(conditions), batch_size)
    for index, start in enumerate(tqdm(starts, desc="sample", unit="batch", disable=not progress)):
        part = conditions.slice(start, start + batch_size)
        yield SampleBatch(index, start, generate_images(sampler, strategy, part, seed, index), part)


class GridCollector:
    """Keeps the few images a grid shows while samples stream past: one row per class
    (the first `rows` classes) with up to `columns` images each, or the first rows*columns
    images when there are no labels."""

    def __init__(self, rows: int = 10, columns: int = 8):
        self.rows, self.columns = rows, columns
        self.kept: dict[int, list[np.ndarray]] = {}

    def add(self, images: Tensor, labels: np.ndarray | None) -> None:
        for offset, image in enumerate(images.numpy()):
            if labels is None:
                key = sum(len(v) for v in self.kept.values()) // self.columns
            else:
                key = int(labels[offset])
            row = self.kept.get(key)
            if row is None and len(self.kept) >= self.rows:
                continue
            row = self.kept.setdefault(key, [])
            if len(row) < self.columns:
                row.append(image)

    def image(self, pad: int = 2) -> Image.Image:
        if not self.kept:
            raise ValueError("no images for the grid")
        first = next(iter(self.kept.values()))[0]
        height, width = first.shape[1:]
        grid = Image.new("RGB", (self.columns * (width + pad) + pad, len(self.kept) * (height + pad) + pad),
                         "white")
        for r, key in enumerate(sorted(self.kept)):
            for c, tile in enumerate(self.kept[key]):
                corner = (pad + c * (width + pad), pad + r * (height + pad))
                grid.paste(Image.fromarray(tile.transpose(1, 2, 0)), corner)
        return grid


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    import io

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(url: str) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(storage.read_bytes(url))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()


def run_sample(config: SampleConfig, progress: bool = True) -> dict:
    """`enat sample`: write PNGs, an npz and a grid under `out`; a rerun with the same
    settings resumes (batches whose PNGs all exist are read back, not regenerated)."""
    import io
    import time

    from enat.evaluation.strategy_io import describe_strategy, load_strategy, save_strategy

    strategy = load_strategy(config.strategy, config.steps or None)
    sampler = load_sampler(config.checkpoint, config.tokenizer, config.device, config.precision,
                           config.reuse, config.text_encoder)
    conditions = make_conditions(sampler, config.num_samples, config.captions)
    plan = {"model_id": sampler.model_id, "tokenizer_id": sampler.tokenizer_id,
            "strategy": strategy.to_dict(), "seed": config.seed, "batch_size": config.batch_size,
            "num_samples": config.num_samples,
            "captions": conditions.captions, "reuse": config.reuse, "precision": config.precision}
    plan_url = storage.join(config.out, "_plan.json")
    if storage.exists(plan_url) and json.loads(storage.read_bytes(plan_url)) != plan:
        raise SamplingError(f"{config.out} holds samples made with other settings: pick another out "
                            f"or delete it")
    storage.write_bytes(plan_url, json.dumps(plan).encode())

    grid = GridCollector(config.grid_rows, config.grid_columns)
    kept: list[np.ndarray] = []
    generated, resumed, seconds = 0, 0, 0.0
    starts = range(0, config.num_samples, config.batch_size)
    for index, start in enumerate(tqdm(starts, desc="sample", unit="batch", disable=not progress)):
        part = conditions.slice(start, start + config.batch_size)
        names = [storage.join(config.out, "images", f"{start + i:06d}.png") for i in range(len(part))]
        if config.png and all(storage.exists(name) for name in names):
            images = torch.from_numpy(np.stack([_read_png(name) for name in names]))
            resumed += len(part)
        else:
            began = time.perf_counter()
            images = generate_images(sampler, strategy, part, config.seed, index)
            seconds += time.perf_counter() - began
            generated += len(part)
            if config.png:
                for name, image in zip(names, images.numpy(), strict=True):
                    storage.write_bytes(name, png_bytes(image))
        grid.add(images, part.labels)
        if config.npz:
            kept.append(images.numpy())

    if config.npz:
        buffer = io.BytesIO()
        second = conditions.labels if conditions.labels is not None else np.array(conditions.captions)
        np.savez(buffer, arr_0=np.concatenate(kept).transpose(0, 2, 3, 1), arr_1=second)
        storage.write_bytes(storage.join(config.out, "samples.npz"), buffer.getvalue())
    storage.write_bytes(storage.join(config.out, "grid.png"), png_bytes(grid.image()))
    save_strategy(storage.join(config.out, "strategy.yaml"), strategy)
    summary = {"checkpoint": sampler.checkpoint_url, "model_id": sampler.model_id,
               "tokenizer": sampler.tokenizer_url, "tokenizer_id": sampler.tokenizer_id,
               "strategy": describe_strategy(config.strategy, strategy), "steps": strategy.steps,
               "num_samples": config.num_samples, "seed": config.seed, "batch_size": config.batch_size,
               "generated": generated, "resumed": resumed,
               "images_per_s": generated / seconds if seconds else None, "out": config.out}
    storage.write_bytes(storage.join(config.out, "sample.json"), json.dumps(summary, indent=1).encode())
    return summary
