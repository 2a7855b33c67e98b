"""The pipelines' job configs: pretokenization (`PretokenizeConfig`, with its caption
encoder section), the demo data sets (`DemoDataConfig`), and the `lease:` section of every
job that writes an output only one job may write at a time (`LeaseConfig`).

Plain dataclasses without torch or PIL, so the CLI can validate a job and answer --help
before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from enat.models.typed_config import ConfigError, check

# Decoding limits, read from an image's header before its pixels: larger images are
# decompression bombs, smaller ones carry too little to tokenize.
DEFAULT_MAX_PIXELS = 12_000 * 12_000
DEFAULT_MIN_SIDE = 8

MINILM = "minilm"
NONE = "none"


@dataclass
class TextEncoderConfig:
    name: str = MINILM  # "minilm", "clip:<local folder>" or "none"
    max_len: int = 32  # tokens kept per caption (including the start/end tokens)
    batch_size: int = 64

    def __post_init__(self) -> None:
        check(self.name in (MINILM, NONE) or self.name.startswith("clip:"), "name",
              "'minilm', 'none' or 'clip:<local folder>'", self.name)
        check(self.max_len >= 2, "max_len", ">= 2", self.max_len)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


@dataclass
class LeaseConfig:
    """One writer per output (pipelines/lease.py): how often the holder renews its lease, and
    how long a lease nobody renews stays held before another job takes it over."""

    heartbeat_seconds: float = 15.0
    # Several heartbeats: a slow store or a paused process must not lose its lease.
    stale_seconds: float = 180.0
    # Only for S3 servers that ignore conditional writes: how long a new holder waits before
    # reading the lease back to see that no other job wrote over it.
    settle_seconds: float = 3.0

    def __post_init__(self) -> None:
        check(self.heartbeat_seconds > 0, "heartbeat_seconds", "> 0", self.heartbeat_seconds)
        check(self.stale_seconds >= 3 * self.heartbeat_seconds, "stale_seconds",
              ">= 3 x heartbeat_seconds", self.stale_seconds)
        check(self.settle_seconds >= 0, "settle_seconds", ">= 0", self.settle_seconds)


@dataclass
class PretokenizeConfig:
    source: str = ""  # imagenet:<url> | cc3m:<url> | folder:<url>
    out: str = ""  # output root: <out>/<split>/shard-*.tar and <out>/manifest.json
    tokenizer: str = ""  # exported tokenizer folder, or a MaskGIT VQGAN checkpoint file
    tokenizer_config: str = ""  # VQGAN preset for a checkpoint file (default maskgit-vqgan-f16)
    split: str = "train"
    resolution: int = 0  # 0 = the tokenizer's image_size
    flip: bool = False  # also store the mirrored image's ids as <key>.flip.tokens.npy
    shard_size: int = 1000
    batch_size: int = 32  # images per tokenizer forward
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # caption sources only
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, from the header
    min_side: int = DEFAULT_MIN_SIDE
    device: Literal["auto", "cpu", "cuda"] = "auto"
    verify: bool = False  # on resume, re-hash finished shards against their records
    # Execution (the Ray driver): shard tasks at once (0 = as many as the cluster's CPUs
    # allow), their resources, and retries of failed tasks.
    workers: int = 0
    cpus_per_task: int = 1
    gpus_per_task: float | None = None  # None: 0.25 on a cluster with GPUs, else 0
    max_retries: int = 3
    track: bool = True  # an MLflow run per job (MLFLOW_TRACKING_URI)
    experiment: str = "pretokenize"
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one job per output

    def __post_init__(self) -> None:
        check(self.resolution >= 0, "resolution", ">= 0 (0 = the tokenizer's)", self.resolution)
        for key in ("shard_size", "batch_size", "cpus_per_task", "min_side", "max_pixels"):
            check(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        check(self.workers >= 0, "workers", ">= 0 (0 = all CPUs)", self.workers)
        check(self.max_retries >= 0, "max_retries", ">= 0", self.max_retries)

    def require(self) -> None:
        """The keys a job needs (optional for `--inspect`)."""
        for key, example in (("source", "imagenet:/data/imagenet"), ("out", "s3://bucket/tokens"),
                             ("tokenizer", "s3://bucket/tokenizers/vq")):
            if not getattr(self, key):
                raise ConfigError(f"missing required key '{key}' (e.g. {key}={example})")


@dataclass
class DemoDataConfig:
    out: str = "demo-data"
    cc3m_shard_size: int = 500
    limit: int = 0  # keep only the first N emoji (0 = all); for quick experiments
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.cc3m_shard_size > 0, "cc3m_shard_size", "> 0", self.cc3m_shard_size)
        check(self.limit >= 0, "limit", ">= 0 (0 = all)", self.limit)
