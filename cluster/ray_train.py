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

    def report(step: int, url: str, metrics: dict[str, float]) -> None:
        ray.train.report({"step": step, "checkpoint_url": url, **metrics})

    train(config, until_step=loop_config.get("until_step"), on_checkpoint=report)


def build_torch_trainer(loop_config: TrainConfig, run_name: str, storage_path: str,
                        storage_filesystem: Any, *, num_workers: int | tuple[int, int],
                        cpus_per_worker: float, use_gpu: bool, max_failures: int,
                        until_step: int | None = None, resize_check_s: float = 60.0) -> TorchTrainer:
    """A TorchTrainer running `train_worker` on `num_workers` workers (gloo on CPU, NCCL on
    GPUs), restarted up to `max_failures` times; Ray's bookkeeping goes under
    `storage_path`/`run_name` (see ray_storage).

    `num_workers=(min, max)` is Ray Train's elastic mode: it starts on as many workers as
    the cluster fits, restarts on the survivors when a worker or node is lost, and every
    `resize_check_s` seconds restarts on more when resources have come back. Every restart
    reruns the loop, which resumes from the run's latest checkpoint on the new number of
    workers (trainer/resume.py)."""
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": loop_config, "until_step": until_step},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker},
                                     elastic_resize_monitor_interval_s=resize_check_s),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
