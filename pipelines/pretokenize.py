"""Pretokenization: raw images -> WebDataset shards of VQ token ids plus a manifest.

`prepare` checks everything that can fail fast (config, destination, source,
credentials, tokenizer, text encoder), lists the source into a fixed plan of shards and
works out which shards a previous run already finished. `process_shard` is the work of
one shard, runnable in any process (cluster/pretokenize_cmd.py runs it as Ray tasks):
read -> decode (rejections recorded) -> resize + center crop -> batched VQ encode in
float32 -> optional mirrored copy -> optional caption embedding -> publish the shard,
then its record; reading, decoding, encoding and serialising overlap (pipelines/stages.py).
`finish` merges the records into manifest.json, written last.

Layout under `out`:
  <split>/shard-000000.tar          published atomically (temporary key, then move)
  _parts/<split>/shard-000000.json  the shard's record: entry, rejected and converted
                                    inputs; written after the shard, so it marks it done
  _parts/plan.json                  fingerprint of the unfinished job's plan
  manifest.json                     written last: its presence means the job is complete
  lease.json                        held by the job writing the output (output_lease)
A rerun after any crash redoes only shards without a record; a finished job's `_parts/`
is removed. Everything that decides a shard's bytes is fixed by the plan (sorted inputs,
fixed shard assignment, CPU float32 encoding), so a resumed job ends with the same
shards, byte for byte, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch

from enat.models.device import pick_device
from enat.models.errors import UserError
from enat.models.typed_config import ConfigError
from enat.pipelines import shards, stages, storage
from enat.pipelines.config import NONE, LeaseConfig, PretokenizeConfig, TextEncoderConfig
from enat.pipelines.lease import Lease
from enat.pipelines.model_io import load_tokenizer
from enat.pipelines.shards import Manifest, TokenSample
from enat.pipelines.sources import Blob, InputItem, Plan, check_source, plan_source, read_blobs
from enat.pipelines.text_encoder import TextEncoder, describe

PARTS_DIR = "_parts"


class PretokenizeError(UserError, RuntimeError):
    """The job cannot start or finish; the message says what to do."""


@dataclass(frozen=True)
class JobSpec:
    """What every shard task needs; fixed by the driver before any task runs."""

    out: str
    split: str
    tokenizer: str
    tokenizer_config: str
    tokenizer_sha256: str
    resolution: int
    flip: bool
    batch_size: int
    text: TextEncoderConfig | None  # None: no caption embedding
    max_pixels: int
    min_side: int
    device: str


@dataclass
class ShardTask:
    index: int
    items: list[InputItem]
    spec: JobSpec

    @property
    def shard_url(self) -> str:
        return storage.join(self.spec.out, self.spec.split, shards.shard_name(self.index))

    @property
    def record_url(self) -> str:
        name = shards.shard_name(self.index) + ".json"
        return storage.join(self.spec.out, PARTS_DIR, self.spec.split, name)


@dataclass
class Job:
    config: PretokenizeConfig
    spec: JobSpec
    plan: Plan
    fingerprint: str
    tokenizer_id: str
    grid: list[int]
    codebook_size: int
    text_info: dict[str, Any] | None
    tasks: list[ShardTask]
    pending: list[ShardTask]
    complete: Manifest | None = None  # set when the output already holds this finished job


def _fingerprint(plan: Plan, spec: JobSpec, shard_size: int, text_info: dict | None) -> str:
    settings = {k: v for k, v in asdict(spec).items() if k not in ("out", "batch_size", "device", "text")}
    settings.update(shard_size=shard_size, text=text_info, tokenizer=None)  # the sha256 names it
    text = f"{plan.fingerprint()}\n{json.dumps(settings, sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()


def output_lease(out: str, owner: str, config: LeaseConfig) -> Lease:
    """The output's lease: one job writes it at a time (plan.json, the temporary keys it
    clears and the manifest are the job's alone)."""
    return Lease(out, owner, f"pretokenize output {out}", config)


