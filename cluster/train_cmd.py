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
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from enat.cluster.command import Command
from enat.cluster.config import CONFIG_DIR, merge, parse_overrides, preset_path, read_yaml
from enat.models.typed_config import ConfigError, check, from_dict, to_dict

if TYPE_CHECKING:  # importing the loop pulls in torch: only when a job runs
    from enat.cluster.eval_watch import TrainEvalConfig
    from enat.trainer.loop import TrainConfig

@dataclass
class LaunchConfig:
    launcher: Literal["auto", "ray", "process"] = "auto"  # auto: process under torchrun, else ray
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto: when the Ray cluster has GPUs
    max_failures: int = 1  # worker failures Ray recovers from (each restart resumes)
    ray_storage: str = ""  # Ray's bookkeeping; "" = {root}/runs/<run>/ray

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "launch.num_workers", ">= 1", self.num_workers)
        check(self.cpus_per_worker > 0, "launch.cpus_per_worker", "> 0", self.cpus_per_worker)
        check(self.max_failures >= -1, "launch.max_failures", ">= -1 (-1: unlimited)", self.max_failures)


def _resolve_model(value: Any) -> Any:
    """A model preset name or path (`models/tiny-enat`) becomes its mapping."""
    return read_yaml(preset_path(value)) if isinstance(value, str) else value


def train_preset_path(name: str) -> Any:
    """`tiny-enat-demo` means configs/train/tiny-enat-demo.yaml; paths and `train/<name>` work too."""
    in_train = (CONFIG_DIR / "train" / f"{name}.yaml").exists()
    if "/" not in name and not name.endswith((".yaml", ".yml")) and in_train:
        name = f"train/{name}"
    return preset_path(name)


def load_train_config(preset: str | None, overrides: list[str] | tuple[str, ...] = ()
                      ) -> tuple[TrainConfig, LaunchConfig, TrainEvalConfig]:
    """Preset YAML < key=value overrides, as (loop config, `launch:` section, `eval:`
    section). `model:` may name a model preset; `model.<key>=...` overrides then apply to
    that preset's values."""
    from enat.cluster.eval_watch import TrainEvalConfig
    from enat.trainer.loop import TrainConfig

    data = read_yaml(train_preset_path(preset)) if preset else {}
    update = parse_overrides(overrides)
    if "model" in data:
        data["model"] = _resolve_model(data["model"])
    if isinstance(update.get("model"), str):  # another preset replaces the model wholesale
        data["model"] = _resolve_model(update.pop("model"))
    data = merge(data, update)
    sections = {name: data.pop(name, {}) for name in ("launch", "eval")}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"bad value for '{name}': expected a mapping, got {section!r}")
    return (from_dict(TrainConfig, data), from_dict(LaunchConfig, sections["launch"], prefix="launch."),
            from_dict(TrainEvalConfig, sections["eval"], prefix="eval."))


def preflight(config: TrainConfig) -> None:
    """Fail before any worker starts: storage permission, manifest vs model, missing shards,
    the checkpoint named by resume=."""
    from enat.models import build_config
    from enat.pipelines import runs, storage
    from enat.trainer.data import open_dataset

    storage.check_writable(runs.run_url(config.root, config.run))
    open_dataset(config.data, build_config(config.model))
    runs.resume_target(config.root, config.run, config.resume)


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


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from enat.trainer.loop import TrainConfig, train

    config = from_dict(TrainConfig, loop_config["config"])

    def report(step: int, url: str, metrics: dict[str, float]) -> None:
        ray.train.report({"step": step, "checkpoint_url": url, **metrics})

    train(config, until_step=loop_config.get("until_step"), on_checkpoint=report)


def run_on_ray(config: TrainConfig, launch: LaunchConfig, evals: TrainEvalConfig | None = None) -> Any:
    """Run the loop under Ray Train's TorchTrainer; returns Ray's Result, raises
    ray.train.TrainingFailedError when the workers failed more than max_failures times.
    With `evals.watch`, checkpoints are evaluated as Ray tasks while training goes on."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from enat.cluster.eval_watch import BackgroundWatch
    from enat.cluster.ray_session import cluster_has_gpus, start_ray
    from enat.pipelines import runs

    watching = evals is not None and evals.watch
    wanted = launch.num_workers * launch.cpus_per_worker + (evals.num_cpus if watching else 0)
    owns_ray = start_ray(max(os.cpu_count() or 1, math.ceil(wanted)))
    run_url = runs.run_url(config.root, config.run)
    watcher = BackgroundWatch(evals, run_url).start() if watching else None
    try:
        use_gpu = launch.use_gpu == "yes" or (launch.use_gpu == "auto" and cluster_has_gpus())
        storage_path, storage_fs = ray_storage(launch.ray_storage or f"{run_url}/ray")
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"config": to_dict(config)},
            scaling_config=ScalingConfig(num_workers=launch.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": launch.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=config.run, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=launch.max_failures)),
        )
        return trainer.fit()
    finally:
        if watcher is not None:
            watcher.finish()  # evaluates the checkpoints not evaluated yet
        if owns_ray:
            ray.shutdown()


def _run(_config: Any, args: argparse.Namespace) -> int:
    from enat.pipelines import runs
    from enat.pipelines.shards import ManifestMismatch
    from enat.pipelines.storage import StorageError
    from enat.trainer.loop import train

    config, launch, evals = load_train_config(args.config, args.overrides)
    launcher = launch.launcher
    if launcher == "auto":
        launcher = "process" if "TORCHELASTIC_RUN_ID" in os.environ else "ray"
    try:
        if os.environ.get("RANK", "0") == "0":
            preflight(config)
        if launcher == "process":
            if evals.watch and os.environ.get("RANK", "0") == "0":
                print("note: eval.watch runs with the Ray launcher only; evaluate this run with "
                      f"`enat eval watch {runs.run_url(config.root, config.run)} ...`", file=sys.stderr)
            result = train(config)
            if result.step == config.steps and os.environ.get("RANK", "0") == "0":
                print(f"run {config.run} finished at step {result.step}; last checkpoint {result.checkpoint}")
            return 0
        import ray.train

        try:
            run_on_ray(config, launch, evals)
        except ray.train.TrainingFailedError as err:
            print(f"enat: error: training failed after {launch.max_failures} restart(s): "
                  f"{str(err).splitlines()[0]}", file=sys.stderr)
            return 1
    except (ManifestMismatch, StorageError, runs.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"enat: error: {err}", file=sys.stderr)
        return 2
    last = runs.latest(config.root, config.run)
    print(f"run {config.run} finished at step {last.step if last else '?'}; "
          f"EMA model for evaluation: {last.ema_url if last else 'none'}")
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PRESET_OR_PATH",
                        help="train preset (configs/train/<name>.yaml or train/<name>) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys allowed (model.width=64, launch.num_workers=4)")


def commands() -> dict[str, dict[str, Command]]:
    return {"": {"train": Command("train ENAT or NAT with DeepSpeed under Ray Train (or torchrun)",
                                  None, _run, add_arguments=_arguments)}}
