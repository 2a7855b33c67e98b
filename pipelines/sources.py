"""Raw data sets to pretokenize: list their inputs into a deterministic plan, read bytes.

A source is `<kind>:<url>` (local path, file:// or s3://):
- `imagenet:<url>`: a tree of class folders (`<url>/<split>/` when that exists, else
  `<url>` itself), tars of such trees, or per-class tars (`n01440764.tar` holding bare
  JPEGs, as ImageNet ships them). Class index = position in the sorted class names, as
  torchvision's ImageFolder does, which gives the standard 1000-class order for wnids.
- `cc3m:<url>`: img2dataset WebDataset tars (`<key>.jpg|png|webp` + `.txt` + `.json`);
  a folder of tars or one tar. Its parquet/stats files are metadata, not inputs.
- `folder:<url>`: every file below `<url>`, unlabeled.

Inputs are sorted (tar members keep their tar order) and numbered, so the same data
always gives the same plan, keys and shard assignment. Members of tars are read by
byte range from the tar index, so no tar is ever unpacked. Inputs refused while listing
(a file outside any class folder, a caption sample without an image) are returned as
rejections, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from fsspec.core import strip_protocol

from enat.models.errors import UserError
from enat.pipelines import storage

SOURCE_KINDS = ("imagenet", "cc3m", "folder")
CAPTION_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Errors that mean "this input cannot be read" (recorded as a rejection). Anything else,
# e.g. a dropped connection, fails the shard so that Ray retries it.
UNREADABLE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class SourceError(UserError, ValueError):
    """The source is missing, empty, malformed or not readable with our credentials."""


@dataclass(frozen=True)
class Blob:
    """Bytes of one input: a whole object, or the range [start, end) of a tar."""

    url: str
    start: int = 0
    end: int | None = None  # None: the whole object


@dataclass(frozen=True)
class InputItem:
    key: str  # sample key in the shards: the input's position in the plan
    source: str  # path relative to the source root ("a.tar::member" inside tars)
    image: Blob
    size: int  # bytes, from the listing
    label: int | None = None
    caption: Blob | None = None


@dataclass
class Plan:
    kind: str
    url: str  # the root the inputs' `source` paths are relative to
    items: list[InputItem]
    classes: list[str] | None = None
    rejected: list[dict[str, str]] = field(default_factory=list)

    def shards(self, shard_size: int) -> list[list[InputItem]]:
        return [self.items[i : i + shard_size] for i in range(0, len(self.items), shard_size)]

    def fingerprint(self) -> str:
        """sha256 of the inputs (names, sizes, labels) and of the listing rejections."""
        digest = hashlib.sha256(json.dumps([self.kind, self.url, self.classes, self.rejected]).encode())
        for item in self.items:
            digest.update(f"\n{item.key}\t{item.source}\t{item.size}\t{item.label}".encode())
        return digest.hexdigest()


def parse_source(spec: str) -> tuple[str, str]:
    kind, sep, url = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not url:
        raise SourceError(f"bad source '{spec}': expected <kind>:<url> with kind one of "
                          f"{', '.join(SOURCE_KINDS)} (e.g. imagenet:/data/imagenet)")
    return kind, url.rstrip("/") or url


def _full_url(url: str, path: str) -> str:
    return f"s3://{path}" if url.startswith("s3://") else path


def _refused(url: str) -> SourceError:
    return SourceError(f"no permission to read {url}: check AWS_ACCESS_KEY_ID/"
                       f"AWS_SECRET_ACCESS_KEY and the bucket policy")


def check_source(spec: str) -> None:
    """Cheap checks before any work: the spec's form, that the source exists and can be read."""
    _, url = parse_source(spec)
    fs, root = storage.filesystem(url)
    try:
        if not fs.exists(root):
            raise SourceError(f"source not found: {url}")
    except PermissionError:
        raise _refused(url) from None