def prepare(config: PretokenizeConfig) -> Job:
    """Fail fast on anything wrong, then the plan and the shards still to do."""
    config.require()
    check_source(config.source)
    storage.check_writable(config.out)
    tokenizer = load_tokenizer(config.tokenizer, config.tokenizer_config)
    factor = 2 ** (len(tokenizer.config.channel_mult) - 1)
    resolution = config.resolution or tokenizer.config.image_size
    if resolution % factor:
        raise ConfigError(f"bad value for 'resolution': must be a multiple of the tokenizer's "
                          f"downsampling factor {factor}, got {resolution}")
    if tokenizer.config.codebook_size > 65536:
        raise PretokenizeError(f"codebook of {tokenizer.config.codebook_size} ids does not fit uint16")
    plan = plan_source(config.source, config.split)
    wants_text = plan.kind == "cc3m" and config.text.name != NONE
    text_info = describe(config.text) if wants_text else None
    spec = JobSpec(config.out, config.split, config.tokenizer, config.tokenizer_config, tokenizer.sha256,
                   resolution, config.flip, config.batch_size, config.text if wants_text else None,
                   config.max_pixels, config.min_side, config.device)
    fingerprint = _fingerprint(plan, spec, config.shard_size, text_info)
    tasks = [ShardTask(i, items, spec) for i, items in enumerate(plan.shards(config.shard_size))]
    job = Job(config, spec, plan, fingerprint, tokenizer.model_id, [resolution // factor] * 2,
              tokenizer.config.codebook_size, text_info, tasks, pending=[])
    if storage.exists(storage.join(config.out, shards.MANIFEST_NAME)):
        manifest = shards.read_manifest(config.out)
        if manifest.plan_sha256 != fingerprint:
            raise PretokenizeError(f"{config.out} already holds a finished job made from other inputs "
                                   f"or settings: choose another out or delete it")
        job.complete = manifest
        return job
    plan_url = storage.join(config.out, PARTS_DIR, "plan.json")
    if storage.exists(plan_url):
        if json.loads(storage.read_bytes(plan_url))["fingerprint"] != fingerprint:
            raise PretokenizeError(f"{config.out} holds an unfinished job with other inputs or settings: "
                                   f"rerun it with its settings, or delete {plan_url} and the shards")
    else:
        record = {"fingerprint": fingerprint, "source": config.source}
        storage.write_bytes(plan_url, json.dumps(record).encode())
    storage.remove_temporaries(config.out)
    # One listing per folder, not a request per shard: outputs can hold thousands.
    records = {_name(url) for url in storage.listdir(storage.join(config.out, PARTS_DIR, config.split))}
    published = {_name(url) for url in storage.listdir(storage.join(config.out, config.split))}
    job.pending = [task for task in tasks if not _finished(task, records, published, config.verify)]
    return job


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _finished(task: ShardTask, records: set[str], published: set[str], verify: bool) -> bool:
    """A shard is done when its record exists (written after the shard) and, unless all its
    inputs were rejected, so does the shard (with the recorded sha256, under verify)."""
    if _name(task.record_url) not in records:
        return False
    if _name(task.shard_url) in published and not verify:
        return True
    entry = json.loads(storage.read_bytes(task.record_url))["shard"]
    if entry is None:
        return True
    if _name(task.shard_url) not in published:
        return False
    return hashlib.sha256(storage.read_bytes(task.shard_url)).hexdigest() == entry["sha256"]


_LOADED: dict[tuple, Any] = {}  # models loaded by this process, reused by its next tasks


def _tokenizer(spec: JobSpec) -> Any:
    device = pick_device(spec.device)
    key = (spec.tokenizer, spec.tokenizer_config, spec.tokenizer_sha256, device)
    if key not in _LOADED:
        tokenizer = load_tokenizer(spec.tokenizer, spec.tokenizer_config, device)
        if tokenizer.sha256 != spec.tokenizer_sha256:
            raise PretokenizeError(f"the tokenizer at {spec.tokenizer} changed during the job")
        _LOADED[key] = tokenizer
    return _LOADED[key]


def _text_encoder(spec: JobSpec) -> TextEncoder | None:
    if spec.text is None:
        return None
    device = pick_device(spec.device)
    key = ("text", spec.text.name, spec.text.max_len, spec.text.batch_size, device)
    if key not in _LOADED:
        _LOADED[key] = TextEncoder(spec.text, device)
    return _LOADED[key]


def encode_images(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, 3, H, W] -> uint16 ids [N, h, w]; float32, fixed batches (deterministic)."""
    device = next(model.parameters()).device
    ids = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).float() / 255.0
            ids.append(model.encode(batch).cpu().numpy().astype(np.uint16))
    return np.concatenate(ids)


def encode_batch(spec: JobSpec, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch's ids, and its mirrored copy's (encoded as a batch of its own) under flip."""
    model = _tokenizer(spec).model
    tokens = encode_images(model, images, spec.batch_size)
    if not spec.flip:
        return tokens, None
    return tokens, encode_images(model, np.ascontiguousarray(images[..., ::-1]), spec.batch_size)


def encode_in_worker(spec: JobSpec, images: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray | None], float]:
    """`encode_batch` in a worker process, on the one torch thread a worker has (see
    pipelines/stages.py), and the CPU seconds it took."""
    started = time.process_time()
    torch.set_num_threads(1)
    return encode_batch(spec, images), time.process_time() - started


