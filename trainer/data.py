"""Training data: an endless, resumable stream of token batches read from a manifest's shards.

Shards are WebDataset tars (pipelines/shards.py) on any fsspec URL (s3://, file://, a path),
read whole through pipelines/storage (so each shard's sha256 is checked against the
manifest before use) and split into samples by WebDataset's tar iterators.

Why not torch's DataLoader: its worker processes hold the stream position in state we
cannot save. Here every rank runs `readers` threads in its own process; reader `w` of rank
`r` is "slot" r * readers + w and owns every (slots)-th shard of an epoch's shard order
(or, with fewer shards than slots, reads all shards and keeps every (slots)-th sample).
A slot's stream is a pure function of (seed, epoch, slot): shard order, shuffle buffer and
mirrored-copy picks all come from generators seeded by those numbers. The rank takes
samples from its readers round-robin, so its batches are deterministic too, and its
position is just "how many samples each reader handed out in which epoch". A resumed run
rebuilds each reader at its saved epoch and skips the samples it had handed out (this
re-reads at most one epoch of that reader's shards), then continues the same stream.
Threads are enough: reading is I/O and npy decoding is cheap.

Corrupt shards (sha256 mismatch, unreadable tar) and corrupt samples are skipped, counted
and warned about; they never stop training. Shards missing at start are a clear error. An
outage of the store is waited out by the storage layer, which retries each shard's read whole,
so it changes neither the samples nor their order; a longer one ends training with one line.
Labels are passed through unchanged: the classifier-free-guidance label drop happens once,
in the training step (trainer/loop.py), not here.
"""

from __future__ import annotations

import hashlib
import io
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from enat.models.config import TransformerConfig
from enat.models.errors import MissingInput, UserError
from enat.models.layers import Condition
from enat.models.typed_config import ConfigError
from enat.pipelines import storage
from enat.pipelines.shards import (
    Manifest,
    ManifestMismatch,
    TokenSample,
    check_compatible,
    decode_sample,
    read_manifest,
)
from enat.trainer.config import DataConfig


class MissingShards(MissingInput):
    """Shards listed in the manifest are not in storage."""





@dataclass
class Dataset:
    """A manifest checked against the model, with its shard URLs and checksums."""

    url: str
    manifest: Manifest
    shards: list[str]
    sha256: list[str | None]
    grid: tuple[int, int]
    codebook_size: int
    num_classes: int
    text: bool


def open_dataset(config: DataConfig, model: TransformerConfig) -> Dataset:
    """Read and check the manifest; fail fast on a model mismatch or missing shards."""
    if not config.url:
        raise ConfigError("data.url is empty: set it to the folder holding manifest.json "
                          "(the one `enat pretokenize` printed)")
    manifest = read_manifest(config.url)
    check_compatible(manifest, model.codebook_size, model.grid_shape, config.tokenizer_id)
    if model.text_conditioned:
        encoder = manifest.text_encoder
        if not encoder:
            raise ManifestMismatch(f"shards at {config.url} hold class labels but the model is "
                                   f"text-conditioned (context_dim={model.context_dim})")
        if encoder.get("dim") != model.context_dim or encoder.get("max_len", 0) > model.context_len:
            raise ManifestMismatch(
                f"text embeddings at {config.url} are {encoder.get('max_len')}x{encoder.get('dim')}, "
                f"the model takes at most {model.context_len}x{model.context_dim}")
    elif manifest.classes is not None and len(manifest.classes) > model.num_classes:
        raise ManifestMismatch(f"shards at {config.url} have {len(manifest.classes)} classes, "
                               f"the model only {model.num_classes} (set model.num_classes)")
    entries = manifest.splits.get(config.split)
    if not entries:
        raise ManifestMismatch(f"manifest at {config.url} has no shards in split '{config.split}' "
                               f"(splits: {', '.join(manifest.splits) or 'none'})")
    urls = manifest.shard_urls(config.url, config.split)
    listed = storage.listdir(storage.join(config.url, config.split))
    present = {u.rstrip("/").rsplit("/", 1)[-1] for u in listed}
    missing = [e["name"] for e in entries if e["name"] not in present]
    if missing:
        raise MissingShards(f"{len(missing)} of {len(entries)} shards listed in {config.url}/manifest.json "
                            f"are missing (first: {missing[0]}): re-run `enat pretokenize` for this data")
    return Dataset(config.url, manifest, urls, [e.get("sha256") for e in entries],
                   model.grid_shape, model.codebook_size, model.num_classes, model.text_conditioned)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


