"""Where a 2-worker ZeRO-2 training step spends the time a ZeRO-0 step does not.

Runs tiny ENAT (the demo preset) on 2 torchrun workers (gloo, one CPU thread each) through
the trainer's own step (`Trainer.train_step`) on in-memory batches, once per variant of the
DeepSpeed ZeRO settings, and splits each step into forward+backward, the engine's step
(gradient reduction, the partitioned AdamW update, the weights' all-gather) and the EMA
update:

    .venv/bin/python bench/zero_overhead.py --json [--steps 30] [--batch-size 32]

Variants are DeepSpeed `zero_optimization` settings laid over the trainer's own config
(overlap_comm, contiguous_gradients, which the trainer turns on on GPUs only, bucket
sizes); times are means over the last half of the steps, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import data_spec, model_preset, parse_args, run_workers  # noqa: E402 - bench/train.py's model, data, launcher

VARIANTS = {  # name: (zero stage, zero_optimization settings laid over the trainer's)
    "zero0": (0, {}),
    "zero2": (2, {}),
    "zero2_overlap_comm": (2, {"overlap_comm": True}),
    "zero2_contiguous_gradients": (2, {"contiguous_gradients": True}),  # the trainer's GPU setting
    "zero2_small_buckets": (2, {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000}),
}


def timed(function, bucket: list[float]):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = function(*args, **kwargs)
        bucket.append(time.perf_counter() - started)
        return out
    return wrapper


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One variant: per-step seconds of the whole step and of its parts."""
    import deepspeed
    import torch

    from enat.models.typed_config import from_dict
    from enat.trainer.config import TrainConfig
    from enat.trainer.data import TokenStream, open_dataset
    from enat.trainer.loop import Trainer

    stage, settings = VARIANTS[name]
    initialize = deepspeed.initialize

    def with_settings(*a, config, **kw):
        config["zero_optimization"].update(settings)
        return initialize(*a, config=config, **kw)

    deepspeed.initialize = with_settings
    try:
        config = from_dict(TrainConfig, {
            "run": f"zero-{name}", "root": args.root, "model": model_preset(), "data": {"url": args.data},
            "steps": args.steps, "batch_size": args.batch_size, "zero_stage": stage, "tracking": False,
            "warmup_steps": 5})
        trainer = Trainer(config)
    finally:
        deepspeed.initialize = initialize
    stream = TokenStream(open_dataset(config.data, config.model), config.data, args.batch_size, 0,
                         trainer.rank, trainer.world)
    batches = [next(stream) for _ in range(args.steps)]
    stream.close()
    parts: dict[str, list[float]] = {"backward": [], "engine_step": [], "ema": []}
    trainer.engine.backward = timed(trainer.engine.backward, parts["backward"])
    trainer.engine.step = timed(trainer.engine.step, parts["engine_step"])
    trainer.ema.update = timed(trainer.ema.update, parts["ema"])
    steps = []
    for step, batch in enumerate(batches, 1):
        started = time.perf_counter()
        trainer.train_step([batch], step)
        steps.append(time.perf_counter() - started)
    torch.distributed.barrier()
    half = len(steps) // 2
    tail = {key: sum(values[half:]) / len(values[half:]) for key, values in {"step": steps, **parts}.items()}
    tail["forward_and_rest"] = tail["step"] - tail["backward"] - tail["engine_step"] - tail["ema"]
    return {key: round(value, 4) for key, value in tail.items()}


def main() -> int:
    args = parse_args(__doc__, steps=30)
    if args.worker:
        from enat.trainer.distributed import init_distributed

        init_distributed()
        results = {name: measure(name, args) for name in VARIANTS}
        if os.environ["RANK"] == "0":
            Path(args.out).write_text(json.dumps(results))
        return 0

    from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="enat-bench-zero-") as tmp:
        write_synthetic_shards(f"{tmp}/data", SyntheticSpec(**data_spec()))
        measured = run_workers(__file__, args, f"{tmp}/data", f"{tmp}/root", f"{tmp}/out.json")
    if measured is None:
        return 1
    report = {"model": "tiny-enat", "workers": 2, "batch_size_per_worker": args.batch_size,
              "seconds_per_step": measured}
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
