"""A small image-folder reader for tokenizer training.

Reads every image file under a local folder or an s3:// prefix (recursively, through
pipelines.storage), decodes it with the shared `decode_image` (which gives a reason for
every rejection), center-crops it to the training resolution and keeps the whole set in
memory as uint8: at tokenizer-training resolutions that is small (the 1,903 demo emoji at
32x32 take 6 MB). Files that cannot be decoded are skipped and counted, with their reasons.

The held-out split is a pure function of each file's path relative to the source: a file
is held out when the hash of that path falls below `held_out_share`, so the split is the
same on every run and machine, and adding files never moves an old file between splits.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from enat.models.typed_config import ConfigError
from enat.pipelines import storage
from enat.pipelines.images import RejectedInput, center_crop, decode_image, to_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
READ_CHUNK = 256  # files fetched per request batch (s3fs fetches a batch concurrently)


@dataclass
class ImageSet:
    """Decoded images as uint8 [N, 3, R, R] tensors, split into train and held-out."""

    train: torch.Tensor
    held_out: torch.Tensor
    rejected: dict[str, str] = field(default_factory=dict)  # relative path -> reason

    def summary(self) -> str:
        text = f"{len(self.train)} train + {len(self.held_out)} held-out images"
        if self.rejected:
            reasons = Counter(self.rejected.values()).most_common(3)
            text += f", {len(self.rejected)} rejected (" + "; ".join(f"{n}x {r}" for r, n in reasons) + ")"
        return text


def held_out_score(relative_path: str) -> float:
    """A uniform number in [0, 1) fixed by the path; below the held-out share = held out."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def list_image_files(source: str) -> list[tuple[str, str]]:
    """(path inside the filesystem, path relative to `source`) of every image file, sorted."""
    fs, root = storage.filesystem(source)
    if not fs.isdir(root):
        raise ConfigError(f"bad value for 'source': {source} is not a folder or prefix that exists")
    root = root.rstrip("/")
    found = [p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES)]
    return sorted((p, posixpath.relpath(p, root)) for p in found)


def _decode(data: bytes, resolution: int) -> np.ndarray:
    image, _note = decode_image(data)
    return to_array(center_crop(image, resolution))


def load_image_set(source: str, resolution: int, held_out_share: float, progress: bool = True) -> ImageSet:
    """Every decodable image under `source` at `resolution`, split by path hash.

    At least one image is held out whenever held_out_share > 0 and there are two or more
    images (the one with the smallest score), so a tiny folder still gets evaluated.
    """
    files = list_image_files(source)
    fs, _ = storage.filesystem(source)
    arrays: dict[str, np.ndarray] = {}
    rejected: dict[str, str] = {}
    bar = tqdm(total=len(files), desc="reading images", unit="img", disable=not progress)
    for start in range(0, len(files), READ_CHUNK):
        chunk = files[start : start + READ_CHUNK]
        contents = fs.cat([path for path, _ in chunk], on_error="return")
        for path, relative in chunk:
            data = contents.get(path)
            try:
                if isinstance(data, BaseException) or data is None:
                    raise RejectedInput(f"unreadable ({data.__class__.__name__})")
                arrays[relative] = _decode(data, resolution)
            except RejectedInput as err:
                rejected[relative] = str(err)
        bar.update(len(chunk))
    bar.close()
    if not arrays:
        raise ConfigError(f"bad value for 'source': no decodable images under {source} "
                          f"(looked for {', '.join(IMAGE_SUFFIXES)}; {len(rejected)} rejected)")
    scores = {name: held_out_score(name) for name in arrays}
    held = {name for name, score in scores.items() if score < held_out_share}
    if not held and held_out_share > 0 and len(arrays) >= 2:
        held = {min(scores, key=scores.get)}
    if len(held) == len(arrays):
        raise ConfigError(f"bad value for 'held_out_share': {held_out_share} leaves no training images")

    def stack(names: list[str]) -> torch.Tensor:
        if not names:
            return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
        return torch.from_numpy(np.stack([arrays[n] for n in names]))

    return ImageSet(
        train=stack([n for n in sorted(arrays) if n not in held]),
        held_out=stack(sorted(held)),
        rejected=rejected,
    )
