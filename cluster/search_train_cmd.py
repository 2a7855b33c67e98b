"""`enat search-train`: tune the training strategy (Beta(a, b) mask ratios, lr) with ASHA.

    enat search-train --config tiny-enat-demo data.url=<shards> search.trials=8 search.max_steps=600

Each Ray Tune trial is a short Ray Train run of the training loop (`launch.num_workers`
workers, its own run `<search.name>-<trial>` under the root) that reports `val_loss` at
every checkpoint: the EMA's masked-token loss on fixed grids at the masked counts of the
default 8-step schedule (trainer/validation.py), comparable across mask distributions,
which the training loss is not. ASHA stops the trials that trail at each rung
(`search.grace_steps`, then x`search.reduction_factor`); each rung of a trial is one Ray
Train run that resumes the trial's training run where the previous rung stopped. Trials
take a custom `trial_slot` resource (one per concurrent trial; Tune cannot reserve zero
CPUs for a trial whose workers are placed by Ray Train). The best setting goes to
`{root}/runs/<name>/best.json` and as a `masking:`/`lr:` YAML snippet to `best.yaml`;
rerunning the command resumes the Tune experiment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
from typing import Any

from enat.cluster.command import Command
from enat.cluster.jobs import TrainSearchConfig, TrainSearchJob
from enat.trainer.config import TrainConfig


def trial_config(job: TrainSearchJob, params: dict[str, float], trial_id: str) -> TrainConfig:
    """The training config of one trial: the job's with the trial's Beta(a, b) and lr, its
    own run, checkpoints at ASHA's rungs (a checkpoint is where val_loss is reported)."""
    base, search = job.loop_config(), job.search
    return replace(
        base, run=f"{search.name}-{trial_id}", steps=search.max_steps, lr=params["lr"],
        masking=replace(base.masking, beta_a=params["beta_a"], beta_b=params["beta_b"]),
        checkpoint_every=math.gcd(*search.rungs()), keep_last=1, resume="auto",
        # A short run's EMA must forget the initial weights by the first rung.
        ema_decay=min(base.ema_decay, max(0.0, 1 - 10 / search.grace_steps)),
        validation=replace(base.validation, samples=search.validation_samples),
        warmup_steps=min(base.warmup_steps, search.grace_steps // 2))


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: one Ray Train run per ASHA rung, each resuming the trial's run from
    its last checkpoint and stopping at the rung, then the rung's val_loss goes to Tune.
    Between rungs no Train run is alive, so when ASHA stops the trial (Tune ends the trial
    actor while it waits in report) there is no worker group whose placement group would
    outlive it (Ray Train V2 does not release those when Tune stops a trial)."""
    import ray.tune

    from enat.cluster.ray_train import build_torch_trainer, ray_storage
    from enat.pipelines import runs

    job: TrainSearchJob = params["job"]
    search, launch = job.search, job.launch
    config = trial_config(job, params, ray.tune.get_context().get_trial_id())
    storage_path, storage_fs = ray_storage(params["storage"])
    for rung in search.rungs():
        trainer = build_torch_trainer(
            config, f"{config.run}-to-{rung}", storage_path, storage_fs,
            num_workers=launch.worker_range[1], cpus_per_worker=launch.cpus_per_worker,
            use_gpu=params["use_gpu"], max_failures=launch.max_failures, until_step=rung)
        trainer.fit()
        reached = runs.latest(config.root, config.run)  # its marker holds the metrics
        ray.tune.report({"step": reached.step, "val_loss": reached.meta["metrics"]["val_loss"],
                         "loss": reached.meta["metrics"].get("loss"), "checkpoint_url": reached.url})


def run_search_train(job: TrainSearchJob) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from enat.cluster.ray_session import ray_session
    from enat.cluster.ray_train import ray_storage, resolve_use_gpu
    from enat.pipelines import runs, storage
    from enat.pipelines.lease import new_owner

    search, launch = job.search, job.launch
    experiment_url = runs.run_url(job.root, search.name)
    storage.check_writable(experiment_url)
    # A local Ray gets one trial_slot per concurrent trial; a cluster's nodes declare theirs
    # (see the README), and a Ray the caller started must have them.
    wanted = search.concurrency * launch.worker_range[1] * launch.cpus_per_worker
    # The experiment's lease covers its trials' runs (<name>-<trial>): only it writes them.
    lease = runs.run_lease(job.root, search.name, new_owner("search-train"), job.lease)
    with lease.held(), ray_session(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)),
                                   resources={"trial_slot": search.concurrency}):
        use_gpu = resolve_use_gpu(launch.use_gpu)
        tune_url = storage.join(experiment_url, "tune")
        tune_path, tune_fs = ray_storage(tune_url)
        trainable = tune.with_resources(_trial, {"trial_slot": 1})
        space = {"job": job, "use_gpu": use_gpu,
                 "storage": storage.join(tune_url, "train"),
                 "beta_a": tune.uniform(*search.beta_a), "beta_b": tune.uniform(*search.beta_b),
                 "lr": tune.loguniform(*search.lr)}
        path = f"{tune_path.rstrip('/')}/{search.name}"
        if tune.Tuner.can_restore(path, storage_filesystem=tune_fs):
            tuner = tune.Tuner.restore(path, trainable, param_space=space, resume_errored=True,
                                       storage_filesystem=tune_fs)
        else:
            scheduler = ASHAScheduler(time_attr="step", max_t=search.max_steps,
                                      grace_period=search.grace_steps,
                                      reduction_factor=search.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric="val_loss", mode="min", scheduler=scheduler, num_samples=search.trials,
                    search_alg=BasicVariantGenerator(random_state=search.seed,
                                                     max_concurrent=search.concurrency)),
                run_config=tune.RunConfig(name=search.name, storage_path=tune_path,
                                          storage_filesystem=tune_fs, verbose=0))
        results = tuner.fit()
    return summarize(results, experiment_url, search)


def summarize(results: Any, experiment_url: str, search: TrainSearchConfig) -> dict[str, Any]:
    """Every trial's setting, last val_loss and steps reached; the best (lowest val_loss
    among the trials that reached max_steps) written to best.json and best.yaml."""
    from enat.pipelines import storage

    trials = []
    for result in results:
        metrics, params = result.metrics or {}, result.config or {}
        trials.append({"trial": metrics.get("trial_id"), "beta_a": params.get("beta_a"),
                       "beta_b": params.get("beta_b"), "lr": params.get("lr"),
                       "steps": metrics.get("step"), "val_loss": metrics.get("val_loss"),
                       "checkpoint": metrics.get("checkpoint_url"),
                       "error": str(result.error).splitlines()[0] if result.error else None})
    finished = [t for t in trials if t["steps"] == search.max_steps and t["val_loss"] is not None]
    if not finished:
        raise RuntimeError(f"no trial of {search.name} reached step {search.max_steps}: "
                           f"see the trials' errors")
    best = min(finished, key=lambda t: t["val_loss"])
    summary = {"best": best, "trials": trials, "rungs": search.rungs(),
               "steps_trained": sum(t["steps"] or 0 for t in trials),
               "steps_without_early_stopping": search.max_steps * len(trials)}
    storage.write_bytes(storage.join(experiment_url, "best.json"), json.dumps(summary, indent=1).encode())
    snippet = (f"# enat search-train {search.name}: val_loss {best['val_loss']:.4f} at step {best['steps']}\n"
               f"lr: {best['lr']:.6g}\nmasking:\n"
               f"  beta_a: {best['beta_a']:.4g}\n  beta_b: {best['beta_b']:.4g}\n")
    storage.write_bytes(storage.join(experiment_url, "best.yaml"), snippet.encode())
    return summary


def _run(job: TrainSearchJob, _args: argparse.Namespace) -> int:
    summary = run_search_train(job)
    print(f"{'trial':>12} {'beta_a':>7} {'beta_b':>7} {'lr':>9} {'steps':>6} {'val_loss':>9}")
    for trial in sorted(summary["trials"], key=lambda t: (-(t["steps"] or 0), t["val_loss"] or math.inf)):
        loss = trial["val_loss"] if trial["val_loss"] is not None else math.nan
        print(f"{trial['trial'] or '?':>12} {trial['beta_a']:7.3f} {trial['beta_b']:7.3f} {trial['lr']:9.2e} "
              f"{trial['steps'] or 0:6d} {loss:9.4f}")
    best = summary["best"]
    print(f"best: Beta({best['beta_a']:.3g}, {best['beta_b']:.3g}), lr {best['lr']:.3g}: val_loss "
          f"{best['val_loss']:.4f}; ASHA trained {summary['steps_trained']} of "
          f"{summary['steps_without_early_stopping']} steps")
    return 0


def commands() -> dict[str, dict[str, Command]]:
    return {"": {"search-train": Command(
        "tune Beta(a,b) mask ratios and lr with ASHA, each trial a Ray Train run", TrainSearchJob, _run,
        preset_folder="train")}}
