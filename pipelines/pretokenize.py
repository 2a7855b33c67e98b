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


def _models(spec: JobSpec) -> tuple[Any, TextEncoder | None]:
    device = pick_device(spec.device)
    key = (spec.tokenizer, spec.tokenizer_config, spec.tokenizer_sha256, device)
    if key not in _LOADED:
        tokenizer = load_tokenizer(spec.tokenizer, spec.tokenizer_config, device)
        if tokenizer.sha256 != spec.tokenizer_sha256:
            raise PretokenizeError(f"the tokenizer at {spec.tokenizer} changed during the job")
        _LOADED[key] = tokenizer
    tokenizer = _LOADED[key]
    if spec.text is None:
        return tokenizer, None
    text_key = ("text", spec.text.name, spec.text.max_len, spec.text.batch_size, device)
    if text_key not in _LOADED:
        _LOADED[text_key] = TextEncoder(spec.text, device)
    return tokenizer, _LOADED[text_key]


def encode_images(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, 3, H, W] -> uint16 ids [N, h, w]; float32, fixed batches (deterministic)."""
    device = next(model.parameters()).device
    ids = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).float() / 255.0
            ids.append(model.encode(batch).cpu().numpy().astype(np.uint16))
    return np.concatenate(ids)


def process_shard(task: ShardTask, decoders: int = 1) -> dict[str, Any]:
    """Tokenize one shard's inputs with its stages overlapped (pipelines/stages.py) and
    `decoders` decoding processes, publish the shard, then its record; the record (plus
    the task's CPU seconds, decoders included, which stay out of the stored record)."""
    cpu_started = time.process_time()
    spec = task.spec
    tokenizer, text_encoder = _models(spec)
    rejected: list[stages.Prepared] = []
    samples: list[TokenSample] = []
    decode_cpu_s: list[float] = []
    builder = shards.ShardBuilder()
    with (ThreadPoolExecutor(1, "pretokenize-read") as reader,
          ThreadPoolExecutor(1, "pretokenize-write") as writer):
        # Reads come in chunks of two batches; each decoder takes a share of a batch at a
        # time, and the pool runs up to two batches ahead of the encoder.
        piece = -(-spec.batch_size // decoders)
        inputs = stages.prepared(task.items, spec.resolution, spec.max_pixels, spec.min_side, reader,
                                 stages.decode_pool(decoders), chunk=2 * spec.batch_size, piece=piece,
                                 depth=2 * decoders, cpu_seconds=decode_cpu_s)
        written = []
        for batch in stages.batches(inputs, spec.batch_size, rejected):
            encoded = _samples(batch, tokenizer.model, spec)
            samples += encoded
            if text_encoder is None:  # else serialised once the captions are embedded
                written.append(writer.submit(builder.add, encoded))
        if text_encoder is not None and samples:
            # One call for the whole shard, as the encoder batches (and sorts) captions itself.
            text, mask = text_encoder.encode([sample.caption for sample in samples])
            for i, sample in enumerate(samples):
                sample.text, sample.text_mask = text[i], mask[i]
            written.append(writer.submit(builder.add, samples))
        for future in written:
            future.result()
    entry = shards.publish_shard(task.shard_url, builder.finish(), len(samples)) if samples else None
    kept = [sample.meta for sample in samples]
    record = {"index": task.index, "shard": entry, "inputs": len(task.items), "written": len(samples),
              "rejected": [{"input": one.item.source, "reason": one.reason} for one in rejected],
              "converted": [{"input": meta["source"], "note": meta["converted"]}
                            for meta in kept if "converted" in meta]}
    storage.write_bytes(task.record_url, json.dumps(record, sort_keys=True).encode())
    return {**record, "cpu_s": time.process_time() - cpu_started + sum(decode_cpu_s)}


def _samples(batch: list[stages.Prepared], model: Any, spec: JobSpec) -> list[TokenSample]:
    """One batch of kept inputs encoded (and its mirrored copy, as a batch of its own)."""
    images = np.stack([one.array for one in batch])
    tokens = encode_images(model, images, spec.batch_size)
    mirrored = np.ascontiguousarray(images[..., ::-1]) if spec.flip else None
    flips = encode_images(model, mirrored, spec.batch_size) if spec.flip else None
    return [TokenSample(key=one.item.key, tokens=tokens[i], flip_tokens=None if flips is None else flips[i],
                        label=one.item.label, caption=one.caption, meta=one.meta)
            for i, one in enumerate(batch)]


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
