"""`enat search <checkpoint>`: AutoNAT's generation-strategy search as a Ray Tune experiment.

Each trial samples `num_samples` images with one strategy and measures FID against the
reference; all trials share seeds and labels. The best strategy is written
as AutoNAT-format YAML to `{out}/strategy.yaml` (what `enat sample` and `enat eval` take
as `strategy=`), with plots of FID per update and of the schedules before and after, and
an MLflow parent run with one nested run per trial. Rerunning the same command resumes.

The strategy search has three layers, one module each: evaluation/schedule_search.py is
AutoNAT's update (pure, no Ray), cluster/tune_search.py runs it as Ray Tune trials, and this
module is the `enat search` job around them (config, FID objective, MLflow, plots, summary).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from enat.cluster.command import Command
from enat.evaluation.schedule_search import SearchHyperparameters
from enat.models.strategy import Strategy
from enat.models.typed_config import ConfigError, check, to_dict
from enat.pipelines import runs, storage
from enat.pipelines.tracking import Tracker

FRESH_SEED_OFFSET = 1_000_003  # validation seeds, disjoint from every search seed


@dataclass
class SearchConfig:
    checkpoint: str = ""  # runs/<run>/checkpoints/step-<n> (or its ema/ export)
    reference: str = ""  # FID reference: stats npz, image set or token shards
    extractor: str = "inception"  # or a domain extractor URL (enat eval train-features)
    tokenizer: str = ""  # "" = the one recorded with the checkpoint's data
    steps: int = 8
    initial: str = "default"  # starting strategy: "default" (cosine) or a YAML URL
    searcher: Literal["autonat", "optuna"] = "autonat"
    updates: int = 2  # AutoNAT updates (4*steps-1 evaluations each, 5 by kind; + 1 to score the last step)
    evaluations: int = 0  # budget for other searchers (0 = the AutoNAT budget)
    num_samples: int = 500  # images per evaluation
    batch_size: int = 100
    seed: int = 0
    validation_samples: int = 0  # > 0: re-evaluate best and initial on fresh seeds
    name: str = "search"
    out: str = ""  # "" = <run>/search/<name> next to the checkpoints
    concurrency: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    device: str = "cpu"
    hyper: SearchHyperparameters = field(default_factory=SearchHyperparameters)
    tracking: bool = True

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder URL", self.checkpoint)
        check(bool(self.reference), "reference", "a stats npz, image set or shards URL", self.reference)
        check(self.steps >= 2, "steps", ">= 2", self.steps)
        check(self.updates >= 1, "updates", ">= 1", self.updates)
        check(self.num_samples >= 2, "num_samples", ">= 2", self.num_samples)
        check(self.concurrency >= 1, "concurrency", ">= 1", self.concurrency)

    def output_url(self) -> str:
        if self.out:
            return self.out
        marker = f"/{runs.CHECKPOINTS_DIR}/"
        if marker not in self.checkpoint:
            raise ConfigError("missing required key 'out': the checkpoint is not inside a run folder, "
                              "so set out=<URL>")
        return storage.join(self.checkpoint.split(marker)[0], "search", self.name)


@functools.lru_cache(maxsize=2)
def _evaluator(checkpoint: str, tokenizer: str, reference: str, extractor: str, batch_size: int,
               device: str):
    """Loaded once per trial process (Tune reuses its actors across trials)."""
    from enat.evaluation.evaluate import CheckpointEvaluator

    return CheckpointEvaluator(checkpoint, tokenizer, reference, extractor, batch_size=batch_size,
                               device=device)


def fid_objective(config: SearchConfig):
    """The trial objective factory: strategy, seed -> FID (pickled to the trial workers)."""
    def factory():
        import torch

        torch.set_num_threads(max(1, int(config.cpus_per_trial)))
        evaluator = _evaluator(config.checkpoint, config.tokenizer, config.reference,
                               config.extractor, config.batch_size, config.device)

        def objective(strategy: Strategy, seed: int) -> float:
            with tempfile.TemporaryDirectory() as out:
                result = evaluator(strategy, config.num_samples, seed, out=out, kid=False,
                                   isc=False, flops=False, progress=False)
            return result["fid"]
        return objective
    return factory


class TrialLogger:
    """Tune callback: one nested MLflow run per finished trial."""

    def __new__(cls, parent: Tracker, experiment: str):
        from ray.tune import Callback

        # Tune pickles its callbacks: keep the parent's id, not the tracker (its thread, locks).
        parent_run_id, enabled = parent.run_id, parent.active

        class _Logger(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                metrics = trial.last_result or {}
                if "fid" not in metrics:
                    return
                child = Tracker(experiment, f"trial-{trial.trial_id}", parent_run_id=parent_run_id,
                                enabled=enabled)
                child.log_params({k: v for k, v in trial.config.items() if k != "vector"})
                child.log_metrics({"fid": metrics["fid"]}, step=max(0, int(metrics.get("update", 0))))
                child.finish()

        return _Logger()


def plot_search(history: list[dict], before: Strategy, after: Strategy, out_dir: str) -> list[str]:
    """FID per update, and the four schedules before and after; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if history:
        fig, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([h["update"] for h in history], [h["base_fid"] for h in history], marker="o")
        axis.set(xlabel="update", ylabel="FID (search seeds)", title="AutoNAT search")
        paths.append(os.path.join(out_dir, "fid_vs_update.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    titles = ("mask ratio", "mask temperature", "sampling temperature", "CFG scale")
    for axis, title, old, new in zip(axes, titles, before.as_tuple(), after.as_tuple(), strict=True):
        axis.plot(range(1, len(old) + 1), old, marker="o", label="before")
        axis.plot(range(1, len(new) + 1), new, marker="s", label="after")
        axis.set(title=title, xlabel="step")
    axes[0].legend()
    paths.append(os.path.join(out_dir, "schedule.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run_search_command(config: SearchConfig) -> dict[str, Any]:
    from enat.evaluation.strategy_io import load_strategy

    out = config.output_url()
    initial = load_strategy(config.initial, config.steps)
    tracker = Tracker("enat-search", config.name, enabled=config.tracking)
    tracker.log_params(to_dict(config))
    local = tempfile.mkdtemp(prefix="enat-search-")  # Tune's scratch and the plots, removed at the end
    try:
        return _run_search(config, out, initial, tracker, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _run_search(config: SearchConfig, out: str, initial: Strategy, tracker: Tracker,
                local: str) -> dict[str, Any]:
    from enat.cluster.tune_search import TuneSettings, run_search
    from enat.evaluation.strategy_io import save_strategy

    started = time.monotonic()
    result = run_search(
        fid_objective(config), initial,
        TuneSettings(config.name, os.path.join(local, "tune"), config.concurrency,
                     config.cpus_per_trial, config.gpus_per_trial),
        searcher=config.searcher, updates=config.updates, evaluations=config.evaluations,
        seed=config.seed, state_url=storage.join(out, "search_state.json"), hyper=config.hyper,
        callbacks=[TrialLogger(tracker, "enat-search")])
    summary = {"searcher": config.searcher, "best_fid_search_seeds": result["best_fid"],
               "evaluations_this_run": len(result["trials"]),
               "wall_s": time.monotonic() - started, "strategy_url": storage.join(out, "strategy.yaml")}
    save_strategy(summary["strategy_url"], result["best"])
    for update in result["history"]:
        tracker.log_metrics({"base_fid": update["base_fid"]}, step=update["update"])
    if config.validation_samples:
        evaluator = _evaluator(config.checkpoint, config.tokenizer, config.reference,
                               config.extractor, config.batch_size, config.device)
        seed = config.seed + FRESH_SEED_OFFSET
        for label, strategy in (("initial", initial), ("searched", result["best"])):
            with tempfile.TemporaryDirectory() as scratch:
                summary[f"fid_{label}_fresh_seeds"] = evaluator(
                    strategy, config.validation_samples, seed, out=scratch, kid=False, isc=False,
                    flops=False, progress=False)["fid"]
        tracker.log_metrics({k: v for k, v in summary.items() if k.startswith("fid_")}, step=0)
    for path in plot_search(result["history"], initial, result["best"], local):
        storage.write_bytes(storage.join(out, os.path.basename(path)), open(path, "rb").read())
        tracker.log_artifact(path)
    tracker.log_text(result["best"].to_yaml(), "strategy.yaml")
    tracker.set_tags({"strategy_url": summary["strategy_url"]})
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
    tracker.finish()
    return summary


def _search(config: SearchConfig, _args) -> int:
    summary = run_search_command(config)
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"use it: enat eval checkpoint={config.checkpoint} strategy={summary['strategy_url']}",
          file=sys.stderr)
    return 0


def commands() -> dict[str, dict[str, Command]]:
    return {"": {"search": Command(
        "search the generation strategy (AutoNAT) as a Ray Tune experiment", SearchConfig, _search,
        {"--steps": "steps", "--out": "out"}, positional="checkpoint")}}
