"""GPU benchmark: golden checks, SDPA kernels, bf16 matmul peak, training, generation, VQGAN.

One command, one JSON file (see README, Benchmarks). On one GPU it measures:
- golden: every reference-fixture output (enat.models.golden) on the device, fp32 with the
  fixtures' tolerance (TF32 off) and under bf16 autocast with a loose one;
- sdpa_backend: the attention kernels a bf16 forward of each model runs (read from the profiler);
- matmul_peak_bf16_tflops: a large bf16 matmul, MFU's denominator;
- train: samples/s and MFU of the trainer's own step for ENAT-S/B/L, eager and torch.compile,
  DeepSpeed ZeRO-0 (no partitioning: the plain engine) and ZeRO-2, one rank each;
- generate: images/s of the evaluation sampler (8 steps, CFG, VQ decode included) for ENAT-L
  with and without reuse and AutoNAT-L, at batch 64 and 250;
- vqgan: MaskGIT-VQGAN encode and decode images/s at 256 px.
Weights are random (speed only); nothing is downloaded. `--tiny` runs every path with tiny
shapes and few iterations (tests/test_bench_gpu.py runs it on the CPU) and writes the same keys.

    .venv/bin/python bench/gpu.py [--device auto|cuda|cpu] [--tiny] [--out bench/results-gpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import gpu_parts as parts
import torch
import yaml

from enat.models import build_config
from enat.models.device import pick_device
from enat.trainer.distributed import init_distributed
from enat.trainer.metrics import matmul_peak
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent / "configs" / "models"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU run's, or the tiny stand-ins that exercise the same code."""

    train_batch: dict[str, int]  # per-GPU batch of each trained preset
    train_steps: int  # timed steps (the warm-up runs as many)
    compile_backend: str
    generate_batches: tuple[int, ...]
    generate_repeats: int
    vqgan_batch: int
    vqgan_repeats: int
    peak_size: int
    peak_repeats: int
    transformer_sizes: dict  # replaced in every token-transformer preset ({} = as published)
    tokenizer_sizes: dict  # replaced in the VQGAN preset


# Per-GPU batches as the ENAT recipe (global 2048 over 8 GPUs is 256 each) where memory
# allows; ENAT-L at 128 fits 80 GB with its EMA. Override with --train-batch.
FULL = Plan(train_batch={"enat-s": 256, "enat-b": 256, "enat-l": 128}, train_steps=10,
            compile_backend="inductor", generate_batches=(64, 250), generate_repeats=1, vqgan_batch=64,
            vqgan_repeats=3, peak_size=8192, peak_repeats=50, transformer_sizes={}, tokenizer_sizes={})
# Inductor's C++ code generation takes minutes on two CPU cores; aot_eager runs the same
# capture (Dynamo graphs, AOTAutograd, recompiles on new token counts) without it.
TINY = Plan(train_batch={"enat-s": 4, "enat-b": 4, "enat-l": 4}, train_steps=2, compile_backend="aot_eager",
            generate_batches=(2, 3), generate_repeats=1, vqgan_batch=2, vqgan_repeats=1, peak_size=256,
            peak_repeats=3,
            transformer_sizes={"width": 32, "heads": 2, "encoder_depth": 2, "decoder_depth": 1, "depth": 2,
                               "grid_size": 4, "codebook_size": 64, "num_classes": 10},
            tokenizer_sizes={"base_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "code_dim": 8,
                             "codebook_size": 64, "image_size": 32})
GOLDEN_BF16 = {"rtol": 0.05, "atol": 0.2, "id_mismatch_allowed": 0.05}  # bf16 keeps ~3 digits


def preset(name: str, sizes: dict):
    raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    return build_config({**raw, **{k: v for k, v in sizes.items() if k in raw}})