def _files(url: str) -> list[tuple[str, str, int]]:
    """(path relative to url, full URL, size) of every file below url, sorted by path.
    Fails fast, with a clear message, on a missing source or refused credentials."""
    fs, root = storage.filesystem(url)
    try:
        if not fs.exists(root):
            raise SourceError(f"source not found: {url}")
        if fs.isfile(root):
            return [(posixpath.basename(root), url, fs.size(root))]
        found = fs.find(root, detail=True)
    except PermissionError:
        raise _refused(url) from None
    prefix = root.rstrip("/") + "/"
    files = [(path[len(prefix):], _full_url(url, path), info.get("size") or 0)
             for path, info in found.items() if info.get("type") != "directory"]
    return sorted(files)


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not an input (links and escaping names), or None."""
    if member.issym() or member.islnk():
        return f"link member in tar (-> {member.linkname[:80]}): links are never followed"
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return "unsafe member name in tar (absolute or with '..')"
    return None


def _tar_members(url: str) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]], str | None]:
    """(member name, data offset, size) of the tar's regular files, in tar order; (member
    name, reason) of the members refused (links, escaping names); and an error text if the
    tar breaks off (members read until then are kept)."""
    fs, path = storage.filesystem(url)
    members: list[tuple[str, int, int]] = []
    refused: list[tuple[str, str]] = []
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if reason := _unsafe_member(member):
                    refused.append((member.name, reason))
                elif member.isfile():
                    members.append((member.name.removeprefix("./"), member.offset_data, member.size))
    except (tarfile.TarError, OSError) as err:
        if isinstance(err, PermissionError):
            raise _refused(url) from None
        return members, refused, f"unreadable tar after {len(members)} members ({str(err)[:120]})"
    return members, refused, None


def _member_blob(url: str, start: int, size: int) -> Blob:
    return Blob(url, start, start + size)


def _class_of_member(name: str, tar_name: str, split: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if parts and parts[0] == split and len(parts) > 2:
        parts = parts[1:]
    # A bare file is a per-class tar's member: the class is the tar's name.
    return parts[0] if len(parts) > 1 else tar_name.rsplit("/", 1)[-1].removesuffix(".tar")


def _list_imagenet(url: str, split: str) -> Plan:
    split_root = storage.join(url, split)
    root = split_root if storage.exists(split_root) else url
    candidates: list[tuple[str, str, Blob, int]] = []  # (class, source, blob, size)
    rejected: list[dict[str, str]] = []
    for relative, full, size in _files(root):
        parts = relative.split("/")
        if relative.endswith(".tar"):
            members, refused, error = _tar_members(full)
            rejected += [{"input": f"{relative}::{name}", "reason": reason} for name, reason in refused]
            for name, start, length in members:
                cls = _class_of_member(name, relative, split)
                candidates.append((cls, f"{relative}::{name}", _member_blob(full, start, length), length))
            if error:
                rejected.append({"input": relative, "reason": error})
        elif len(parts) >= 2:
            candidates.append((parts[0], relative, Blob(full), size))
        else:
            rejected.append({"input": relative, "reason": "not inside a class folder"})
    classes = sorted({cls for cls, *_ in candidates})
    index = {name: i for i, name in enumerate(classes)}
    items = [InputItem(f"{n:09d}", source, blob, size, label=index[cls])
             for n, (cls, source, blob, size) in enumerate(candidates)]
    return Plan("imagenet", root, items, classes, rejected)


def _group_samples(members: Iterable[tuple[str, int, int]]) -> dict[str, dict[str, tuple[int, int]]]:
    """WebDataset grouping: key = path up to the first dot of the file name."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for name, start, size in members:
        folder, base = posixpath.split(name)
        stem, _, extension = base.partition(".")
        samples.setdefault(posixpath.join(folder, stem), {})[extension.lower()] = (start, size)
    return samples


def _list_cc3m(url: str) -> Plan:
    tars = [(rel, full) for rel, full, _ in _files(url) if rel.endswith(".tar")]
    items: list[InputItem] = []
    rejected: list[dict[str, str]] = []
    for relative, full in tars:
        members, refused, error = _tar_members(full)
        rejected += [{"input": f"{relative}::{name}", "reason": reason} for name, reason in refused]
        for key, parts in _group_samples(members).items():
            source = f"{relative}::{key}"
            image_ext = next((e for e in CAPTION_IMAGE_EXTENSIONS if e in parts), None)
            has = f"(has: {', '.join(sorted(parts))})"
            if image_ext is None:
                rejected.append({"input": source, "reason": f"no image in sample {has}"})
            elif "txt" not in parts:
                rejected.append({"input": source, "reason": f"no caption in sample {has}"})
            else:
                start, size = parts[image_ext]
                items.append(InputItem(f"{len(items):09d}", f"{source}.{image_ext}",
                                       _member_blob(full, start, size), size,
                                       caption=_member_blob(full, *parts["txt"])))
        if error:
            rejected.append({"input": relative, "reason": error})
    return Plan("cc3m", url, items, None, rejected)


def _list_folder(url: str) -> Plan:
    items = [InputItem(f"{n:09d}", rel, Blob(full), size) for n, (rel, full, size) in enumerate(_files(url))]
    return Plan("folder", url, items)


def plan_source(spec: str, split: str = "train") -> Plan:
    """Every input of `spec`, in a fixed order; SourceError if there is nothing to read."""
    kind, url = parse_source(spec)
    plan = {"imagenet": lambda: _list_imagenet(url, split), "cc3m": lambda: _list_cc3m(url),
            "folder": lambda: _list_folder(url)}[kind]()
    if not plan.items:
        what = {"imagenet": "class folders with images (or tars of them)",
                "cc3m": "WebDataset .tar files with images and captions",
                "folder": "image files"}[kind]
        raise SourceError(f"source {spec} is empty: expected {what} under {plan.url}")
    return plan


def read_blobs(blobs: list[Blob]) -> list[bytes | Exception]:
    """The bytes of each blob, or the error that made it unreadable (see UNREADABLE_ERRORS).

    One concurrent request per whole object and one per tar: ranges of a tar are cut from
    a single read of the span they cover (a shard's members are adjacent in its tars).
    """
    if not blobs:
        return []
    fs, _ = storage.filesystem(blobs[0].url)
    requests: list[tuple[str, int | None, int | None]] = []
    served_by: list[int] = []  # blob index -> request index
    span_of: dict[str, int] = {}
    for blob in blobs:
        if blob.end is None:
            served_by.append(len(requests))
            requests.append((strip_protocol(blob.url), None, None))
        elif blob.url in span_of:
            served_by.append(span_of[blob.url])
        else:
            members = [b for b in blobs if b.url == blob.url and b.end is not None]
            span_of[blob.url] = len(requests)
            served_by.append(len(requests))
            requests.append((strip_protocol(blob.url), min(b.start for b in members),
                             max(b.end for b in members)))
    paths, starts, ends = (list(column) for column in zip(*requests, strict=True))
    fetched = fs.cat_ranges(paths, starts, ends, on_error="return")
    results: list[bytes | Exception] = []
    for blob, request in zip(blobs, served_by, strict=True):
        data = fetched[request]
        if isinstance(data, Exception):
            if not isinstance(data, UNREADABLE_ERRORS):
                raise data  # transient (network, server): fail the task so that Ray retries it
            results.append(data)
        elif blob.end is None:
            results.append(data)
        else:
            offset = requests[request][1]
            results.append(data[blob.start - offset : blob.end - offset])
    return results