@dataclass
class ReaderPosition:
    epoch: int = 0
    offset: int = 0  # samples handed out in this epoch


@dataclass
class DataStats:
    samples: int = 0
    corrupt_shards: int = 0
    corrupt_samples: int = 0
    missing_shards: int = 0

    def add(self, other: DataStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Reader:
    """One slot's endless stream of (sample, position after it)."""

    def __init__(self, dataset: Dataset, config: DataConfig, seed: int, slot: int, slots: int,
                 start: ReaderPosition):
        self.dataset, self.config, self.seed = dataset, config, seed
        self.slot, self.slots, self.start = slot, slots, start
        self.stats = DataStats()

    def _warn(self, message: str) -> None:
        print(f"warning: data reader {self.slot}: {message}", file=sys.stderr, flush=True)

    def _shard_bytes(self, index: int) -> bytes | None:
        url, expected = self.dataset.shards[index], self.dataset.sha256[index]
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            self.stats.missing_shards += 1
            self._warn(f"shard {url} disappeared, skipped ({self.stats.missing_shards} so far)")
            return None
        if self.config.verify_sha256 and expected and hashlib.sha256(data).hexdigest() != expected:
            self.stats.corrupt_shards += 1
            self._warn(f"shard {url} does not match its manifest sha256, skipped "
                       f"({self.stats.corrupt_shards} corrupt shards so far)")
            return None
        return data

    def _raw_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This slot's raw sample dicts of `epoch`, in (shuffled) shard order."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        count = len(self.dataset.shards)
        order = _rng(self.seed, epoch).permutation(count).tolist()
        by_shard = count >= self.slots
        mine = order[self.slot :: self.slots] if by_shard else order
        seen = 0
        for index in mine:
            data = self._shard_bytes(index)
            if data is None:
                continue
            source = [{"url": self.dataset.shards[index], "stream": io.BytesIO(data)}]
            try:
                for raw in group_by_keys(tar_file_expander(source)):
                    seen += 1
                    if by_shard or (seen - 1) % self.slots == self.slot:
                        yield raw
            except Exception as err:  # noqa: BLE001 - any unreadable tar is skipped, counted
                self.stats.corrupt_shards += 1
                self._warn(f"shard {self.dataset.shards[index]} is unreadable ({err.__class__.__name__}), "
                           f"rest skipped ({self.stats.corrupt_shards} corrupt shards so far)")

    def _decode(self, raw: dict[str, Any]) -> TokenSample | None:
        try:
            sample = decode_sample(raw)
            for tokens in (sample.tokens, sample.flip_tokens):
                if tokens is not None and (tuple(tokens.shape) != self.dataset.grid
                                           or int(tokens.max()) >= self.dataset.codebook_size):
                    raise ValueError(f"token grid {tokens.shape} / max id {tokens.max()}")
            if self.dataset.text:
                if sample.text is None:
                    raise ValueError("no text embedding")
            elif sample.label is None or not 0 <= sample.label < self.dataset.num_classes:
                raise ValueError(f"label {sample.label}")
            return sample
        except Exception as err:  # noqa: BLE001
            self.stats.corrupt_samples += 1
            self._warn(f"sample {raw.get('__key__')} in {raw.get('__url__')} is corrupt ({err}), skipped "
                       f"({self.stats.corrupt_samples} so far)")
            return None

    def _epoch(self, epoch: int) -> Iterator[TokenSample]:
        rng = _rng(self.seed, epoch, self.slot, 1)
        buffer: list[dict[str, Any]] = []

        def take() -> dict[str, Any]:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            return buffer.pop()

        def emit(raw: dict[str, Any]) -> Iterator[TokenSample]:
            flip = rng.random() < self.config.flip_prob  # drawn for every sample: a fixed stream
            sample = self._decode(raw)
            if sample is not None:
                if flip and sample.flip_tokens is not None:
                    sample.tokens = sample.flip_tokens
                yield sample

        for raw in self._raw_samples(epoch):
            buffer.append(raw)
            if len(buffer) >= self.config.shuffle_buffer:
                yield from emit(take())
        while buffer:
            yield from emit(take())

    def __iter__(self) -> Iterator[tuple[TokenSample, ReaderPosition]]:
        epoch, skip = self.start.epoch, self.start.offset
        while True:
            handed = 0
            for sample in self._epoch(epoch):
                handed += 1
                if handed <= skip:
                    continue
                self.stats.samples += 1
                yield sample, ReaderPosition(epoch, handed)
            if handed == 0:
                raise RuntimeError(f"data reader {self.slot} found no readable samples in epoch {epoch} "
                                   f"of {self.dataset.url}: check the shards (all corrupt or missing?)")
            epoch, skip = epoch + 1, 0


@dataclass
class Batch:
    ids: Tensor  # [B, h * w] long
    cond: Condition  # class ids [B], or (context [B, Lc, D] float, context_mask [B, Lc] bool)

    def to(self, device: torch.device) -> Batch:
        if isinstance(self.cond, tuple):
            return Batch(self.ids.to(device), tuple(c.to(device) for c in self.cond))
        return Batch(self.ids.to(device), self.cond.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]


def collate(samples: list[TokenSample]) -> Batch:
    ids = torch.from_numpy(np.stack([s.tokens.reshape(-1) for s in samples]).astype(np.int64))
    if samples[0].text is not None:
        context = torch.from_numpy(np.stack([s.text for s in samples]).astype(np.float32))
        mask = torch.from_numpy(np.stack([s.text_mask for s in samples]).astype(bool))
        return Batch(ids, (context, mask))
    return Batch(ids, torch.tensor([s.label for s in samples], dtype=torch.long))


@dataclass
class StreamPosition:
    """What a checkpoint stores per rank: enough to continue the exact same stream."""

    world_size: int
    readers: int
    consumed: int = 0  # samples this rank has taken (the next comes from reader consumed % readers)
    positions: list[ReaderPosition] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "readers": self.readers, "consumed": self.consumed,
                "positions": [[p.epoch, p.offset] for p in self.positions]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        return cls(data["world_size"], data["readers"], data["consumed"],
                   [ReaderPosition(e, o) for e, o in data["positions"]])


_DONE = object()


class TokenStream:
    """This rank's endless batches; `position()` describes what has been consumed so far."""

    def __init__(self, dataset: Dataset, config: DataConfig, batch_size: int, seed: int,
                 rank: int, world_size: int, resume: StreamPosition | None = None):
        self.batch_size = batch_size
        readers = config.readers
        if resume is not None and (resume.world_size, resume.readers) != (world_size, readers):
            print(f"warning: the saved data position is for {resume.world_size} ranks x {resume.readers} "
                  f"readers, this run has {world_size} x {readers}: starting a fresh epoch", file=sys.stderr)
            epoch = max(p.epoch for p in resume.positions) + 1
            resume = StreamPosition(world_size, readers, 0, [ReaderPosition(epoch, 0)] * readers)
        self.state = resume or StreamPosition(world_size, readers, 0, [ReaderPosition()] * readers)
        self.state.positions = list(self.state.positions)
        slots = world_size * readers
        if len(dataset.shards) < slots and rank == 0:
            print(f"warning: {len(dataset.shards)} shards for {slots} readers: every reader reads all "
                  f"shards and keeps every {slots}-th sample (write more shards to read less)",
                  file=sys.stderr)
        self.readers = [Reader(dataset, config, seed, rank * readers + w, slots, self.state.positions[w])
                        for w in range(readers)]
        self.queues: list[queue.Queue] = [queue.Queue(config.prefetch) for _ in range(readers)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._fill, args=(r, q), daemon=True, name=f"reader-{i}")
                        for i, (r, q) in enumerate(zip(self.readers, self.queues, strict=True))]
        for thread in self.threads:
            thread.start()

    def _put(self, out: queue.Queue, item: Any) -> bool:
        """Block until `item` is queued or the stream is closed (then False)."""
        while not self.stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, reader: Reader, out: queue.Queue) -> None:
        try:
            for item in reader:
                if not self._put(out, item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put(out, (_DONE, err))

    def _next_sample(self) -> TokenSample:
        which = self.state.consumed % len(self.readers)
        sample, position = self.queues[which].get()
        if sample is _DONE:
            if isinstance(position, UserError):  # e.g. storage unreachable: its one line says it all
                raise position
            raise RuntimeError(f"data reader {which} failed: {position}") from position
        self.state.positions[which] = position
        self.state.consumed += 1
        return sample

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Batch:
        return collate([self._next_sample() for _ in range(self.batch_size)])

    def position(self) -> StreamPosition:
        return StreamPosition(self.state.world_size, self.state.readers, self.state.consumed,
                              list(self.state.positions))

    def stats(self) -> DataStats:
        total = DataStats()
        for reader in self.readers:
            total.add(reader.stats)
        return total

    def close(self) -> None:
        self.stop.set()
        for q in self.queues:  # unblock readers waiting on a full queue
            while not q.empty():
                q.get_nowait()
        for thread in self.threads:
            thread.join(timeout=5)
