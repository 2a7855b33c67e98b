"""Evaluation subcommands: `enat sample`, `enat fid-stats` and the `enat eval` group.

- `enat sample <checkpoint> [key=value ...]`: PNGs, an ADM-format npz and a grid.
- `enat fid-stats --images SET --out stats.npz [extractor=...]`: reference statistics.
- `enat eval checkpoint <checkpoint> reference=... [extractor=...]`: metrics, logged to
  MLflow (metrics, grid, strategy YAML, extractor id, sample count, seed, FLOPs, images/s).
- `enat eval train-features --data TREE --out DIR`: the domain feature extractor.
- `enat eval floor --images SET extractor=DIR`: FID between two disjoint halves of a
  real set, the floor any generator's FID is read against.
- `enat eval watch <run> reference=... [extractor=...]`: each new checkpoint of a training
  run evaluated as a Ray task (cluster/eval_watch.py), FID against step in the run's MLflow.

FID, KID and IS are logged under `<metric>/<extractor id>` (e.g. `fid/domain-3f2a...`), so
MLflow never draws values from different extractors on one chart.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any

from enat.cluster.command import Command
from enat.cluster.config import load_config
from enat.evaluation.config import EvalConfig, FeatureTrainConfig, FidStatsConfig, SampleConfig, WatchConfig
from enat.models.typed_config import check, to_dict

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def log_evaluation(tracker: Any, result: dict, config: dict | None = None) -> None:
    """Log one evaluate_checkpoint result to an MLflow run (pipelines.tracking.Tracker)."""
    from enat.evaluation.evaluate import evaluation_metrics
    from enat.pipelines import storage

    extractor_id = result["extractor_id"]
    tracker.log_params({**(config or {}), "extractor_id": extractor_id, "num_samples": result["num_samples"],
                        "seed": result["seed"], "steps": result["steps"], "strategy_name": result["strategy"],
                        "model_id": result["model_id"], "tokenizer_id": result["tokenizer_id"]})
    tracker.log_metrics(evaluation_metrics(result), step=result.get("step") or 0)
    tracker.set_tags({"extractor_id": extractor_id})
    tracker.log_text(result["strategy_yaml"], "strategy.yaml")
    tracker.log_bytes(storage.read_bytes(result["grid"]), "grid.png")


def _with_checkpoint(help_text: str, config_cls: type, run: Any) -> Command:
    """A command taking the checkpoint as its first positional argument, then overrides."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                            help="runs/<run>/checkpoints/step-<n> folder (or its ema/ export)")
        parser.add_argument("--config", metavar="PRESET_OR_PATH", help="YAML preset name (configs/) or path")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    def start(_config: Any, args: argparse.Namespace) -> int | None:
        overrides, flags = list(args.overrides), {}
        if args.checkpoint and OVERRIDE.match(args.checkpoint):
            overrides.insert(0, args.checkpoint)
        elif args.checkpoint:
            flags["checkpoint"] = args.checkpoint
        return run(load_config(config_cls, args.config, overrides, flags=flags), args)

    return Command(help_text, None, start, add_arguments=arguments)


def _sample(config: Any, _args: argparse.Namespace) -> int:
    from enat.evaluation.sampling import run_sample

    summary = run_sample(config)
    rate = summary["images_per_s"]
    print(f"{summary['num_samples']} samples ({summary['generated']} generated, "
          f"{summary['resumed']} resumed) from {summary['model_id']} with {summary['strategy']} "
          f"({summary['steps']} steps), seed {summary['seed']}" + (f", {rate:.2f} images/s" if rate else ""))
    print(f"  -> {summary['out']} (images/, samples.npz, grid.png, strategy.yaml, sample.json)")
    return 0


def _fid_stats(config: Any, _args: argparse.Namespace) -> int:
    from enat.evaluation.metrics import compute_fid_stats

    stats = compute_fid_stats(config)
    print(f"statistics of {stats.num_images} images at {stats.resolution}px, extractor {stats.extractor_id}"
          f"{', features kept' if stats.features is not None else ''} -> {config.out}")
    return 0


