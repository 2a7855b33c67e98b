"""Training data: one global, endless sample order over a manifest's shards, of which each
rank reads its slice.

Shards are WebDataset tars (pipelines/shards.py) on any fsspec URL (s3://, file://, a path),
read whole through pipelines/storage (so each shard's sha256 is checked against the
manifest before use) and split into samples by WebDataset's tar iterators.

The order (`GlobalOrder`) is a function of the manifest's shard counts and the seed only:
an epoch permutes the shards, lays their samples end to end and shuffles them within
windows of `shuffle_window` samples (a block shuffle, as in mosaicml/streaming), and
decides each sample's mirrored-copy pick by its place in the epoch. Sample t of the
endless stream is place t % N of epoch t // N. Training consumes it in global batches of
batch_size * grad_accum * world_size samples; global batch k is cut into micro-batches of
batch_size, and rank r takes micro-batches r * grad_accum ... (r + 1) * grad_accum - 1. So
a run's micro-batches, and its position (`samples` consumed, a multiple of the global
batch), do not depend on the world size, the reader count or the ZeRO stage: any number
of workers continues from a checkpoint with the same global batch (trainer/loop.py keeps it
by changing grad_accum), and a resumed epoch repeats and skips nothing.

Reading is for I/O: every rank knows from the counts alone which shards its next samples
live in, fetches them ahead on `readers` threads, and drops a shard once its last sample
for this rank is taken. A window spans about shuffle_window / samples-per-shard shards, so
that is what a rank holds in memory. Threads are enough: reading is I/O and npy decoding
is cheap. Why not torch's DataLoader: its worker processes hold the position in state we
cannot save.

Corrupt shards (sha256 mismatch, unreadable tar), missing shards and corrupt samples are
counted and warned about and never stop training: an unreadable sample is replaced by the
first readable one of its micro-batch, so batches keep their size and place. A store
outage is waited out by the storage layer; a longer one ends training with one line.
Labels pass through unchanged: the classifier-free-guidance label drop happens in the
training step (trainer/loop.py).
"""

from __future__ import annotations

import hashlib
import io
import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
    """A manifest checked against the model, with its shard URLs, sizes and checksums."""

    url: str
    manifest: Manifest
    shards: list[str]
    counts: list[int]
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
    if not entries or not any(e["count"] for e in entries):
        raise ManifestMismatch(f"manifest at {config.url} has no samples in split '{config.split}' "
                               f"(splits: {', '.join(manifest.splits) or 'none'})")
    urls = manifest.shard_urls(config.url, config.split)
    listed = storage.listdir(storage.join(config.url, config.split))
    present = {u.rstrip("/").rsplit("/", 1)[-1] for u in listed}
    missing = [e["name"] for e in entries if e["name"] not in present]
    if missing:
        raise MissingShards(f"{len(missing)} of {len(entries)} shards listed in {config.url}/manifest.json "
                            f"are missing (first: {missing[0]}): re-run `enat pretokenize` for this data")
    return Dataset(config.url, manifest, urls, [int(e["count"]) for e in entries],
                   [e.get("sha256") for e in entries], model.grid_shape, model.codebook_size,
                   model.num_classes, model.text_conditioned)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


class GlobalOrder:
    """Which sample comes at each place of each epoch, from the shard counts and seed alone."""

    def __init__(self, counts: list[int], seed: int, window: int, flip_prob: float):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # first sample id per shard
        self.size = int(self.counts.sum())  # samples per epoch
        self.seed, self.window, self.flip_prob = seed, window, flip_prob

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, mirrored-copy picks) of every place of `epoch`; a sample id is its
        shard's first id plus its index in the shard."""
        shards = _rng(self.seed, epoch).permutation(len(self.counts))
        ids = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in shards])
        # Sorting (window index + a uniform draw) permutes each window and keeps windows in order.
        keys = np.arange(self.size) // self.window + _rng(self.seed, epoch, 1).random(self.size)
        ids = ids[np.argsort(keys, kind="stable")]
        flips = _rng(self.seed, epoch, 2).random(self.size) < self.flip_prob
        return ids, flips

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1


@dataclass
class DataStats:
    samples: int = 0
    corrupt_shards: int = 0
    corrupt_samples: int = 0
    missing_shards: int = 0


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


_DONE = object()


