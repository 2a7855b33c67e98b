"""Generation cost of ENAT (with and without reuse) against the NAT baseline.

All three models have the same width and depth (the ENAT preset's; the NAT gets
depth = encoder + decoder layers) and generate with the same 8-step default strategy
(CFG included). GFLOPs are counted with torch.utils.flop_counter for one image;
images/s is measured here, all three in one run, so their ratio is meaningful even on
a noisy machine.

With --compile BACKEND (e.g. inductor), ENAT's forward (the step function of generation)
is also compiled with torch.compile (dynamic shapes: the token counts change every step)
and timed interleaved with the eager model: compile_s (the warm-up, compilation included)
and compile_speedup (compiled images/s over eager). If compilation fails (no C compiler,
an unsupported backend), it says so on stderr, records compile_error and goes on eagerly.

    .venv/bin/python bench/generate.py --json [--preset enat-s] [--steps 8] [--batch 8] [--compile inductor]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
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


def compiled_rates(model, strategy, batch: int, repeats: int, backend: str) -> dict:
    """ENAT eager against a torch.compile'd copy, generation timed interleaved."""
    compiled = copy.deepcopy(model)
    cond = example_condition(model.config, batch)
    started = time.perf_counter()
    try:
        compiled.compile(backend=backend, dynamic=True)  # in place: generate() still sees an ENAT
        generate(compiled, cond, strategy, torch.Generator().manual_seed(0))
    except Exception as error:  # noqa: BLE001 - any compiler failure means: report and go on
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = f"{type(error).__name__}: {first_line}"
        print(f"generate: torch.compile(backend={backend!r}) failed, timing eager only ({message})",
              file=sys.stderr)
        return {"compile_backend": backend, "compile_error": message}
    compile_seconds = time.perf_counter() - started
    seconds = {"eager": 0.0, "compiled": 0.0}
    for seed in range(repeats + 1):
        for name, candidate in (("eager", model), ("compiled", compiled))[:: 1 if seed % 2 else -1]:
            started = time.perf_counter()
            generate(candidate, cond, strategy, torch.Generator().manual_seed(seed))
            if seed > 0:  # the eager model's first run is its warm-up
                seconds[name] += time.perf_counter() - started
    return {"compile_backend": backend, "compile_s": compile_seconds,
            "compiled_images_per_s": batch * repeats / seconds["compiled"],
            "compile_speedup": seconds["eager"] / seconds["compiled"]}


def run(preset: str, steps: int, batch: int, repeats: int, decoder_preset: str | None,
        compile_backend: str | None = None) -> dict:
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
    if compile_backend:
        result.update(compiled_rates(enat, strategy, batch, repeats, compile_backend))
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
    parser.add_argument("--compile", default="", metavar="BACKEND",
                        help="also time ENAT with torch.compile(backend=BACKEND), e.g. inductor")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    result = run(args.preset, args.steps, args.batch, args.repeats, args.decoder or None,
                 args.compile or None)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
