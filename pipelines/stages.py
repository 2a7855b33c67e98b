"""The stages of one pretokenize shard, overlapped inside its task.

    read (1 I/O thread, one chunk ahead) -> decode + resize (the task's worker processes,
    one per CPU) -> fixed batches of `batch_size` kept images -> encode (on CPU: the same
    worker processes, one batch each, one torch thread each; on a GPU: one encoding thread
    of the task's process) -> serialise into the shard's tar (1 writer thread)

Every stage runs ahead of the next by a bounded amount: while batch k is encoded, the
workers decode the inputs of batch k+1 and k+2, the reader fetches the next chunk and the
writer serialises batch k-1; memory stays at a few batches whatever the shard size.

Where the encoder runs decides the speed. On CPU, decoding and encoding share the task's
CPUs, and an encoder that spreads one batch over torch threads while decoders run beside
it loses most of its CPUs to both: its threads meet at every op and wait for the one a
decoder preempted (measured here with 2 CPUs: the pipeline ran at 700-890 images/s, that
encoder alone at 1,190). So on CPU every worker process does whole pieces of work, a
decode piece or a batch to encode, one at a time on one thread, and the CPUs stay busy
with no contention (1,500-1,700 images/s, bench/pretokenize.py); the task's own process
only reads ahead, assembles batches and writes. On a GPU the encoder is one model in the
task's process, fed by an encoding thread, and the worker processes only decode.

Decoding runs in processes, not threads: small images cost PIL more Python than pixel
work, so decode threads would hold the GIL often enough to stall the rest. Everything
stays in input order, and batch k holds kept images k*B .. (k+1)*B-1 exactly as a
sequential encode of the kept images would batch them, so the ids equal a sequential
run's.
"""

from __future__ import annotations

import ctypes
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
    """(worker processes, torch threads of the task's own process) of a task with `cpus`
    CPUs: a worker per CPU; the task's process uses all of them for what it runs itself
    (the text encoder, and the image encoder on a GPU)."""
    return cpus, cpus


_POOLS: dict[int, ProcessPoolExecutor] = {}


def worker_pool(processes: int) -> ProcessPoolExecutor:
    """This process's pool of `processes` workers, started once and kept for later shards
    (a worker keeps the models it loaded for them too; started with spawn: forking a process
    that runs torch and Ray threads is unsafe, so the main module must be import-safe, as
    enat's CLI, Ray's workers and pytest are)."""
    pool = _POOLS.get(processes)
    if pool is None or pool._broken:  # a worker died (killed, out of memory): start afresh
        pool = _POOLS[processes] = ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"),
                                                       initializer=_worker_start, initargs=(os.getpid(),))
    return pool


def _worker_start(parent: int) -> None:
    """A worker leaves when the process that started it is gone, which a SIGKILLed Ray
    worker cannot tell it (its workers would otherwise wait forever), and keeps the memory
    it frees for its next batches."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    keep_freed_memory()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have this process's C allocator keep freed blocks of up to 32 MiB for its next
    allocations; False where the C library has no glibc mallopt. By default glibc returns
    every freed block over 128 KiB to the kernel, so each new tensor of that size is fresh
    pages to fault in and zero: that was a quarter of the tiny tokenizer's encoding CPU
    here (one thread: 1,150 images/s with this, 870 without). 32 MiB and a 64 MiB trim
    threshold are where glibc's own adaptive threshold ends once a process has freed a
    block that large; set here, it does not wait for one."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))


def ahead(executor: Executor, fn: Callable[..., Any], calls: Iterable[tuple[Any, tuple]],
          depth: int) -> Iterator[tuple[Any, Any]]:
    """fn(*args) for each (tag, args) of `calls`, run on `executor` up to `depth` calls ahead
    of the consumer; (tag, result) in order (an exception surfaces when its result is
    reached). The tag stays here: what the caller needs back but the call does not."""
    pending: deque = deque()
    for tag, args in calls:
        pending.append((tag, executor.submit(fn, *args)))
        if len(pending) > depth:
            tag, future = pending.popleft()
            yield tag, future.result()
    while pending:
        tag, future = pending.popleft()
        yield tag, future.result()


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
    reads = (part for _, part in ahead(reader, _read, ((None, args) for args in parts), depth=1))
    calls = ((None, (part[start : start + piece], resolution, max_pixels, min_side))
             for part in reads for start in range(0, len(part), piece))
    for _, (done, seconds) in ahead(pool, prepare_inputs, calls, depth):
        cpu_seconds.append(seconds)
        yield from done


def prepare_inputs(inputs: list[tuple[InputItem, Any, Any]], resolution: int, max_pixels: int,
                   min_side: int) -> tuple[list[Prepared], float]:
    """`prepare_input` of each, and the CPU seconds they took (a worker process's time is
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
