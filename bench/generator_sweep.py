"""Generator sizing: tiny ENAT/NAT variants trained on the demo's token shards, each scored
on fresh seeds with the demo's domain extractor (FID, class consistency).

Each variant is a train preset plus `key=value` overrides, trained by the real loop in one
process (`launch.launcher=process`, DeepSpeed with one rank, both cores), then evaluated
with the cosine-default 8-step strategy on 1,000 samples (seed 1000003, the demo's fresh
seeds). One JSON line per variant, then a table:

    eval "$(.venv/bin/enat services env)"
    .venv/bin/python bench/generator_sweep.py --tokens s3://enat/demo/tokens/imagenet \\
        --reference s3://enat/demo/reference/imagenet-domain.npz --extractor s3://enat/demo/extractor \\
        [--only preset lr-2e-3] [--json out.json]

Runs live under --work, so a rerun re-scores finished variants without training them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FRESH_SEED = 1_000_003
# name -> (train preset, overrides). Global batch = batch_size here (one rank).
BASE = ["steps=1500", "batch_size=64", "precision=fp32"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "preset-lr-1e-3": ("tiny-enat-demo", [*BASE, "lr=1e-3"]),
    "batch-32": ("tiny-enat-demo", ["steps=1500", "batch_size=32", "lr=1e-3"]),
    "beta-1-1": ("tiny-enat-demo", [*BASE, "lr=1e-3", "masking.beta_a=1", "masking.beta_b=1"]),
    "beta-4-2": ("tiny-enat-demo", [*BASE, "lr=1e-3", "masking.beta_a=4", "masking.beta_b=2"]),
    "no-dropout": ("tiny-enat-demo", [*BASE, "lr=1e-3", "model.embed_dropout=0"]),
    "width-192-750-steps": ("tiny-enat-demo", ["steps=750", "batch_size=64", "lr=1e-3", "model.width=192"]),
    "lr-2e-3": ("tiny-enat-demo", [*BASE, "lr=2e-3"]),
    "lr-3e-3": ("tiny-enat-demo", [*BASE, "lr=3e-3"]),
    "lr-4e-3": ("tiny-enat-demo", [*BASE, "lr=4e-3"]),
    "lr-2e-3-no-smoothing": ("tiny-enat-demo", [*BASE, "lr=2e-3", "masking.label_smoothing=0"]),
    "batch-128-750-steps-lr-4e-3": ("tiny-enat-demo", ["steps=750", "batch_size=128", "precision=fp32",
                                                        "lr=4e-3", "warmup_steps=50"]),
    "width-128-lr-2e-3": ("tiny-enat-demo", [*BASE, "lr=2e-3", "model.width=128"]),
    "2000-steps-lr-3e-3": ("tiny-enat-demo", ["steps=2000", "batch_size=64", "precision=fp32", "lr=3e-3"]),
    "2000-steps-lr-3e-3-no-smoothing": ("tiny-enat-demo", ["steps=2000", "batch_size=64", "precision=fp32",
                                                           "lr=3e-3", "masking.label_smoothing=0"]),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(name: str, preset: str, overrides: list[str], tokens: str, work: str) -> tuple[str, float]:
    """Train (or find trained) the variant; (its last checkpoint URL, seconds spent training)."""
    from enat.pipelines import runs

    root = os.path.join(work, "runs")
    latest = runs.latest(root, name)
    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("steps="))
    seconds = 0.0
    if latest is None or latest.step < steps:
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "enat.cluster.cli", "train", "--config", preset, f"root={root}",
                        f"run={name}", f"data.url={tokens}", "launch.launcher=process", "tracking=false",
                        "log_every=100", f"checkpoint_every={steps}", *overrides],
                       check=True, cwd=REPO, env=env)
        seconds = time.monotonic() - started
        latest = runs.latest(root, name)
    return latest.url, seconds


def score(checkpoint_url: str, reference: str, extractor: str, samples: int) -> dict:
    from enat.evaluation.evaluate import CheckpointEvaluator
    from enat.models.strategy import Strategy
    from enat.pipelines import runs

    evaluator = CheckpointEvaluator(checkpoint_url, "", reference, extractor, batch_size=250)
    result = evaluator(Strategy.default(8), samples, FRESH_SEED, kid=False, isc=False, flops=False,
                       progress=False)
    metrics = runs.open_checkpoint(checkpoint_url).meta.get("metrics", {})
    return {"fid": round(result["fid"], 3), "class_consistency": round(result["class_consistency"], 3),
            "classifier_real_accuracy": result["classifier_real_accuracy"],
            "final_train_loss": round(metrics.get("loss", float("nan")), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True, help="token shards (the folder with manifest.json)")
    parser.add_argument("--reference", required=True, help="reference statistics npz")
    parser.add_argument("--extractor", required=True, help="domain extractor folder")
    parser.add_argument("--work", default="/tmp/enat-generator-sweep")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    parser.add_argument("--json", default=None, help="write all results to this file")
    args = parser.parse_args()
    results = []
    for name in args.only or list(VARIANTS):
        preset, overrides = VARIANTS[name]
        url, seconds = train(name, preset, overrides, args.tokens, args.work)
        results.append({"variant": name, "overrides": overrides, "train_seconds": round(seconds, 1),
                        **score(url, args.reference, args.extractor, args.samples)})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'variant':30} {'FID':>7} {'consist.':>8} {'loss':>7} {'train s':>8}")
    for r in results:
        print(f"{r['variant']:30} {r['fid']:7.3f} {r['class_consistency']:8.3f} {r['final_train_loss']:7.4f} "
              f"{r['train_seconds']:8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
