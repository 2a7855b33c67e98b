"""Pretokenization throughput: the whole pipeline on a local Ray with 1 and 2 workers,
against the tokenizer's own encode throughput at the same batch size.

    .venv/bin/python bench/pretokenize.py --json [--images 1000] [--tokenizer DIR] [--out URL]

Inputs are the demo data set's emoji (72x72 PNG, ImageNet-style tree); the tokenizer is
the tiny preset with seed-0 weights unless --tokenizer names an exported one. Both runs
follow a warm-up job, so the figures are steady state: workers started, models loaded.
Each worker is one CPU (one torch thread); `encode_images_per_s` uses one thread too.
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


def encode_throughput(tokenizer_url: str, resolution: int, batch_size: int,
                      seconds: float = 5.0) -> tuple[float, float]:
    """Images per second and per CPU-second of tokenizer.encode alone on one thread
    (preprocessed uint8 batches in)."""
    import numpy as np
    import torch

    from enat.pipelines.model_io import load_tokenizer
    from enat.pipelines.pretokenize import encode_images

    torch.set_num_threads(1)
    model = load_tokenizer(tokenizer_url).model
    shape = (batch_size, 3, resolution, resolution)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    encode_images(model, images, batch_size)  # warm-up
    done, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        encode_images(model, images, batch_size)
        done += batch_size
    return done / (time.perf_counter() - started), done / (time.process_time() - cpu_started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
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
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            def run(source: Path, name: str, workers: int, shard_size: int) -> dict:
                out = f"{out_root.rstrip('/')}/{name}"
                config = PretokenizeConfig(source=f"imagenet:{source}", out=out, tokenizer=tokenizer,
                                           shard_size=shard_size, batch_size=args.batch_size,
                                           resolution=resolution,
                                           workers=workers, track=False)
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
                    assert run_pretokenize(config, progress=not args.json) == 0
                return read_manifest(out).run

            run(scratch / "warmup", "warmup", 2, args.batch_size)  # start both workers, load models
            one = run(scratch / "data", "workers-1", 1, args.shard_size)
            two = run(scratch / "data", "workers-2", 2, args.shard_size)
        finally:
            ray.shutdown()
        encode, encode_per_cpu_s = encode_throughput(tokenizer, resolution, args.batch_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "pipeline_images_per_s_1": one["images_per_s"],
        "pipeline_images_per_s_2": two["images_per_s"],
        "encode_images_per_s": round(encode, 2),
        "scaling_2_over_1": round(two["images_per_s"] / one["images_per_s"], 3),
        "pipeline_1_over_encode": round(one["images_per_s"] / encode, 3),
        # Per CPU-second of the tasks (decode, resize, encode, write): robust to other load.
        "pipeline_images_per_cpu_s": round(one["inputs_this_run"] / one["cpu_s"], 2),
        "encode_images_per_cpu_s": round(encode_per_cpu_s, 2),
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
