"""Sets of images for metrics: streamed as uint8 [B, 3, R, R] batches, whatever holds them.

A set is named by one string:
- `imagenet:<url>`, `cc3m:<url>`, `folder:<url>`: raw images read the way pretokenization
  reads them (pipelines.sources listing, the same decoding and ADM center crop), so a
  reference set and the training data see identical preprocessing;
- `tokens:<url>`: token shards (the folder with manifest.json) decoded through the
  tokenizer that made them (the manifest's tokenizer_url, or an explicit one);
- `<file>.npz` holding `arr_0` (ADM's sample-batch format: uint8 [N, H, W, 3]);
- a plain path or URL: a folder with manifest.json is `tokens:`, anything else `folder:`.

Sets stream in batches, so a 50k-image reference never has to sit in memory; unreadable
images are counted and skipped (the count is reported beside the metrics).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from enat.models.errors import UserError
from enat.pipelines import shards, storage
from enat.pipelines.images import RejectedInput, center_crop, decode_image, to_array
from enat.pipelines.sources import SOURCE_KINDS, plan_source, read_blobs

TOKENS = "tokens"
READ_CHUNK = 256  # inputs fetched per storage request group


class ImageSetError(UserError, ValueError):
    """An image-set string that names nothing readable."""


@dataclass
class ImageBatch:
    images: Tensor  # uint8 [B, 3, R, R]
    labels: np.ndarray | None  # int64 [B] where the set has class labels


class ImageTensors(torch.utils.data.Dataset):
    """uint8 [N, 3, H, W] as the torch Dataset torch-fidelity takes (one CHW tensor per item)."""

    def __init__(self, images: np.ndarray | Tensor):
        self.images = torch.as_tensor(images)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def decode_to_uint8(tokenizer: torch.nn.Module, ids: Tensor) -> Tensor:
    """Token ids [B, h, w] -> uint8 images [B, 3, H, W] on the CPU (clamped to [0, 1] first,
    as the papers' evaluation does)."""
    with torch.inference_mode():
        images = tokenizer.decode(ids.long()).float().clamp_(0.0, 1.0)
    return (images * 255.0).round_().to(torch.uint8).cpu()


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [3, H, W] -> [3, R, R] by the ADM center crop (a no-op at the right size)."""
    if image.shape[1:] == (resolution, resolution):
        return image
    return to_array(center_crop(Image.fromarray(image.transpose(1, 2, 0)), resolution))


class ImageSet:
    """A named set of images; iterate for ImageBatch objects. `skipped` counts unreadable
    inputs after a full pass."""

    def __init__(self, spec: str, resolution: int, batch_size: int = 64, limit: int = 0,
                 tokenizer_url: str = "", device: str | torch.device = "cpu"):
        self.spec, self.resolution, self.batch_size, self.limit = spec, resolution, batch_size, limit
        self.tokenizer_url, self.device = tokenizer_url, torch.device(device)
        self.kind, self.url = self._parse(spec)
        self.skipped = 0
        self.classes: list[str] | None = None  # class names, for labeled sources

    @staticmethod
    def _parse(spec: str) -> tuple[str, str]:
        kind, sep, url = spec.partition(":")
        if sep and kind in (*SOURCE_KINDS, TOKENS) and url:
            return kind, url
        if not storage.exists(spec):
            raise ImageSetError(f"image set not found: {spec} (expected a folder of images, token "
                                f"shards, an .npz with arr_0, or <kind>:<url>)")
        if spec.endswith(".npz"):
            return "npz", spec
        if storage.exists(storage.join(spec, shards.MANIFEST_NAME)):
            return TOKENS, spec
        return "folder", spec

    def __iter__(self) -> Iterator[ImageBatch]:
        self.skipped = 0
        batches = {"npz": self._npz, TOKENS: self._tokens}.get(self.kind, self._source)()
        yielded = 0
        for batch in batches:
            if self.limit and yielded + len(batch.images) >= self.limit:
                keep = self.limit - yielded
                yield ImageBatch(batch.images[:keep], None if batch.labels is None else batch.labels[:keep])
                return
            yielded += len(batch.images)
            yield batch

    def _rebatch(self, pieces: Iterator[tuple[np.ndarray, int | None]]) -> Iterator[ImageBatch]:
        images: list[np.ndarray] = []
        labels: list[int | None] = []
        for image, label in pieces:
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield self._batch(images, labels)
                images, labels = [], []
        if images:
            yield self._batch(images, labels)

    @staticmethod
    def _batch(images: list[np.ndarray], labels: list[int | None]) -> ImageBatch:
        label_array = None if any(label is None for label in labels) else np.asarray(labels, np.int64)
        return ImageBatch(torch.from_numpy(np.stack(images)), label_array)

    def _source(self) -> Iterator[ImageBatch]:
        plan = plan_source(f"{self.kind}:{self.url}")
        self.classes = plan.classes

        def pieces() -> Iterator[tuple[np.ndarray, int | None]]:
            for start in range(0, len(plan.items), READ_CHUNK):
                items = plan.items[start : start + READ_CHUNK]
                for item, data in zip(items, read_blobs([i.image for i in items]), strict=True):
                    try:
                        if isinstance(data, Exception):
                            raise RejectedInput(str(data))
                        image, _ = decode_image(data)
                    except RejectedInput:
                        self.skipped += 1
                        continue
                    yield to_array(center_crop(image, self.resolution)), item.label

        return self._rebatch(pieces())

    def _npz(self) -> Iterator[ImageBatch]:
        with storage.open_file(self.url) as handle, np.load(handle, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ImageSetError(f"{self.url} has no arr_0 (images); an npz of mu/sigma is "
                                    f"statistics, usable only as a FID reference")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ImageSetError(f"{self.url}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} "
                                f"{images.shape}")
        chw = images.transpose(0, 3, 1, 2)
        return self._rebatch((resize_square(image, self.resolution), None if labels is None
                              else int(labels[i])) for i, image in enumerate(chw))

    def _tokens(self) -> Iterator[ImageBatch]:
        from enat.pipelines.model_io import load_tokenizer

        manifest = shards.read_manifest(self.url)
        tokenizer_url = self.tokenizer_url or manifest.tokenizer_url
        if not tokenizer_url:
            raise ImageSetError(f"the manifest at {self.url} records no tokenizer_url: pass the "
                                f"tokenizer that made the shards")
        tokenizer = load_tokenizer(tokenizer_url, device=self.device)
        if not self.tokenizer_url and tokenizer.model_id != manifest.tokenizer_id:
            raise ImageSetError(f"tokenizer at {tokenizer_url} is {tokenizer.model_id}, but the shards "
                                f"were made with {manifest.tokenizer_id}: pass the right tokenizer")
        for url in manifest.shard_urls(self.url):
            samples = shards.read_shard(url)
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start : start + self.batch_size]
                ids = torch.from_numpy(np.stack([s.tokens.astype(np.int64) for s in chunk]))
                images = decode_to_uint8(tokenizer.model, ids.to(self.device))
                images = np.stack([resize_square(image, self.resolution) for image in images.numpy()])
                labels = [s.label for s in chunk]
                yield ImageBatch(torch.from_numpy(images),
                                 None if None in labels else np.asarray(labels, np.int64))


def read_all(images: ImageSet) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole set in memory: uint8 [N, 3, R, R] and labels (or None)."""
    batches = list(images)
    if not batches:
        raise ImageSetError(f"image set {images.spec} holds no readable image")
    labels = None if any(b.labels is None for b in batches) else np.concatenate([b.labels for b in batches])
    return torch.cat([b.images for b in batches]).numpy(), labels
