"""Attention on this machine: torch's SDPA against plain matmul + softmax (models.layers.attend).

For the attention shapes of the tiny demo models and of ENAT-S, forward + backward of one
attention call in fp32 and under bf16 autocast, both paths timed interleaved in one run,
so their ratio means something on a shared machine. `plain_over_sdpa` < 1 means the plain
path is faster. On CUDA the same script times SDPA's fused kernels against the plain path.

    .venv/bin/python bench/attention.py --json [--repeats 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from enat.models.device import pick_device
from enat.models.layers import attend

# (name, batch, heads, queries, keys, head dim): the demo models at batch 32 (tiny NAT: 64
# tokens + the class token; tiny ENAT's decoder: 51 mask tokens over 13 visible + 51), and
# ENAT-S at batch 16 (its decoder over 256 tokens, head dim 61).
SHAPES = [("tiny-nat", 32, 4, 65, 65, 24), ("tiny-enat-decoder", 32, 4, 51, 64, 24),
          ("enat-s-decoder", 16, 6, 205, 256, 61)]


def sdpa(q, k, v, key_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def plain(q, k, v, key_mask):
    # attend() itself on CPU; on GPUs attend() is SDPA, so time the plain formula directly.
    if q.device.type == "cpu":
        return attend(q, k, v, key_mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


def time_call(fn, inputs, precision: str, device: torch.device) -> float:
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    q, k, v = (t.detach().requires_grad_() for t in inputs)
    with autocast:
        out = fn(q, k, v, None)
    out.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def measure(shape, precision: str, device: torch.device, repeats: int) -> dict:
    _, batch, heads, queries, keys, dim = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, queries, dim, generator=generator).to(device)
    k = torch.randn(batch, heads, keys, dim, generator=generator).to(device)
    v = torch.randn(batch, heads, keys, dim, generator=generator).to(device)
    seconds = {"sdpa": 0.0, "plain": 0.0}
    for index in range(repeats + 2):
        for name, fn in (("sdpa", sdpa), ("plain", plain)):  # interleaved
            started = time.perf_counter()
            time_call(fn, (q, k, v), precision, device)
            if index >= 2:  # warm-up excluded
                seconds[name] += time.perf_counter() - started
    with torch.no_grad():
        difference = float((sdpa(q, k, v, None) - plain(q, k, v, None)).abs().max())
    return {"sdpa_ms": 1000 * seconds["sdpa"] / repeats, "plain_ms": 1000 * seconds["plain"] / repeats,
            "plain_over_sdpa": seconds["plain"] / seconds["sdpa"], "max_abs_difference_fp32": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    device = pick_device(args.device)
    results = {"device": device.type, "threads": torch.get_num_threads()}
    for shape in SHAPES:
        for precision in ("fp32", "bf16"):
            figures = measure(shape, precision, device, args.repeats)
            for key, value in figures.items():
                results[f"{shape[0]}_{precision}_{key}"] = round(value, 6 if "difference" in key else 3)
    print(json.dumps(results) if args.json else json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