def _eval_checkpoint(config: Any, _args: argparse.Namespace) -> int:
    from enat.evaluation.evaluate import evaluate, metrics_line
    from enat.pipelines.runs import checkpoint_label
    from enat.pipelines.tracking import Tracker

    result = evaluate(config)
    name = config.run_name or f"{checkpoint_label(result['checkpoint'])}-{result['strategy']}"
    tracker = Tracker(config.mlflow_experiment, name, enabled=config.tracking)
    log_evaluation(tracker, result, to_dict(config))
    tracker.finish()
    print(f"{metrics_line(result)}  [extractor {result['extractor_id']}, {result['num_samples']} samples, "
          f"seed {result['seed']}, {result['steps']} steps]")
    print(f"GFLOPs/image {result['gflops_per_image']:.4g} "
          f"({result['gflops_per_image_with_decoder']:.4g} with the decoder), "
          f"{result['images_per_s']:.3g} images/s; grid {result['grid']}")
    return 0


def _train_features(config: Any, _args: argparse.Namespace) -> int:
    from enat.evaluation.features import train_domain_extractor

    meta = train_domain_extractor(config)
    print(f"domain extractor {meta['id']}: held-out accuracy {meta['holdout_accuracy']:.3f} on "
          f"{meta['holdout_images']} images ({len(meta['classes'])} classes), trained on "
          f"{meta['train_images']} in {meta['train_seconds']:.0f} s -> {config.out}")
    return 0


@dataclass
class FloorConfig:
    images: str = ""  # a real image set (see evaluation/image_sets.py)
    extractor: str = "inception"
    resolution: int = 32
    limit: int = 0
    seed: int = 0
    device: str = "auto"
    out: str = ""  # also write the result as JSON here (path or URL)

    def __post_init__(self) -> None:
        check(bool(self.images), "images", "a real image set", self.images)


def _watch(config: WatchConfig, _args: argparse.Namespace) -> int:
    from enat.cluster.eval_watch import describe_record, watch
    from enat.cluster.ray_session import ray_session
    from enat.evaluation.watch import read_records, watch_lease
    from enat.pipelines import runs, storage
    from enat.pipelines.lease import new_owner

    runs.split_run_url(config.run)  # before Ray starts: a wrong folder is a one-line error
    storage.check_writable(config.run)
    with watch_lease(config.run, new_owner("eval-watch"), config.lease).held(), ray_session():
        evaluated = watch(config)
    records = read_records(config.run)
    print(f"{len(evaluated)} checkpoint(s) evaluated now, {len(records)} in the run's records "
          f"({config.run}/evals)")
    for step in sorted(records):
        print(f"  step {step}: {describe_record(records[step])}")
    return 0


def _floor(config: FloorConfig, _args: argparse.Namespace) -> int:
    from enat.evaluation.evaluate import metrics_line
    from enat.evaluation.image_sets import ImageSet, read_all
    from enat.evaluation.metrics import load_extractor, real_floor
    from enat.pipelines import storage

    images, _ = read_all(ImageSet(config.images, config.resolution, limit=config.limit))
    result = real_floor(images, load_extractor(config.extractor, config.device), config.seed)
    if config.out:
        storage.write_bytes(config.out, json.dumps(result, indent=1).encode())
    print(f"real vs real ({result['num_samples']} vs {result['reference_images']} images): "
          f"{metrics_line(result)}  [extractor {result['extractor_id']}]")
    return 0


def commands() -> dict[str, dict[str, Command]]:
    return {
        "": {
            "sample": _with_checkpoint("sample images from a checkpoint's EMA weights (PNGs, npz, grid)",
                                       SampleConfig, _sample),
            "fid-stats": Command("compute reference FID statistics (npz with mu, sigma, extractor id)",
                                 FidStatsConfig, _fid_stats,
                                 {"--images": "images", "--out": "out"}),
        },
        "eval": {
            "checkpoint": _with_checkpoint("FID/KID/IS, FLOPs and speed of a checkpoint, logged to MLflow",
                                           EvalConfig, _eval_checkpoint),
            "train-features": Command("train the domain feature extractor on a class-folder tree",
                                      FeatureTrainConfig, _train_features,
                                      {"--data": "data", "--out": "out"}),
            "watch": Command("evaluate each new checkpoint of a training run as a Ray task",
                             WatchConfig, _watch, positional="run"),
            "floor": Command("FID between two disjoint halves of a real image set", FloorConfig,
                             _floor, {"--images": "images"}),
        },
    }


GROUP_HELP = {"eval": "evaluation: checkpoint metrics, a run's checkpoints as they land, the domain "
                      "feature extractor, the real-data floor"}
GROUP_DEFAULT = {"eval": "checkpoint"}  # `enat eval <checkpoint>`
