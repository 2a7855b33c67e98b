"""The stages of one pretokenize shard, overlapped inside its task.

    read (1 I/O thread, one chunk ahead) -> decode + resize (a pool of processes, one per
    CPU of the task) -> fixed batches of `batch_size` kept images -> encode (the calling
    thread, with the model its process keeps loaded) -> serialise into the shard's tar
    (1 writer thread)

Every stage runs ahead of the next by a bounded amount: while the encoder works on batch
k, the pool decodes batch k+1, the reader fetches the next chunk and the writer
serialises batch k-1; memory stays at a few batches whatever the shard size. Decoding
runs in processes, not threads: small images cost PIL more Python than pixel work, so
decode threads hold the GIL often enough to stall the encoder's own Python between its
torch ops (measured on the bench's emoji: 2 decode threads decoded slower than 1, and a
2-CPU shard task ran at 728 images/s with decode threads against ~890 with processes).
The reader waits on storage and the writer is brief, so they stay threads. Everything
stays in input order, and batch k holds kept images k*B .. (k+1)*B-1 exactly as a
sequential encode of the kept images would batch them, so the ids equal a sequential
run's.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enat.pipelines.images import RejectedInput, center_crop, decode_image, to_array
from enat.pipelines.sources import InputItem, read_blobs


@dataclass
class Prepared:
    """One input after decode + resize: the pixels to encode, or why it was rejected."""

    item: InputItem
    array: np.ndarray | None = None  # uint8 [3, H, W]; None when rejected
    meta: dict[str, Any] = field(default_factory=dict)  # source, original size, conversion note
    caption: str | None = None
    reason: str | None = None  # why a rejected input was rejected


def workers_for(cpus: int) -> tuple[int, int]:
    """(decode processes, torch intra-op threads) of a task with `cpus` CPUs. Both get all
    of them: decoding runs ahead by a batch and then waits, so the two alternate more than
    they coincide, and on 2 CPUs the encoder with 2 threads gave the pipeline more images/s
    than with 1 (814 against 659 here), at a cost per CPU-second (455 against 636 images)."""
    return cpus, cpus


_POOLS: dict[int, ProcessPoolExecutor] = {}


def decode_pool(processes: int) -> ProcessPoolExecutor:
    """This process's pool of `processes` decoders, started once and kept for later shards
    (started with spawn: forking a process that runs torch and Ray threads is unsafe, so the
    main module must be import-safe, as enat's CLI, Ray's workers and pytest are)."""
    pool = _POOLS.get(processes)
    if pool is None or pool._broken:  # a decoder died (killed, out of memory): start afresh
        pool = _POOLS[processes] = ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"),
                                                       initializer=_exit_with, initargs=(os.getpid(),))
    return pool


def _exit_with(parent: int) -> None:
    """A decoder's start: it leaves when the process that started it is gone, which a
    SIGKILLed Ray worker cannot tell it (its decoders would otherwise wait forever)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def ahead(executor: Executor, fn: Callable[..., Any], calls: Iterable[tuple], depth: int) -> Iterator[Any]:
    """fn(*args) for each args in `calls`, run on `executor` up to `depth` calls ahead of
    the consumer; results in order (an exception surfaces when its result is reached)."""
    pending: deque = deque()
    for args in calls:
        pending.append(executor.submit(fn, *args))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read(items: list[InputItem], with_captions: bool) -> list[tuple[InputItem, Any, Any]]:
    blobs = [item.image for item in items] + ([item.caption for item in items] if with_captions else [])
    data = read_blobs(blobs)
    return [(item, data[i], data[len(items) + i] if with_captions else None) for i, item in enumerate(items)]


def prepared(items: list[InputItem], resolution: int, max_pixels: int, min_side: int, reader: Executor,
             pool: Executor, chunk: int, piece: int, depth: int,
             cpu_seconds: list[float]) -> Iterator[Prepared]:
    """Each input decoded and resized (or rejected with its reason), in input order: chunks
    of `chunk` inputs are read one ahead on `reader`, and pieces of `piece` inputs decoded
    `depth` pieces ahead on `pool`; each piece's decoding CPU seconds go to `cpu_seconds`."""
    with_captions = any(item.caption is not None for item in items)
    parts = [(items[start : start + chunk], with_captions) for start in range(0, len(items), chunk)]
    reads = ahead(reader, _read, parts, depth=1)
    calls = ((part[start : start + piece], resolution, max_pixels, min_side)
             for part in reads for start in range(0, len(part), piece))
    for done, seconds in ahead(pool, prepare_inputs, calls, depth):
        cpu_seconds.append(seconds)
        yield from done


def prepare_inputs(inputs: list[tuple[InputItem, Any, Any]], resolution: int, max_pixels: int,
                   min_side: int) -> tuple[list[Prepared], float]:
    """`prepare_input` of each, and the CPU seconds they took (a decoder process's time is
    not in its parent's process_time)."""
    started = time.process_time()
    done = [prepare_input(item, raw, caption, resolution, max_pixels, min_side)
            for item, raw, caption in inputs]
    return done, time.process_time() - started


def prepare_input(item: InputItem, raw: bytes | Exception, caption_raw: bytes | Exception | None,
                  resolution: int, max_pixels: int, min_side: int) -> Prepared:
    try:
        if isinstance(raw, Exception):
            raise RejectedInput(f"unreadable ({type(raw).__name__}: {str(raw)[:120]})")
        caption = _caption(caption_raw) if item.caption is not None else None
        image, note = decode_image(raw, max_pixels, min_side)
        array = to_array(center_crop(image, resolution))
    except RejectedInput as err:
        return Prepared(item, reason=str(err))
    except Exception as err:  # noqa: BLE001 - one odd file must never stop the job
        return Prepared(item, reason=f"could not be decoded ({type(err).__name__}: {str(err)[:120]})")
    meta = {"source": item.source, "width": image.width, "height": image.height}
    if note:
        meta["converted"] = note
    return Prepared(item, array, meta, caption)


def _caption(raw: bytes | Exception) -> str:
    if isinstance(raw, Exception):
        raise RejectedInput(f"caption unreadable ({type(raw).__name__})")
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RejectedInput("caption is not UTF-8 text") from None
    if not caption:
        raise RejectedInput("empty caption")
    return caption


def batches(inputs: Iterable[Prepared], size: int, rejected: list[Prepared]) -> Iterator[list[Prepared]]:
    """Kept inputs in fixed batches of `size` (the last one shorter); rejected ones are
    appended to `rejected` as they pass."""
    batch: list[Prepared] = []
    for one in inputs:
        if one.array is None:
            rejected.append(one)
            continue
        batch.append(one)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
