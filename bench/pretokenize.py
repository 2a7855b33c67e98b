"""Pretokenization throughput: the pipeline against its decode and encode stages alone.

    .venv/bin/python bench/pretokenize.py --json [--images 1000] [--tokenizer DIR] [--out URL]

Inputs are the demo data set's emoji (72x72 PNG, ImageNet-style tree); the tokenizer is
the tiny preset with seed-0 weights unless --tokenizer names an exported one. Measured
with the decoder processes and torch threads a task of `--cpus` CPUs gets
(pipelines/stages.py `workers_for`), CPU seconds of the decoder processes included:
- `decode_images_per_s`: decode + resize alone, the decoders over bytes in memory;
- `encode_images_per_s`: the tokenizer's encode alone over the same (preprocessed) images;
- `pipeline_images_per_s`: the whole pipeline as one Ray task of `--cpus` CPUs at a time
  (read, decode, encode, write the shard and its record);
- `pipeline_overhead_per_cpu_s`: 1 - the pipeline's images per CPU-second over those of
  decode then encode done alone (1 / (1/decode + 1/encode), per CPU-second): the CPU the
  pipeline spends beyond its two stages (reading, writing, threads, Ray);
- `pipeline_over_slower_stage`: the pipeline's images/s over the slower stage's alone;
- `pipeline_images_per_s_1`/`_2`: 1 and 2 workers of 1 CPU each, and their ratio.
Every measured job follows a warm-up job of its task size, so the figures are steady
state: workers and their decoders started, models loaded. Per-CPU-second figures hold up
under other load; images/s do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer(folder: Path) -> str:
    import torch
    import yaml

    from enat.models import build_config, build_model
    from enat.pipelines.model_io import save_model

    config = build_config(yaml.safe_load((REPO_ROOT / "configs/models/tiny-tokenizer.yaml").read_text()))
    torch.manual_seed(0)
    save_model(str(folder), build_model(config), config)
    return str(folder)


def _timed(work: Callable[[], tuple[int, float]], seconds: float) -> tuple[float, float]:
    """Images per second and per CPU-second of `work`, which returns how many images it did
    and the CPU seconds its helper processes spent (this process's own are counted here),
    repeated for at least `seconds` after a warm-up."""
    work()
    done, helpers_cpu_s, started, cpu_started = 0, 0.0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        images, cpu_s = work()
        done, helpers_cpu_s = done + images, helpers_cpu_s + cpu_s
    return done / (time.perf_counter() - started), done / (time.process_time() - cpu_started + helpers_cpu_s)


def stage_throughputs(tokenizer_url: str, emoji: list, resolution: int, batch_size: int, cpus: int,
                      seconds: float = 5.0) -> dict[str, float]:
    """Decode + resize alone and encode alone, each with the workers of a `cpus`-CPU task,
    fed as the pipeline feeds them (decoder pieces of a batch, fixed encoder batches)."""
    import numpy as np
    import torch

    from enat.pipelines.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
    from enat.pipelines.model_io import load_tokenizer
    from enat.pipelines.pretokenize import encode_images
    from enat.pipelines.sources import Blob, InputItem
    from enat.pipelines.stages import ahead, decode_pool, prepare_inputs, workers_for

    decoders, torch_threads = workers_for(cpus)
    inputs = [(InputItem(str(i), e.slug, Blob(str(e.path)), 0), e.path.read_bytes(), None)
              for i, e in enumerate(emoji)]
    piece = -(-batch_size // decoders)
    calls = [(inputs[start : start + piece], resolution, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE)
             for start in range(0, len(inputs), piece)]
    arrays: list = []

    def decode() -> tuple[int, float]:
        results = list(ahead(decode_pool(decoders), prepare_inputs, calls, 2 * decoders))
        arrays[:] = [one.array for done, _ in results for one in done]
        return len(arrays), sum(cpu_s for _, cpu_s in results)

    decode_s, decode_cpu_s = _timed(decode, seconds)
    torch.set_num_threads(torch_threads)
    model, images = load_tokenizer(tokenizer_url).model, np.stack(arrays)
    encode_s, encode_cpu_s = _timed(lambda: (len(encode_images(model, images, batch_size)), 0.0), seconds)
    return {"decode_images_per_s": decode_s, "decode_images_per_cpu_s": decode_cpu_s,
            "encode_images_per_s": encode_s, "encode_images_per_cpu_s": encode_cpu_s,
            "decoders": decoders, "torch_threads": torch_threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs per task of the stage and pipeline runs")
    parser.add_argument("--tokenizer", default="", help="exported tokenizer folder (default: tiny preset)")
    parser.add_argument("--resolution", type=int, default=0, help="0 = the tokenizer's image_size")
    parser.add_argument("--out", default="", help="output root URL (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    from enat.cluster.pretokenize_cmd import run_pretokenize
    from enat.pipelines.config import PretokenizeConfig
    from enat.pipelines.demo_data import list_emoji, write_imagenet_tree
    from enat.pipelines.model_io import load_tokenizer
    from enat.pipelines.shards import read_manifest

    scratch = Path(tempfile.mkdtemp(prefix="enat-bench-"))
    try:
        tokenizer = args.tokenizer or tiny_tokenizer(scratch / "tokenizer")
        resolution = args.resolution or load_tokenizer(tokenizer).config.image_size
        emoji = list_emoji(args.images)
        write_imagenet_tree(emoji, scratch / "data")
        write_imagenet_tree(emoji[: 2 * args.batch_size], scratch / "warmup")
        out_root = args.out or str(scratch / "out")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=max(2, args.cpus), include_dashboard=False, log_to_driver=False)
        try:
            def run(source: Path, name: str, workers: int, cpus: int, shard_size: int) -> dict:
                out = f"{out_root.rstrip('/')}/{name}"
                config = PretokenizeConfig(source=f"imagenet:{source}", out=out, tokenizer=tokenizer,
                                           shard_size=shard_size, batch_size=args.batch_size,
                                           resolution=resolution, workers=workers, cpus_per_task=cpus,
                                           track=False)
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
                    assert run_pretokenize(config, progress=not args.json) == 0
                return read_manifest(out).run

            run(scratch / "warmup", "warmup-1", 2, 1, args.batch_size)  # start both workers, load models
            one = run(scratch / "data", "workers-1", 1, 1, args.shard_size)
            two = run(scratch / "data", "workers-2", 2, 1, args.shard_size)
            # The first job with another task size runs measurably slower (here 480 against
            # 800 images/s: decoders to start, torch's thread pool to regrow), so the
            # measured one follows a whole job of its own size.
            run(scratch / "data", f"warmup-{args.cpus}", 1, args.cpus, args.shard_size)
            pipeline = run(scratch / "data", f"cpus-{args.cpus}", 1, args.cpus, args.shard_size)
        finally:
            ray.shutdown()
        stages = stage_throughputs(tokenizer, emoji, resolution, args.batch_size, args.cpus)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    pipeline_per_cpu_s = pipeline["inputs_this_run"] / pipeline["cpu_s"]
    both_per_cpu_s = 1 / (1 / stages["decode_images_per_cpu_s"] + 1 / stages["encode_images_per_cpu_s"])
    slower = min(stages["decode_images_per_s"], stages["encode_images_per_s"])
    result = {
        "cpus_per_task": args.cpus,
        **{key: round(value, 2) for key, value in stages.items()},
        "pipeline_images_per_s": pipeline["images_per_s"],
        "pipeline_images_per_cpu_s": round(pipeline_per_cpu_s, 2),
        "decode_encode_images_per_cpu_s": round(both_per_cpu_s, 2),
        "pipeline_overhead_per_cpu_s": round(1 - pipeline_per_cpu_s / both_per_cpu_s, 3),
        "pipeline_over_slower_stage": round(pipeline["images_per_s"] / slower, 3),
        "pipeline_images_per_s_1": one["images_per_s"],
        "pipeline_images_per_s_2": two["images_per_s"],
        "scaling_2_over_1": round(two["images_per_s"] / one["images_per_s"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "images": len(emoji), "shard_size": args.shard_size, "batch_size": args.batch_size,
        "resolution": resolution, "tokenizer": "tiny-tokenizer (seed 0)" if not args.tokenizer else tokenizer,
        "output": "local folder" if not args.out else args.out.split("://")[0],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
