"""The training jobs, each one typed config: `enat train` runs a `TrainJob`, `enat
search-train` a `TrainSearchJob`.

A job is the loop's own config (trainer/config.py, its keys at the top level of a train
preset) plus the sections only the driver reads: `launch:` (how many workers, where),
`eval:` (the checkpoint watcher) and `lease:` (the driver holds the run's lease), and for
a search `search:`. The CLI parses and validates
the whole job once, in the driver; workers get `loop_config()`, the validated TrainConfig
object. No torch here: `enat train --help` must not load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from enat.evaluation.config import WatchConfig
from enat.models.typed_config import ConfigError, check, narrow
from enat.pipelines.config import LeaseConfig
from enat.trainer.config import TrainConfig

WORKER_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


@dataclass
class LaunchConfig:
    launcher: Literal["auto", "ray", "process"] = "auto"  # auto: process under torchrun, else ray
    # A number, or MIN-MAX for an elastic run: Ray Train runs it on as many workers as fit
    # (at least MIN), continues on fewer when a node goes away and grows back when it returns.
    num_workers: int | str = 2
    resize_check_s: float = 60.0  # elastic: seconds between Ray's looks for room to grow
    cpus_per_worker: float = 1.0
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto: when the Ray cluster has GPUs
    max_failures: int = 1  # worker failures Ray recovers from (each restart resumes); -1: no limit
    ray_storage: str = ""  # Ray's bookkeeping; "" = {root}/runs/<run>/ray

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers; equal unless the run is elastic."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        found = WORKER_RANGE.fullmatch(self.num_workers)
        check(found is not None, "num_workers", "a number or MIN-MAX (e.g. 2-8)", self.num_workers)
        return int(found[1]), int(found[2])

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range
        return low != high

    def __post_init__(self) -> None:
        low, high = self.worker_range
        check(1 <= low <= high, "num_workers", ">= 1 (MIN-MAX: 1 <= MIN <= MAX)", self.num_workers)
        check(self.resize_check_s > 0, "resize_check_s", "> 0", self.resize_check_s)
        check(self.cpus_per_worker > 0, "cpus_per_worker", "> 0", self.cpus_per_worker)
        check(self.max_failures >= -1, "max_failures", ">= -1 (-1: unlimited)", self.max_failures)


@dataclass
class TrainEvalConfig(WatchConfig):
    """`enat train`'s `eval:` section: the watcher's settings; the run is the one training."""

    watch: bool = False

    def __post_init__(self) -> None:
        if self.watch:
            super().__post_init__()


@dataclass
class TrainJob(TrainConfig):
    """`enat train`: the loop's config, how to launch it, and what to evaluate meanwhile."""

    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one job per run

    def loop_config(self) -> TrainConfig:
        """The part the workers run: the job without its driver-only sections. An elastic run's
        global batch is that of its largest size unless set: every size then keeps it by
        choosing grad_accum (trainer/resume.py)."""
        config = narrow(self, TrainConfig)
        if self.launch.elastic and not config.global_batch:
            most = self.launch.worker_range[1]
            config = replace(config, global_batch=self.batch_size * self.grad_accum * most)
        return config


@dataclass
class TrainSearchConfig:
    name: str = "search-train"  # the experiment: {root}/runs/<name>/ and trial runs <name>-<id>
    trials: int = 8
    max_steps: int = 600  # steps of a trial that is never stopped
    grace_steps: int = 200  # the first rung: no trial is stopped before it
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    concurrency: int = 1  # trials at once (each runs launch.num_workers workers)
    beta_a: tuple[float, float] = (1.0, 16.0)  # uniform ranges of the mask-ratio Beta(a, b)
    beta_b: tuple[float, float] = (1.0, 8.0)
    lr: tuple[float, float] = (1e-4, 3e-3)  # log-uniform
    validation_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.trials >= 1, "trials", ">= 1", self.trials)
        check(self.grace_steps >= 1, "grace_steps", ">= 1", self.grace_steps)
        check(self.max_steps >= self.grace_steps, "max_steps", ">= search.grace_steps", self.max_steps)
        check(self.reduction_factor >= 2, "reduction_factor", ">= 2", self.reduction_factor)
        check(self.concurrency >= 1, "concurrency", ">= 1", self.concurrency)
        check(self.validation_samples >= 1, "validation_samples", ">= 1", self.validation_samples)
        for key in ("beta_a", "beta_b", "lr"):
            low, high = getattr(self, key)
            check(0 < low <= high, key, "[low, high] with 0 < low <= high", getattr(self, key))

    def rungs(self) -> list[int]:
        """The steps at which ASHA compares trials (trials checkpoint and report there)."""
        steps, rung = [], self.grace_steps
        while rung < self.max_steps:
            steps.append(rung)
            rung *= self.reduction_factor
        return [*steps, self.max_steps]


@dataclass
class TrainSearchJob(TrainJob):
    """`enat search-train`: a train job whose `search:` section tunes its masking and lr;
    every other key configures the trials' training."""

    search: TrainSearchConfig = field(default_factory=TrainSearchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval.watch:
            raise ConfigError("eval.watch is not available in search-train: evaluate the best setting's run")
        check(not self.launch.elastic, "launch.num_workers", "one number in search-train (its trials are "
              "short runs of a fixed size)", self.launch.num_workers)
