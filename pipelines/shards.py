"""The token-shard format: WebDataset tars of token ids plus a manifest.json.

One sample, under its key:
- `<key>.tokens.npy`       uint16 [h, w] token ids
- `<key>.flip.tokens.npy`  uint16 [h, w] ids of the mirrored image (optional)
- `<key>.cls`              class index as decimal text (class data)
- `<key>.txt`              caption (caption data)
- `<key>.text.npy`         float16 [max_len, D] caption token embeddings, zero-padded
- `<key>.text_mask.npy`    bool [max_len], True for real caption tokens
- `<key>.json`             source path and original size

The manifest records what the shards were made with (tokenizer id and weight sha256,
resolution, token grid, codebook size, class names, text encoder), every shard with its
sample count and sha256, and every rejected input with its reason. Training checks the
manifest against the model before it starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enat.models.errors import MissingInput, UserError
from enat.pipelines import storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestMismatch(UserError, ValueError):
    """Shards that do not fit the job: made for another tokenizer/grid/codebook than the model
    expects, without the split asked for, or in a manifest format this version cannot read."""


@dataclass
class TokenSample:
    key: str
    tokens: np.ndarray  # uint16 [h, w]
    flip_tokens: np.ndarray | None = None
    label: int | None = None
    caption: str | None = None
    text: np.ndarray | None = None  # float16 [max_len, D]
    text_mask: np.ndarray | None = None  # bool [max_len]
    meta: dict[str, Any] = field(default_factory=dict)


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy(array: np.ndarray) -> bytes:
    """np.save's bytes; its header is made once per dtype and shape (formatting it cost more
    than the tiny arrays' data, for every sample)."""
    key = (array.dtype.str, array.shape)
    if array.flags.c_contiguous and key in _NPY_HEADERS:
        return _NPY_HEADERS[key] + array.tobytes()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    if array.flags.c_contiguous:  # the header is what precedes the data
        _NPY_HEADERS[key] = buffer.getvalue()[: buffer.tell() - array.nbytes]
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(sample: TokenSample) -> dict[str, bytes]:
    """File-extension -> bytes for one sample (the WebDataset convention)."""
    files = {"tokens.npy": _npy(sample.tokens.astype(np.uint16))}
    if sample.flip_tokens is not None:
        files["flip.tokens.npy"] = _npy(sample.flip_tokens.astype(np.uint16))
    if sample.label is not None:
        files["cls"] = str(int(sample.label)).encode()
    if sample.caption is not None:
        files["txt"] = sample.caption.encode()
    if sample.text is not None:
        files["text.npy"] = _npy(sample.text.astype(np.float16))
        files["text_mask.npy"] = _npy(sample.text_mask.astype(bool))
    files["json"] = json.dumps(sample.meta, sort_keys=True).encode()
    return files


def decode_sample(files: dict[str, Any]) -> TokenSample:
    """The inverse of `encode_sample`, from a WebDataset sample dict (raw bytes)."""
    def get(name: str) -> bytes | None:
        return files.get(name)

    text = get("text.npy")
    return TokenSample(
        key=files["__key__"],
        tokens=_load_npy(files["tokens.npy"]),
        flip_tokens=_load_npy(get("flip.tokens.npy")) if get("flip.tokens.npy") else None,
        label=int(get("cls")) if get("cls") is not None else None,
        caption=get("txt").decode() if get("txt") is not None else None,
        text=_load_npy(text) if text is not None else None,
        text_mask=_load_npy(get("text_mask.npy")) if text is not None else None,
        meta=json.loads(get("json")) if get("json") else {},
    )


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header `tarfile` writes for a regular file with a shard's fixed
    metadata (mode 0644, owner 0:0 without names, mtime 0), formatted here: tarfile's own
    code took ~13 us a member, the pretokenize task's largest cost after encoding at three
    members a sample. Names over 100 bytes (ustar splits them) go through tarfile itself."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(tarfile.BLOCKSIZE)
    header[: len(encoded)] = encoded
    mode_owner, mtime = b"0000644\x00" + b"0000000\x00" * 2, b"0" * 11 + b"\x00"
    # mode, owner, size and mtime; then the checksum's field as the 8 spaces it counts as
    # while the checksum is summed, and type "0", a regular file
    header[100:157] = mode_owner + b"%011o\x00" % size + mtime + b" " * 8 + b"0"
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:155] = b"%06o\x00" % sum(header)  # the checksum, summed with its field as spaces
    return bytes(header)


