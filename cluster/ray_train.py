"""The training loop under Ray Train: the one TorchTrainer `enat train` and every rung of an
`enat search-train` trial run.

The loop config travels to the workers as the TrainConfig object the CLI validated once in
the driver (Ray pickles it; it holds no secrets). Ray never holds our checkpoints:
each worker reports the URL of every checkpoint the loop writes, and a restarted worker
group resumes from the run's latest complete checkpoint in our storage. Imported by the
command modules only when a job runs, so `enat --help` does not load Ray.
"""

from __future__ import annotations

import os
from typing import Any

import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from enat.cluster.jobs import LaunchConfig
from enat.cluster.ray_session import cluster_has_gpus
from enat.trainer.config import TrainConfig


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: local folders as paths;
    object storage through our fsspec filesystem, wrapped for pyarrow (Ray writes through
    pyarrow), so one configuration serves both (AWS_* from the environment, custom
    endpoints such as SeaweedFS included)."""
    if "://" not in url or url.startswith("file://"):
        path = os.path.abspath(url.removeprefix("file://"))
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    from enat.pipelines import storage

    fs, path = storage.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def resolve_use_gpu(setting: str) -> bool:
    """`launch.use_gpu` as a decision: "yes", or "auto" when the connected Ray cluster has GPUs."""
    return setting == "yes" or (setting == "auto" and cluster_has_gpus())


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the loop on `loop_config["config"]` (a TrainConfig), stopping at
    `loop_config["until_step"]` when that is set."""
    from enat.trainer.loop import train

    config: TrainConfig = loop_config["config"]
    context = ray.train.get_context()
    if context.get_world_rank() == 0:  # every start of a group, resizes of an elastic run included
        print(f"train: worker group of {context.get_world_size()} started (launch.num_workers="
              f"{loop_config['num_workers']})", flush=True)

    def report(step: int, url: str, metrics: dict[str, float]) -> None:
        ray.train.report({"step": step, "checkpoint_url": url, **metrics})

    train(config, until_step=loop_config.get("until_step"), on_checkpoint=report)


def build_torch_trainer(loop_config: TrainConfig, run_name: str, storage_path: str, storage_filesystem: Any,
                        launch: LaunchConfig, *, use_gpu: bool,
                        until_step: int | None = None) -> TorchTrainer:
    """A TorchTrainer running `train_worker` on `launch.num_workers` workers (gloo on CPU,
    NCCL on GPUs), restarted up to `launch.max_failures` times; Ray's bookkeeping goes under
    `storage_path`/`run_name` (see ray_storage).

    MIN-MAX workers make it elastic: Ray starts as many as fit (at least MIN), restarts the
    group with those left when a node is lost (one failure), and every `resize_check_s`
    seconds restarts it larger when room has come back (not a failure). Each restart is a
    new run of the loop, which resumes from the last checkpoint whatever the world size."""
    low, high = launch.worker_range
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": loop_config, "until_step": until_step,
                           "num_workers": launch.num_workers},
        scaling_config=ScalingConfig(num_workers=(low, high) if launch.elastic else low, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": launch.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=launch.resize_check_s),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=launch.max_failures)),
    )
