"""`enat pretokenize`: the thin Ray driver around pipelines/pretokenize.py.

One Ray task per output shard, at most `workers` in flight, each asking for
`cpus_per_task` CPUs (and a GPU fraction on a cluster with GPUs); Ray retries a failed
task `max_retries` times. Ray is the local one by default, or the cluster at RAY_ADDRESS.
A task that still fails does not stop the others: the job ends without a manifest and
says to rerun, which redoes only the missing shards. `--inspect OUT` prints a finished
job's summary and writes a PNG grid of a few samples decoded back through the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from enat.cluster.command import Command
from enat.cluster.ray_session import ray_session
from enat.models.typed_config import to_dict
from enat.pipelines.config import PretokenizeConfig
from enat.pipelines.shards import Manifest

DEFAULT_GPU_FRACTION = 0.25


def _shard_task(task: Any, cpus: int) -> dict[str, Any]:
    import torch

    from enat.pipelines.pretokenize import process_shard
    from enat.pipelines.stages import workers_for

    workers, torch_threads = workers_for(cpus)
    torch.set_num_threads(torch_threads)  # the task's CPU share, not the whole machine
    return process_shard(task, workers)


def _task_options(config: PretokenizeConfig) -> tuple[dict[str, Any], int]:
    """Ray options of a shard task and how many tasks to keep in flight."""
    import ray

    resources = ray.cluster_resources()
    gpus = config.gpus_per_task
    if gpus is None:
        gpus = DEFAULT_GPU_FRACTION if resources.get("GPU", 0) > 0 else 0.0
    workers = config.workers or max(1, int(resources.get("CPU", 1) // config.cpus_per_task))
    options = {"num_cpus": config.cpus_per_task, "num_gpus": gpus,
               "max_retries": config.max_retries, "retry_exceptions": True}
    return options, workers


def run_shards(job: Any, config: PretokenizeConfig, progress: bool = True) -> tuple[list, list]:
    """Run the job's pending shards as Ray tasks; (records, failures as (index, error))."""
    import ray
    from tqdm import tqdm

    options, workers = _task_options(config)
    remote = ray.remote(_shard_task).options(**options)
    queue = list(reversed(job.pending))  # pop() takes shards in plan order
    in_flight: dict[Any, Any] = {}
    records, failures, rejected = [], [], 0
    bar = tqdm(total=sum(len(task.items) for task in job.pending), unit="img", desc="pretokenize",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    while queue or in_flight:
        while queue and len(in_flight) < workers:
            task = queue.pop()
            in_flight[remote.remote(task, config.cpus_per_task)] = task
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            task = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as err:
                failures.append((task.index, err))
            else:
                records.append(record)
                rejected += len(record["rejected"])
            bar.set_postfix(shards=f"{len(records)}/{len(job.pending)}", rejected=rejected, refresh=False)
            bar.update(len(task.items))
    bar.close()
    return records, failures


def run_pretokenize(config: PretokenizeConfig, progress: bool = True) -> int:
    """The whole job, holding the output's lease: prepare (fail fast), shard tasks on Ray,
    manifest, MLflow, summary."""
    from enat.pipelines import storage
    from enat.pipelines.lease import new_owner
    from enat.pipelines.pretokenize import output_lease

    config.require()
    storage.check_writable(config.out)  # before the lease is written: a clear error for bad credentials
    with output_lease(config.out, new_owner("pretokenize"), config.lease).held():
        return _pretokenize(config, progress)


def _pretokenize(config: PretokenizeConfig, progress: bool) -> int:
    from enat.pipelines.pretokenize import prepare
    from enat.pipelines.tracking import Tracker

    started = time.monotonic()
    job = prepare(config)
    if job.complete is not None:
        print(f"already complete: {config.out}/manifest.json")
        print("\n".join(summary_lines(job.complete, config.out)))
        return 0
    print(f"{len(job.plan.items)} inputs in {len(job.tasks)} shards, {len(job.pending)} to do "
          f"({len(job.tasks) - len(job.pending)} finished before)", file=sys.stderr, flush=True)
    tracker = Tracker(config.experiment, f"pretokenize-{config.split}", enabled=config.track,
                      tags={"tokenizer_id": job.tokenizer_id, "tokenizer_sha256": job.spec.tokenizer_sha256,
                            "output": config.out})
    tracker.log_params(to_dict(config))
    try:
        manifest = _run_job(job, config, started, progress, tracker)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if manifest is None:
        tracker.finish("FAILED")
        return 1
    tracker.log_text(json.dumps(manifest.rejected, indent=1), "rejected.json")
    tracker.log_text(manifest.to_json(), "manifest.json")
    tracker.finish()
    print("\n".join(summary_lines(manifest, config.out)))
    return 0


def _run_job(job: Any, config: PretokenizeConfig, started: float, progress: bool, tracker: Any) -> Any:
    """The shard tasks, then the manifest; None (with the reason printed) if shards failed."""
    from enat.pipelines.pretokenize import finish

    with ray_session():
        shards_started = time.monotonic()
        records, failures = run_shards(job, config, progress)
        shards_seconds = time.monotonic() - shards_started
    processed = sum(record["inputs"] for record in records)
    # Throughput of the shard tasks (worker start-up and model loading included, Ray's own
    # start-up and the listing not).
    run = {"elapsed_s": round(time.monotonic() - started, 3), "shards_s": round(shards_seconds, 3),
           "images_per_s": round(processed / max(shards_seconds, 1e-9), 2),
           "cpu_s": round(sum(record["cpu_s"] for record in records), 3),
           "inputs_this_run": processed, "shards_this_run": len(records),
           "shards_resumed": len(job.tasks) - len(job.pending)}
    if failures:
        index, error = failures[0]
        first = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
        print(f"enat: error: {len(failures)} of {len(job.tasks)} shards failed after retries (first: "
              f"shard {index}: {first}); rerun the same command to redo only those", file=sys.stderr)
        tracker.log_metrics({"failed_shards": len(failures), **_numbers(run)}, step=0)
        return None
    manifest = finish(job, run)
    tracker.log_metrics({**manifest.totals, **_numbers(run)}, step=0)
    return manifest


def _numbers(run: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in run.items() if isinstance(value, (int, float))}


def inspect_output(out: str, samples: int, grid_path: str, tokenizer_url: str = "") -> list[str]:
    """Summary lines of a finished job; writes a PNG grid of `samples` decoded samples
    (their mirrored copies in the rows below, when stored)."""
    import numpy as np
    import torch
    from PIL import Image

    from enat.pipelines.model_io import load_tokenizer
    from enat.pipelines.pretokenize import PretokenizeError
    from enat.pipelines.shards import read_manifest, read_shard

    manifest = read_manifest(out)
    tokenizer = load_tokenizer(tokenizer_url or manifest.tokenizer_url)
    if tokenizer.sha256 != manifest.tokenizer_sha256:
        raise PretokenizeError(f"tokenizer {tokenizer.url} is not the one that made {out} "
                               f"({tokenizer.model_id} != {manifest.tokenizer_id}): pass tokenizer=...")
    shown = []
    for url in (u for split in manifest.splits for u in manifest.shard_urls(out, split)):
        shown += read_shard(url)[: samples - len(shown)]
        if len(shown) >= samples:
            break
    lines = summary_lines(manifest, out)
    for sample in shown:
        what = sample.caption if sample.caption is not None else (
            f"class {sample.label} ({manifest.classes[sample.label]})" if sample.label is not None else "-")
        lines.append(f"  {sample.key}: {what}  <- {sample.meta.get('source', '?')}")
    ids = [s.tokens for s in shown] + [s.flip_tokens for s in shown if s.flip_tokens is not None]
    with torch.inference_mode():
        pixels = tokenizer.model.decode(torch.from_numpy(np.stack(ids).astype(np.int64))).clamp(0, 1)
    tiles = (pixels * 255).round().byte().permute(0, 2, 3, 1).numpy()
    columns, size = min(8, len(shown)), tiles.shape[1]
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * size, rows * size), "white")
    for index, tile in enumerate(tiles):
        grid.paste(Image.fromarray(tile), ((index % columns) * size, (index // columns) * size))
    Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(grid_path)
    lines.append(f"decoded {len(shown)} samples{' and their mirrored copies' if manifest.flip else ''} "
                 f"-> {grid_path}")
    return lines


def reason_kind(reason: str) -> str:
    """'absurd dimensions 100000x100000 (over ...)' -> 'absurd dimensions', for counting."""
    head = reason.split(" (")[0].split(":")[0]
    return re.sub(r"\s*\S*\d\S*", "", head).strip() or head


def summary_lines(manifest: Manifest, out: str) -> list[str]:
    totals, run = manifest.totals, manifest.run
    by_reason = Counter(reason_kind(r["reason"]) for r in manifest.rejected)
    reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(by_reason.items()))
    lines = [f"inputs {totals['inputs']}, written {totals['written']}, rejected {totals['rejected']}"
             + (f" ({reasons})" if reasons else "") + f", converted {totals.get('converted', 0)}",
             f"shards {totals['shards']} ({', '.join(f'{s}: {len(e)}' for s, e in manifest.splits.items())})"
             + (f", {run['images_per_s']:.1f} images/s" if "images_per_s" in run else ""),
             f"tokenizer {manifest.tokenizer_id}, {manifest.resolution}px -> grid "
             f"{'x'.join(map(str, manifest.grid))}, codebook {manifest.codebook_size}"
             + (", flip" if manifest.flip else "")
             + (f", text {manifest.text_encoder['id']}" if manifest.text_encoder else ""),
             f"output {out}"]
    return lines


def _run(config: PretokenizeConfig, args: argparse.Namespace) -> int:
    if args.inspect:
        print("\n".join(inspect_output(args.inspect, args.samples, args.grid, config.tokenizer)))
        return 0
    return run_pretokenize(config, progress=not args.no_progress)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inspect", metavar="OUT", help="summarise a finished job and decode a few "
                        "samples to a PNG grid instead of running")
    parser.add_argument("--samples", type=int, default=16, help="samples to decode with --inspect")
    parser.add_argument("--grid", default="pretokenize-inspect.png",
                        help="where --inspect writes the PNG grid (default ./pretokenize-inspect.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def commands() -> dict[str, dict[str, Command]]:
    return {"": {"pretokenize": Command(
        "pretokenize images into token shards (imagenet:/cc3m:/folder: sources) with Ray",
        PretokenizeConfig, _run, {"--source": "source", "--out": "out", "--tokenizer": "tokenizer"},
        add_arguments=_arguments)}}
