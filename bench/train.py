"""Training throughput of tiny ENAT (configs/models/tiny-enat.yaml) on this machine.

Measures, on synthetic token shards in a temporary folder:
- loader_samples_per_s: one worker's data stream alone (2 reader threads, batches collated);
- zero_step_s: seconds per training step for ZeRO stages 0-3 with 2 workers (torchrun, gloo,
  DeepSpeed, one CPU thread each), and from the ZeRO-2 run tokens_per_s, mfu and
  train_samples_per_s (what one worker's training consumes);
- plain_step_s: the same model, batch and masking in a plain single-process torch loop
  (torch AdamW, no DeepSpeed, batches already in memory, one thread);
- loader_over_train: loader_samples_per_s over what one worker's training consumes;
- checkpoint_save_s: seconds to write the ZeRO-2 run's last checkpoint (gather every rank's
  partition, write whole tensors), and reshard_load_s: seconds a 2-worker ZeRO-3 start from
  it takes beyond a fresh start (read, check, hand every rank its fragments).

    .venv/bin/python bench/train.py --json [--steps 40] [--batch-size 32]

Step times are the mean over the last `--steps // 2` steps of each run (startup excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def model_preset() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "models" / "tiny-enat.yaml").read_text())


def data_spec() -> dict:
    """Synthetic token shards the preset reads: its grid, codebook and classes."""
    preset = model_preset()
    return {"grid": preset["grid_size"], "codebook_size": preset["codebook_size"],
            "num_classes": preset["num_classes"], "samples": 4096, "per_shard": 256}


def train_config(data: str, root: str, stage: int, args: argparse.Namespace):
    from enat.models.typed_config import from_dict
    from enat.trainer.config import TrainConfig

    half = max(1, args.steps // 2)
    return from_dict(TrainConfig, {
        "run": f"bench-zero{stage}", "root": root, "model": model_preset(), "data": {"url": data},
        "steps": args.steps, "batch_size": args.batch_size, "zero_stage": stage, "log_every": half,
        "checkpoint_every": 10 * args.steps, "tracking": False, "warmup_steps": 5})


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: every ZeRO stage in turn; rank 0 writes the last interval's metrics."""
    from enat.trainer.loop import train

    results = {}
    for stage in (0, 1, 2, 3):
        result = train(train_config(args.data, args.root, stage, args))
        results[stage] = result.metrics
    results["reshard"] = reshard_seconds(args)
    if os.environ["RANK"] == "0":
        Path(args.out).write_text(json.dumps(results))


def reshard_seconds(args: argparse.Namespace) -> dict[str, float]:
    """Seconds to start from the ZeRO-2 run's last checkpoint at ZeRO-3 (read, check, hand
    every rank its fragments) beyond those of a fresh start, and to write that checkpoint."""
    from dataclasses import replace

    from enat.trainer.loop import Trainer

    config = train_config(args.data, args.root, 3, args)
    seconds = {}
    for name, run in (("fresh", "bench-fresh"), ("resumed", "bench-zero2")):
        started = time.perf_counter()
        Trainer(replace(config, run=run, steps=args.steps + 1))
        seconds[name] = time.perf_counter() - started
    return {"load_s": seconds["resumed"] - seconds["fresh"]}


def loader_rate(data: str, batch_size: int, batches: int = 60) -> float:
    from enat.models import build_config
    from enat.trainer.config import DataConfig
    from enat.trainer.data import TokenStream, open_dataset

    config = DataConfig(url=data)
    stream = TokenStream(open_dataset(config, build_config(model_preset())), config, batch_size, seed=0,
                         rank=0, world_size=2)
    for _ in range(5):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - started)
    stream.close()
    return rate


def plain_step_time(data: str, args: argparse.Namespace) -> float:
    import torch

    from enat.models import build_config, build_model
    from enat.models.config import MaskingConfig
    from enat.models.device import bf16_supported
    from enat.models.masking import mask_tokens, masked_token_loss
    from enat.trainer.config import DataConfig
    from enat.trainer.data import TokenStream, open_dataset

    torch.set_num_threads(1)
    config = build_config(model_preset())
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.99, 0.99), weight_decay=0.03)
    data_config = DataConfig(url=data)
    stream = TokenStream(open_dataset(data_config, config), data_config, args.batch_size, 0, 0, 1)
    batches = [next(stream) for _ in range(args.steps)]
    stream.close()
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16_supported(torch.device("cpu")) else torch.float32
    times = []
    for batch in batches:
        started = time.perf_counter()
        masked, mask = mask_tokens(batch.ids, config.mask_id, MaskingConfig(), generator, True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = masked_token_loss(model(masked, batch.cond).logits, batch.ids, mask, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    tail = times[len(times) // 2 :]
    return sum(tail) / len(tail)


def parse_args(doc: str, steps: int) -> argparse.Namespace:
    """The options of a 2-worker bench: its own, and those its torchrun workers get."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_workers(script: str, args: argparse.Namespace, data: str, root: str, out: str) -> dict | None:
    """`script --worker` on 2 torchrun processes (one CPU thread each); what rank 0 wrote to
    `out`, or None (the failure printed) when they failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               script, "--worker", "--data", data, "--root", root, "--out", out,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stdout[-2000:] + run.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(Path(out).read_text())


def main() -> int:
    args = parse_args(__doc__, steps=40)
    if args.worker:
        worker(args)
        return 0

    from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="enat-bench-train-") as tmp:
        data, root, out = f"{tmp}/data", f"{tmp}/root", f"{tmp}/zero.json"
        write_synthetic_shards(data, SyntheticSpec(**data_spec()))
        loader = loader_rate(data, args.batch_size)
        plain = plain_step_time(data, args)
        measured = run_workers(__file__, args, data, root, out)
        if measured is None:
            return 1
        reshard = measured.pop("reshard")
        zero = {int(k): v for k, v in measured.items()}
    report = {
        "model": "tiny-enat", "workers": 2, "batch_size_per_worker": args.batch_size,
        "precision": "bf16" if _bf16() else "fp32",
        "tokens_per_s": round(zero[2]["tokens_per_s"]),
        "mfu": round(zero[2]["mfu"], 4),
        "loader_samples_per_s": round(loader, 1),
        "train_samples_per_s": round(zero[2]["samples_per_s"] / 2, 1),
        "data_wait_frac": round(zero[2]["data_wait_frac"], 4),
        "zero_step_s": {str(stage): round(zero[stage]["step_time_s"], 4) for stage in sorted(zero)},
        "plain_step_s": round(plain, 4),
        "loader_over_train": round(loader / (zero[2]["samples_per_s"] / 2), 1),
        # The ZeRO-2 run's checkpoint: written by 2 workers, and loaded by 2 workers at ZeRO-3.
        "checkpoint_save_s": round(zero[2]["checkpoint_s"], 3),
        "reshard_load_s": round(reshard["load_s"], 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:24s} {value}")
    return 0


def _bf16() -> bool:
    import torch

    from enat.models.device import bf16_supported

    return bf16_supported(torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
