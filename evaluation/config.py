"""The evaluation's job configs: sampling, checkpoint evaluation, the checkpoint watcher,
reference statistics and the domain feature extractor.

Plain dataclasses without torch, so the CLI can validate a job and answer --help before
anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from enat.models.typed_config import check
from enat.pipelines.config import LeaseConfig


@dataclass
class SampleConfig:
    checkpoint: str = ""  # runs/<run>/checkpoints/step-<n> (or its ema/ export)
    tokenizer: str = ""  # exported VQGAN; "" = the one recorded with the checkpoint's data
    strategy: str = "default"  # "default" or an AutoNAT-format YAML path/URL
    steps: int = 0  # 0: the strategy file's own count (8 for "default")
    num_samples: int = 100
    batch_size: int = 50
    seed: int = 0
    captions: str = ""  # text file, one caption per line, optionally `<TAB>class name` (text models)
    text_encoder: str = "minilm"  # see pipelines/text_encoder.py
    out: str = "samples"  # folder (path or URL): images/, samples.npz, grid.png, sample.json
    png: bool = True
    npz: bool = True  # ADM's sample-batch format: arr_0 uint8 [N, H, W, 3], arr_1 labels
    grid_rows: int = 10
    grid_columns: int = 8
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 where native), bf16 or fp32
    reuse: bool = True  # ENAT's feature reuse across steps (False: the ablation)

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder or ema/ export URL", self.checkpoint)
        check(self.num_samples >= 1, "num_samples", ">= 1", self.num_samples)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.steps >= 0, "steps", ">= 0 (0 = the strategy's own)", self.steps)
        check(self.precision in ("auto", "bf16", "fp32"), "precision", "auto, bf16 or fp32", self.precision)
        check(self.grid_rows >= 1 and self.grid_columns >= 1, "grid_rows", ">= 1", self.grid_rows)


@dataclass
class EvalConfig:
    checkpoint: str = ""  # runs/<run>/checkpoints/step-<n> (or its ema/ export)
    reference: str = ""  # stats npz (mu, sigma), an image set or token shards (evaluation/image_sets.py)
    extractor: str = "inception"  # inception, inception:<weights file>, or a domain extractor URL
    tokenizer: str = ""  # "" = the one recorded with the checkpoint's data
    strategy: str = "default"
    steps: int = 0  # 0: the strategy file's own count (8 for "default")
    num_samples: int = 1000
    batch_size: int = 50
    seed: int = 0
    captions: str = ""
    out: str = ""  # where grid.png, strategy.yaml and metrics.json go ("" = a temporary folder)
    device: str = "auto"
    precision: str = "auto"
    reuse: bool = True
    kid: bool = True
    isc: bool = True
    mlflow_experiment: str = "enat-eval"
    run_name: str = ""  # MLflow run name ("" = <checkpoint folder>-<strategy>)
    tracking: bool = True

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder or ema/ export URL", self.checkpoint)
        check(bool(self.reference), "reference", "a stats npz, image set or token shards URL", self.reference)
        check(self.num_samples >= 2, "num_samples", ">= 2 (FID needs a covariance)", self.num_samples)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.steps >= 0, "steps", ">= 0 (0 = the strategy's own)", self.steps)
        check(self.precision in ("auto", "bf16", "fp32"), "precision", "auto, bf16 or fp32", self.precision)


@dataclass
class WatchConfig:
    run: str = ""  # the training run's folder, {root}/runs/<run>
    reference: str = ""  # stats npz, image set or token shards (evaluation/image_sets.py)
    extractor: str = "inception"  # inception, inception:<weights file>, or a domain extractor URL
    strategy: str = "default"
    steps: int = 0  # generation steps; 0: the strategy's own (8 for "default")
    num_samples: int = 1000
    batch_size: int = 50
    seed: int = 0  # the same seed at every step, so the FID curve measures the weights
    captions: str = ""  # text-conditioned runs: a captions file to sample from
    follow: bool = True  # keep watching until the run's last step is evaluated; false: one pass
    poll_seconds: float = 10.0
    idle_timeout: float = 0.0  # stop after this long without a new checkpoint; 0 = never
    max_in_flight: int = 1  # evaluations running at once
    num_cpus: float = 1.0  # Ray resources of one evaluation task
    num_gpus: float = 0.25  # used only when the cluster has GPUs: a share of one beside training
    device: str = "auto"
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one watcher per run
    tracking_wait: float = 60.0  # seconds an evaluation waits for an unreachable MLflow before giving up

    def __post_init__(self) -> None:
        check(bool(self.reference), "reference", "a stats npz, image set or token shards URL", self.reference)
        check(self.num_samples >= 2, "num_samples", ">= 2 (FID needs a covariance)", self.num_samples)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.steps >= 0, "steps", ">= 0 (0 = the strategy's own)", self.steps)
        check(self.tracking_wait >= 0, "tracking_wait", ">= 0", self.tracking_wait)
        check(self.poll_seconds > 0, "poll_seconds", "> 0", self.poll_seconds)
        check(self.idle_timeout >= 0, "idle_timeout", ">= 0 (0 = never)", self.idle_timeout)
        check(self.max_in_flight >= 1, "max_in_flight", ">= 1", self.max_in_flight)
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus/num_gpus", ">= 0",
              (self.num_cpus, self.num_gpus))


@dataclass
class FidStatsConfig:
    images: str = ""  # image set or token shards (see evaluation/image_sets.py)
    out: str = ""  # the .npz to write (path or URL)
    extractor: str = "inception"
    resolution: int = 256  # images are center-cropped to this size first (ADM)
    tokenizer: str = ""  # for token shards whose manifest records no tokenizer_url
    limit: int = 0  # first N images only (0 = all)
    batch_size: int = 64
    keep_features: bool = True  # store the features too, so KID can use these stats
    device: str = "auto"

    def __post_init__(self) -> None:
        check(bool(self.images), "images", "an image set or token shards URL", self.images)
        check(self.out.endswith(".npz"), "out", "a path or URL ending in .npz", self.out)
        check(self.resolution >= 8, "resolution", ">= 8", self.resolution)


@dataclass
class FeatureTrainConfig:
    data: str = ""  # class-folder tree (imagenet:<url>, or a plain path/URL to one)
    out: str = ""  # folder (path or URL) that receives extractor.safetensors + extractor.json
    resolution: int = 32
    width: int = 16  # channels of the first stage (then 2x, 4x)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    holdout: float = 0.1  # share of each class kept out of training to measure accuracy
    limit: int = 0  # use only the first N images (0 = all): quick checks
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check(bool(self.data), "data", "a class-folder tree (e.g. /tmp/demo-data/imagenet)", self.data)
        check(bool(self.out), "out", "a folder path or URL", self.out)
        check(self.resolution >= 8, "resolution", ">= 8", self.resolution)
        check(self.width >= 4, "width", ">= 4", self.width)
        check(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        check(self.batch_size >= 2, "batch_size", ">= 2 (batch norm)", self.batch_size)
        check(0.0 <= self.holdout < 0.5, "holdout", "in [0, 0.5)", self.holdout)
