"""`enat train`: the training loop (trainer/loop.py) under Ray Train, or under torchrun.

With Ray (the default), a TorchTrainer runs `launch.num_workers` copies of the loop; Ray
creates the process group (gloo on CPU, NCCL on GPUs) and restarts the workers up to
`launch.max_failures` times when one dies. A restart simply reruns the loop, which resumes
from the run's latest complete checkpoint in our storage: Ray never holds our checkpoints
(it gets the checkpoint URL in each report), so the same checkpoints serve Ray restarts,
torchrun reruns and evaluation. Ray's own bookkeeping (RunConfig storage) goes under the
same root, {root}/runs/<run>/ray, or `launch.ray_storage`. The local Ray is the default;
RAY_ADDRESS names a cluster. Workers started by a local Ray inherit this environment; on a
cluster only the non-secret endpoint variables are forwarded (credentials must come from
the cluster's own environment, never from a command line).

Without Ray:
    torchrun --nproc_per_node=2 -m enat.cluster.cli train --config tiny-enat-demo data.url=...
runs the same loop in each torchrun process (detected by TORCHELASTIC_RUN_ID); a rerun of
the same command resumes. `launch.launcher=process` runs it in this process only.

One job per run: the process that launches it (the Ray driver; rank 0 under torchrun or
`process`) holds the run's lease (pipelines/lease.py) from before the first worker starts
until the job ends, and the lease of the run's evaluations when `eval.watch` is on. Ray
Train restarts workers inside that process, so they never need it. torchrun restarts rank
0 itself: the owner id is the torchrun job's, so the new rank 0 takes the lease back.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from enat.cluster.command import Command
from enat.cluster.jobs import LaunchConfig, TrainEvalConfig, TrainJob
from enat.models.errors import UserError
from enat.trainer.config import TrainConfig


def preflight(config: TrainConfig) -> None:
    """Fail before any worker starts: storage permission, manifest vs model, missing shards,
    the checkpoint named by resume=."""
    from enat.pipelines import runs, storage
    from enat.trainer.data import open_dataset

    storage.check_writable(runs.run_url(config.root, config.run))
    open_dataset(config.data, config.model)
    runs.resume_target(config.root, config.run, config.resume)


def run_on_ray(config: TrainConfig, launch: LaunchConfig, evals: TrainEvalConfig | None = None) -> Any:
    """Run the loop under Ray Train's TorchTrainer; returns Ray's Result, raises
    ray.train.TrainingFailedError when the workers failed more than max_failures times.
    With `evals.watch`, checkpoints are evaluated as Ray tasks while training goes on."""
    from enat.cluster.eval_watch import BackgroundWatch
    from enat.cluster.ray_session import ray_session
    from enat.cluster.ray_train import build_torch_trainer, ray_storage, resolve_use_gpu
    from enat.pipelines import runs

    watching = evals is not None and evals.watch
    low, high = launch.worker_range
    wanted = high * launch.cpus_per_worker + (evals.num_cpus if watching else 0)
    run_url = runs.run_url(config.root, config.run)
    with ray_session(max(os.cpu_count() or 1, math.ceil(wanted))):
        watcher = BackgroundWatch(evals, run_url).start() if watching else None
        try:
            storage_path, storage_fs = ray_storage(launch.ray_storage or f"{run_url}/ray")
            trainer = build_torch_trainer(
                config, config.run, storage_path, storage_fs,
                num_workers=(low, high) if launch.elastic else low,
                cpus_per_worker=launch.cpus_per_worker, use_gpu=resolve_use_gpu(launch.use_gpu),
                max_failures=launch.max_failures, resize_check_s=launch.resize_check_s)
            return trainer.fit()
        finally:
            if watcher is not None:
                watcher.finish()  # evaluates the checkpoints not evaluated yet


def job_owner() -> str:
    """The lease owner id of this train job: the torchrun job's under torchrun (its run id;
    torchrun's default id "none" is shared by unrelated jobs, so then the torchrun agent,
    which outlives the ranks it restarts), else a fresh one for this process."""
    from enat.pipelines.lease import new_owner

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return new_owner("train")
    if run_id == "none":
        run_id = f"{socket.gethostname()}-{os.getppid()}"
    return f"torchrun-{run_id}"


@contextlib.contextmanager
def holding_leases(job: TrainJob, watching: bool) -> Iterator[None]:
    """The run's lease, and its evaluations' when this job watches them, held for the block."""
    from enat.evaluation.watch import watch_lease
    from enat.pipelines import runs

    owner = job_owner()
    with contextlib.ExitStack() as stack:
        stack.enter_context(runs.run_lease(job.root, job.run, owner, job.lease).held())
        if watching:
            stack.enter_context(watch_lease(runs.run_url(job.root, job.run), owner, job.eval.lease).held())
        yield


def _run(job: TrainJob, _args: argparse.Namespace) -> int:
    from enat.pipelines import runs
    from enat.trainer.loop import train

    config, launch, evals = job.loop_config(), job.launch, job.eval
    launcher = launch.launcher
    if launcher == "auto":
        launcher = "process" if "TORCHELASTIC_RUN_ID" in os.environ else "ray"
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        preflight(config)
    if launcher == "process":
        if evals.watch and rank0:
            print("note: eval.watch runs with the Ray launcher only; evaluate this run with "
                  f"`enat eval watch {runs.run_url(config.root, config.run)} ...`", file=sys.stderr)
        with holding_leases(job, watching=False) if rank0 else contextlib.nullcontext():
            result = train(config)
        if result.step == config.steps and rank0:
            print(f"run {config.run} finished at step {result.step}; last checkpoint {result.checkpoint}")
        return 0
    import ray.train

    try:
        with holding_leases(job, watching=evals.watch):
            run_on_ray(config, launch, evals)
    except ray.train.TrainingFailedError as err:
        # A worker's error the user can fix (storage unreachable past the retry window) is
        # what ended the run: the CLI prints it as its one line.
        failures = getattr(err, "worker_failures", {}).values()
        fixable = next((failure for failure in failures if isinstance(failure, UserError)), None)
        if fixable is not None:
            raise fixable from None
        print(f"enat: error: training failed after {launch.max_failures} restart(s): "
              f"{str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    last = runs.latest(config.root, config.run)
    print(f"run {config.run} finished at step {last.step if last else '?'}; "
          f"EMA model for evaluation: {last.ema_url if last else 'none'}")
    return 0


def commands() -> dict[str, dict[str, Command]]:
    return {"": {"train": Command("train ENAT or NAT with DeepSpeed under Ray Train (or torchrun)",
                                  TrainJob, _run, preset_folder="train")}}