class TokenStream:
    """This rank's micro-batches, in order, from global sample `start` (a global-batch
    boundary); `position()` is the global samples consumed after the last whole step."""

    def __init__(self, dataset: Dataset, config: DataConfig, batch_size: int, seed: int, rank: int,
                 world_size: int, grad_accum: int = 1, start: int = 0):
        self.dataset, self.config = dataset, config
        self.batch_size, self.grad_accum, self.rank = batch_size, grad_accum, rank
        self.global_batch = batch_size * grad_accum * world_size
        self.start, self.taken = start, 0  # micro-batches handed out
        self.order = GlobalOrder(dataset.counts, seed, config.shuffle_window, config.flip_prob)
        self._stats = DataStats()
        self._last_readable: list[TokenSample] = []
        self.ahead = max(1, config.prefetch // batch_size)  # micro-batches whose shards are fetched
        self.queue: queue.Queue = queue.Queue(self.ahead)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(config.readers, thread_name_prefix="shard-reader")
        self.thread = threading.Thread(target=self._fill, daemon=True, name=f"data-rank-{rank}")
        self.thread.start()

    # -- reading (the filler thread and the shard readers) ------------------------------------

    def _warn(self, message: str) -> None:
        print(f"warning: data (rank {self.rank}): {message}", file=sys.stderr, flush=True)

    def _read_shard(self, index: int) -> list[dict[str, Any]] | None:
        """One shard's raw samples in order, or None when it is missing or corrupt."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, expected = self.dataset.shards[index], self.dataset.sha256[index]
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            self._stats.missing_shards += 1
            self._warn(f"shard {url} disappeared, its samples are replaced "
                       f"({self._stats.missing_shards} missing shards so far)")
            return None
        if self.config.verify_sha256 and expected and hashlib.sha256(data).hexdigest() != expected:
            self._stats.corrupt_shards += 1
            self._warn(f"shard {url} does not match its manifest sha256, its samples are replaced "
                       f"({self._stats.corrupt_shards} corrupt shards so far)")
            return None
        raws: list[dict[str, Any]] = []
        try:
            raws.extend(group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])))
        except Exception as err:  # noqa: BLE001 - an unreadable tar's rest is replaced, counted
            self._stats.corrupt_shards += 1
            self._warn(f"shard {url} is unreadable after {len(raws)} samples ({err.__class__.__name__}), "
                       f"the rest are replaced ({self._stats.corrupt_shards} corrupt shards so far)")
        return raws

    def _decode(self, raw: dict[str, Any] | None, flip: bool) -> TokenSample | None:
        if raw is None:
            return None
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
        except Exception as err:  # noqa: BLE001
            self._stats.corrupt_samples += 1
            self._warn(f"sample {raw.get('__key__')} in {raw.get('__url__')} is corrupt ({err}), replaced "
                       f"({self._stats.corrupt_samples} so far)")
            return None
        if flip and sample.flip_tokens is not None:
            sample.tokens = sample.flip_tokens
        return sample

    def _micro_batches(self) -> Iterator[np.ndarray]:
        """Global places of this rank's micro-batches, in the order the loop takes them."""
        first = self.rank * self.grad_accum * self.batch_size
        lane = np.arange(self.batch_size)
        base = self.start
        while True:
            for micro in range(self.grad_accum):
                yield base + first + micro * self.batch_size + lane
            base += self.global_batch

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids, picks, shard of each place, last place this rank needs of each shard)."""
        ids, flips = self.order.epoch(epoch)
        shard = self.order.shard_of(ids)
        places = epoch * self.order.size + np.arange(self.order.size)
        relative = places - self.start
        micro = self.batch_size * self.grad_accum
        mine = (relative >= 0) & ((relative % self.global_batch) // micro == self.rank)
        last = np.full(len(self.order.counts), -1, dtype=np.int64)
        np.maximum.at(last, shard[mine], np.flatnonzero(mine))
        return ids, flips, shard, last

    def _fill(self) -> None:
        """Turn this rank's places into batches: fetch shards a few micro-batches ahead, drop
        each after its last use."""
        try:
            size, plans = self.order.size, {}
            loaded: dict[tuple[int, int], Future] = {}  # (epoch, shard) -> its raw samples

            def plan(epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
                if epoch not in plans:
                    plans[epoch] = self._epoch_plan(epoch)
                return plans[epoch]

            upcoming: deque[np.ndarray] = deque()
            batches = self._micro_batches()
            while not self.stop.is_set():
                while len(upcoming) < self.ahead:
                    upcoming.append(next(batches))
                    for place in upcoming[-1]:
                        epoch, offset = divmod(int(place), size)
                        key = (epoch, int(plan(epoch)[2][offset]))
                        if key not in loaded:
                            loaded[key] = self.pool.submit(self._read_shard, key[1])
                samples = []
                for place in upcoming.popleft():
                    epoch, offset = divmod(int(place), size)
                    ids, flips, shard_of, last = plan(epoch)
                    shard = int(shard_of[offset])
                    raws = loaded[(epoch, shard)].result()
                    index = int(ids[offset] - self.order.starts[shard])
                    raw = raws[index] if raws is not None and index < len(raws) else None
                    samples.append(self._decode(raw, bool(flips[offset])))
                    if offset == last[shard]:
                        del loaded[(epoch, shard)]
                for old in [e for e in plans if e < epoch]:
                    del plans[old]
                if not self._put(self._batch(samples)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put((_DONE, err))

    def _batch(self, samples: list[TokenSample | None]) -> Batch:
        """Unreadable samples take the place of the micro-batch's first readable one (or, when it
        has none, of the last readable sample this rank saw)."""
        readable = [s for s in samples if s is not None] or self._last_readable
        if not readable:
            raise RuntimeError(f"no readable sample in the first micro-batch of {self.dataset.url}: check "
                               f"the shards (all corrupt or missing?), or re-run `enat pretokenize`")
        self._last_readable = readable[-1:]
        self._stats.samples += len(samples)
        return collate([s if s is not None else readable[0] for s in samples])

    def _put(self, item: Any) -> bool:
        """Block until `item` is queued or the stream is closed (then False)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    # -- the consumer side -----------------------------------------------------------------

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if isinstance(item, tuple) and item[0] is _DONE:
            if isinstance(item[1], UserError):  # e.g. storage unreachable: its one line says it all
                raise item[1]
            raise RuntimeError(f"data reading failed: {item[1]}") from item[1]
        self.taken += 1
        return item

    def position(self) -> int:
        """Global samples consumed by every whole step so far: where a resumed run starts."""
        return self.start + (self.taken // self.grad_accum) * self.global_batch

    def stats(self) -> DataStats:
        return DataStats(**vars(self._stats))

    def close(self) -> None:
        self.stop.set()
        while not self.queue.empty():  # unblock the filler waiting on a full queue
            self.queue.get_nowait()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