def timed(section: str, seconds: dict, work):
    print(f"bench-gpu: {section} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = work()
    seconds[section] = round(time.perf_counter() - started, 2)
    return result


def train_section(plan: Plan, device: torch.device, peak: float) -> dict:
    configs = {name: preset(name, plan.transformer_sizes) for name in plan.train_batch}
    first = next(iter(configs.values()))
    with tempfile.TemporaryDirectory(prefix="enat-bench-gpu-") as tmp:
        # The trainer opens a data set (for its checks); steps then run on in-memory batches.
        write_synthetic_shards(f"{tmp}/data", SyntheticSpec(grid=first.grid_shape[0], samples=64,
                                                            codebook_size=first.codebook_size,
                                                            num_classes=first.num_classes, per_shard=64))
        results = {}
        for name, config in configs.items():
            batch = plan.train_batch[name]
            entry = {"batch_size_per_gpu": batch, "timed_steps": plan.train_steps}
            for compiled in (False, True):
                for stage in (0, 2):
                    print(f"bench-gpu:   {name} zero{stage} {'compiled' if compiled else 'eager'}",
                          file=sys.stderr, flush=True)
                    entry[f"{'compiled' if compiled else 'eager'}_zero{stage}"] = parts.train_rates(
                        config, f"{tmp}/data", f"{tmp}/root", batch, stage,
                        plan.compile_backend if compiled else None, plan.train_steps, peak, device)
            results[name] = entry
    return results


def generate_section(plan: Plan, device: torch.device) -> dict:
    tokenizer = preset("maskgit-vqgan-f16", plan.tokenizer_sizes)
    results = {}
    for key, name, reuse in (("enat-l_reuse", "enat-l", True), ("enat-l_noreuse", "enat-l", False),
                             ("autonat-l", "autonat-l", True)):
        config = preset(name, plan.transformer_sizes)
        results[key] = {f"batch_{batch}_images_per_s": parts.generation_rate(
            config, tokenizer, batch, reuse, 8, plan.generate_repeats, device)
            for batch in plan.generate_batches}
        results[key].update(steps=8, cfg=True, includes_vq_decode=True)
    return results


def vqgan_section(plan: Plan, device: torch.device) -> dict:
    config = preset("maskgit-vqgan-f16", plan.tokenizer_sizes)
    return {"resolution_px": config.image_size, "batch": plan.vqgan_batch,
            **parts.tokenizer_rates(config, plan.vqgan_batch, plan.vqgan_repeats, device)}


def run(plan: Plan, device: torch.device, tiny: bool) -> dict:
    started, seconds = time.perf_counter(), {}
    init_distributed()  # the trainer's one-rank process group, made once for every engine
    report = {"bench": "gpu", "mode": "tiny" if tiny else "full", "device": device.type,
              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else platform.machine()),
              "torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "precision": "bf16 autocast (fp32 weights)", "compile_backend": plan.compile_backend}
    report["golden"] = timed("golden", seconds, lambda: {
        "fp32": parts.golden(device, bf16=False, rtol=None, atol=None, id_mismatch_allowed=0.0),
        "bf16_autocast": parts.golden(device, bf16=True, **GOLDEN_BF16)})
    report["sdpa_backend"] = timed("sdpa", seconds, lambda: {
        name: parts.sdpa_backends(preset(name, plan.transformer_sizes), device)
        for name in ("enat-s", "enat-b", "enat-l", "autonat-l")})
    peak = timed("peak", seconds,
                 lambda: matmul_peak(device, torch.bfloat16, plan.peak_size, plan.peak_repeats))
    report["matmul_peak_bf16_tflops"] = peak / 1e12
    report["matmul_peak_size"] = plan.peak_size
    report["train"] = timed("train", seconds, lambda: train_section(plan, device, peak))
    report["generate"] = timed("generate", seconds, lambda: generate_section(plan, device))
    report["vqgan"] = timed("vqgan", seconds, lambda: vqgan_section(plan, device))
    report["section_seconds"] = seconds
    report["wall_time_s"] = round(time.perf_counter() - started, 2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few iterations: checks the paths")
    parser.add_argument("--out", default=str(HERE / "results-gpu.json"))
    parser.add_argument("--train-batch", action="append", default=[], metavar="PRESET=N",
                        help="per-GPU training batch of a preset, e.g. enat-l=64 (repeatable)")
    args = parser.parse_args()
    plan = TINY if args.tiny else FULL
    for item in args.train_batch:
        name, _, value = item.partition("=")
        if name not in plan.train_batch or not value.isdigit():
            parser.error(f"--train-batch {item}: expected one of {', '.join(plan.train_batch)}=N")
        plan = replace(plan, train_batch={**plan.train_batch, name: int(value)})
    if args.device == "cpu":
        # The trainer takes a visible GPU whatever it is asked; hiding them before CUDA starts
        # keeps every section on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report = run(plan, device, args.tiny)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"bench-gpu: wrote {args.out} in {report['wall_time_s']:.0f} s", file=sys.stderr)
    return 0 if report["golden"]["fp32"]["passed"] and report["golden"]["bf16_autocast"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
