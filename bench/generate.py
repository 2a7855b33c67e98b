"""Generation cost of ENAT (with and without reuse) against the NAT baseline.

All three models have the same width and depth (the ENAT preset's; the NAT gets
depth = encoder + decoder layers) and generate with the same 8-step default strategy
(CFG included). GFLOPs are counted with torch.utils.flop_counter for one image;
images/s is measured here, all three in one run, so their ratio is meaningful even on
a noisy machine.

    .venv/bin/python bench/generate.py --json [--preset enat-s] [--steps 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from enat.models import NATConfig, build_config, build_model
from enat.models.flops import example_condition, generation_flops
from enat.models.generate import generate
from enat.models.strategy import Strategy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def load_preset(name: str):
    return build_config(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))


def matching_nat(enat_config) -> NATConfig:
    depth = enat_config.encoder_depth + enat_config.decoder_depth
    shared = {k: getattr(enat_config, k) for k in (
        "codebook_size", "grid_size", "width", "heads", "mlp_ratio", "num_classes",
        "context_dim", "context_len")}
    return NATConfig(**shared, depth=depth + depth % 2)


def images_per_second(model, strategy, batch: int, reuse: bool, repeats: int) -> float:
    cond = example_condition(model.config, batch)
    generate(model, cond, strategy, torch.Generator().manual_seed(0), reuse=reuse)  # warm-up
    start = time.perf_counter()
    for seed in range(repeats):
        generate(model, cond, strategy, torch.Generator().manual_seed(seed), reuse=reuse)
    return batch * repeats / (time.perf_counter() - start)


def run(preset: str, steps: int, batch: int, repeats: int, decoder_preset: str | None) -> dict:
    torch.manual_seed(0)
    enat = build_model(load_preset(preset)).eval()
    nat = build_model(matching_nat(enat.config)).eval()
    strategy = Strategy.default(steps)
    result = {"preset": preset, "steps": steps, "batch": batch,
              "threads": torch.get_num_threads(), "device": "cpu"}
    for name, model, reuse in (("enat", enat, True), ("enat_noreuse", enat, False), ("nat", nat, True)):
        result[f"{name}_gflops"] = generation_flops(model, strategy, reuse=reuse) / 1e9
        result[f"{name}_images_per_s"] = images_per_second(model, strategy, batch, reuse, repeats)
    if decoder_preset:
        decoder = build_model(load_preset(decoder_preset)).eval()
        height, width = enat.config.grid_shape
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            decoder.decode(torch.zeros(1, height, width, dtype=torch.long))
        result["decoder_gflops"] = counter.get_total_flops() / 1e9
        result["enat_gflops_with_decoder"] = result["enat_gflops"] + result["decoder_gflops"]
    result["reuse_flops_ratio"] = result["enat_gflops"] / result["enat_noreuse_gflops"]
    result["reuse_speedup"] = result["enat_images_per_s"] / result["enat_noreuse_images_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="enat-s")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decoder", default="maskgit-vqgan-f16",
                        help="tokenizer preset whose decoder FLOPs are added ('' to skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    result = run(args.preset, args.steps, args.batch, args.repeats, args.decoder or None)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