def process_shard(task: ShardTask, workers: int = 1, encode_on_workers: bool | None = None) -> dict[str, Any]:
    """Tokenize one shard's inputs with its stages overlapped (pipelines/stages.py) on
    `workers` worker processes, publish the shard, then its record; the record (plus the
    task's CPU seconds, its workers' included, which stay out of the stored record).
    The workers encode too when the device is the CPU (`encode_on_workers` None), else an
    encoding thread of this process does."""
    cpu_started = time.process_time()
    spec = task.spec
    if encode_on_workers is None:
        encode_on_workers = pick_device(spec.device).type == "cpu"
    text_encoder = _text_encoder(spec)
    pool = stages.worker_pool(workers)
    rejected: list[stages.Prepared] = []
    samples: list[TokenSample] = []
    worker_cpu_s: list[float] = []
    builder = shards.ShardBuilder()
    with (ThreadPoolExecutor(1, "pretokenize-read") as reader,
          ThreadPoolExecutor(1, "pretokenize-encode") as encoder_thread,
          ThreadPoolExecutor(1, "pretokenize-write") as writer):
        # Reads come in chunks of two batches; a worker decodes one batch's worth of inputs
        # per call, up to two calls per worker ahead of the encoder, which runs up to one
        # batch per worker (or, on a GPU, one batch) ahead of the writer.
        inputs = stages.prepared(task.items, spec.resolution, spec.max_pixels, spec.min_side, reader, pool,
                                 chunk=2 * spec.batch_size, piece=spec.batch_size, depth=2 * workers,
                                 cpu_seconds=worker_cpu_s)
        calls = ((batch, (spec, np.stack([one.array for one in batch])))
                 for batch in stages.batches(inputs, spec.batch_size, rejected))
        if encode_on_workers:
            encoded = ((batch, ids, seconds) for batch, (ids, seconds)
                       in stages.ahead(pool, encode_in_worker, calls, depth=workers))
        else:  # the encoding thread's CPU seconds are this process's own
            encoded = ((batch, ids, 0.0) for batch, ids
                       in stages.ahead(encoder_thread, encode_batch, calls, depth=1))
        written = []
        for batch, (tokens, flips), seconds in encoded:
            worker_cpu_s.append(seconds)
            encoded_samples = [TokenSample(key=one.item.key, tokens=tokens[i], label=one.item.label,
                                           flip_tokens=None if flips is None else flips[i],
                                           caption=one.caption, meta=one.meta) for i, one in enumerate(batch)]
            samples += encoded_samples
            if text_encoder is None:  # else serialised once the captions are embedded
                written.append(writer.submit(builder.add, encoded_samples))
        if text_encoder is not None and samples:
            # One call for the whole shard, as the encoder batches (and sorts) captions itself.
            text, mask = text_encoder.encode([sample.caption for sample in samples])
            for i, sample in enumerate(samples):
                sample.text, sample.text_mask = text[i], mask[i]
            written.append(writer.submit(builder.add, samples))
        for future in written:
            future.result()
    entry = shards.publish_shard(task.shard_url, builder.finish(), len(samples)) if samples else None
    record = {"index": task.index, "shard": entry, "inputs": len(task.items), "written": len(samples),
              "rejected": [{"input": one.item.source, "reason": one.reason} for one in rejected],
              "converted": [{"input": sample.meta["source"], "note": sample.meta["converted"]}
                            for sample in samples if "converted" in sample.meta]}
    storage.write_bytes(task.record_url, json.dumps(record, sort_keys=True).encode())
    return {**record, "cpu_s": time.process_time() - cpu_started + sum(worker_cpu_s)}


def finish(job: Job, run: dict[str, Any]) -> Manifest:
    """Merge the shard records into manifest.json (written last) and clean up."""
    raw = read_blobs([Blob(task.record_url) for task in job.tasks])
    missing = [task.index for task, data in zip(job.tasks, raw, strict=True) if isinstance(data, Exception)]
    if missing:
        raise PretokenizeError(f"{len(missing)} shards have no record (first: {missing[0]}): rerun the job")
    records = [json.loads(data) for data in raw]
    entries = [record["shard"] for record in records if record["shard"] is not None]
    rejected = job.plan.rejected + [r for record in records for r in record["rejected"]]
    inputs = len(job.plan.items) + len(job.plan.rejected)
    written = sum(entry["count"] for entry in entries)
    if written != inputs - len(rejected):
        raise PretokenizeError(f"shard records disagree with the plan ({written} written + "
                               f"{len(rejected)} rejected != {inputs} inputs): rerun with verify=true")
    try:
        version = metadata.version("enat")
    except metadata.PackageNotFoundError:
        version = "unknown"
    manifest = Manifest(
        tokenizer_id=job.tokenizer_id, tokenizer_sha256=job.spec.tokenizer_sha256,
        resolution=job.spec.resolution, grid=job.grid, codebook_size=job.codebook_size,
        source=job.config.source, classes=job.plan.classes, text_encoder=job.text_info,
        splits={job.spec.split: entries}, rejected=rejected,
        totals={"inputs": inputs, "written": written, "rejected": len(rejected),
                "converted": sum(len(record["converted"]) for record in records), "shards": len(entries)},
        tool_version=version, converted=[c for record in records for c in record["converted"]],
        flip=job.spec.flip, tokenizer_url=job.spec.tokenizer, plan_sha256=job.fingerprint, run=run)
    shards.write_manifest(job.config.out, manifest)
    storage.remove(storage.join(job.config.out, PARTS_DIR), recursive=True)
    storage.remove_temporaries(job.config.out)
    for folder in (job.config.out, storage.join(job.config.out, job.spec.split)):
        storage.remove(storage.join(folder, storage.TMP_DIR), recursive=True)  # empty local folders
    return manifest