class ShardBuilder:
    """A deterministic tar (fixed metadata, sample order kept) built batch by batch, so
    that a shard's samples can be serialised while later ones are still being encoded;
    byte for byte what `tarfile` writes in USTAR format."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()

    def add(self, samples: list[TokenSample]) -> None:
        for sample in samples:
            for extension, data in encode_sample(sample).items():
                self._buffer.write(_member_header(f"{sample.key}.{extension}", len(data)))
                self._buffer.write(data)
                self._buffer.write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def finish(self) -> bytes:
        """The archive with tarfile's ending: two zero blocks, then zeros to a whole record."""
        self._buffer.write(bytes(2 * tarfile.BLOCKSIZE))
        self._buffer.write(bytes(-self._buffer.tell() % tarfile.RECORDSIZE))
        return self._buffer.getvalue()


def shard_bytes(samples: list[TokenSample]) -> bytes:
    builder = ShardBuilder()
    builder.add(samples)
    return builder.finish()


def publish_shard(url: str, data: bytes, count: int) -> dict[str, Any]:
    """Publish one shard's bytes atomically; its manifest entry (name, count, sha256, bytes)."""
    storage.write_bytes(url, data)
    return {"name": url.rstrip("/").rsplit("/", 1)[-1], "count": count,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_shard(url: str, samples: list[TokenSample]) -> dict[str, Any]:
    return publish_shard(url, shard_bytes(samples), len(samples))


def read_shard(url: str) -> list[TokenSample]:
    """All samples of one shard, in order (for inspection and checks; training streams
    shards with WebDataset instead)."""
    grouped: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url)), mode="r:") as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")  # keys hold no dots
            files = grouped.setdefault(key, {"__key__": key})
            files[extension] = tar.extractfile(member).read()
    return [decode_sample(files) for files in grouped.values()]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class Manifest:
    """What a folder of shards holds; `splits` maps a split name to its shard entries."""

    tokenizer_id: str
    tokenizer_sha256: str
    resolution: int
    grid: list[int]  # [h, w]
    codebook_size: int
    source: str = ""
    classes: list[str] | None = None  # class names in index order (class data only)
    text_encoder: dict[str, Any] | None = None  # {"id", "dim", "max_len"} for caption data
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"input", "reason"}
    totals: dict[str, int] = field(default_factory=dict)
    tool_version: str = ""
    format_version: int = FORMAT_VERSION
    # Inputs kept after a non-trivial conversion (CMYK, 16-bit, palette, alpha): {"input", "note"}.
    converted: list[dict[str, str]] = field(default_factory=list)
    flip: bool = False  # every sample also has `<key>.flip.tokens.npy`
    tokenizer_url: str = ""  # where the tokenizer was loaded from (for `--inspect`)
    # sha256 of everything that decides the shards' bytes (inputs, tokenizer, settings):
    # a rerun with the same plan resumes, a different plan is refused.
    plan_sha256: str = ""
    # How this particular run went (elapsed time, throughput, resumed shards). The only
    # part that differs between a clean run and an interrupted-then-resumed one.
    run: dict[str, Any] = field(default_factory=dict)

    def shard_urls(self, root: str, split: str = "train") -> list[str]:
        if split not in self.splits:
            raise ManifestMismatch(f"manifest at {root} has no split '{split}' "
                                   f"(has: {', '.join(self.splits)})")
        return [storage.join(root, split, entry["name"]) for entry in self.splits[split]]

    def num_samples(self, split: str = "train") -> int:
        return sum(entry["count"] for entry in self.splits.get(split, []))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatch(f"unsupported manifest format_version {data.get('format_version')!r}")
        return cls(**data)


def read_manifest(root: str) -> Manifest:
    url = storage.join(root, MANIFEST_NAME)
    try:
        return Manifest.from_json(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise MissingInput(f"no {MANIFEST_NAME} under {root}: pretokenize the data first "
                           f"(enat pretokenize)") from None


def write_manifest(root: str, manifest: Manifest) -> None:
    storage.write_bytes(storage.join(root, MANIFEST_NAME), manifest.to_json().encode())


def check_compatible(manifest: Manifest, codebook_size: int, grid: tuple[int, int],
                     tokenizer_id: str | None = None) -> None:
    """Fail fast when shards were made for another tokenizer, grid or codebook."""
    problems = []
    if manifest.codebook_size != codebook_size:
        problems.append(f"codebook {manifest.codebook_size} != model's {codebook_size}")
    if tuple(manifest.grid) != tuple(grid):
        problems.append(f"token grid {tuple(manifest.grid)} != model's {tuple(grid)}")
    if tokenizer_id is not None and manifest.tokenizer_id != tokenizer_id:
        problems.append(f"tokenizer '{manifest.tokenizer_id}' != expected '{tokenizer_id}'")
    if problems:
        raise ManifestMismatch("shards do not match the model: " + "; ".join(problems)
                               + " (pretokenize with the model's tokenizer)")
