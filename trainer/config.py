"""The trainer's job configs: the token-generator loop (`TrainConfig`, with its data and
validation sections) and the tokenizer's (`TokenizerTrainConfig`).

Plain dataclasses without torch, so the CLI can parse and validate a job (and answer
--help) before anything heavy loads; the loops take them as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from enat.models.config import ENATConfig, MaskingConfig, NATConfig
from enat.models.typed_config import ConfigError, check
from enat.pipelines import runs
from enat.pipelines.config import LeaseConfig

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class DataConfig:
    url: str = ""  # the folder holding manifest.json (what `enat pretokenize` printed)
    split: str = "train"
    # Samples shuffled together after the shards are permuted (1 keeps the shard order). A
    # rank holds about shuffle_window / samples-per-shard shards in memory.
    shuffle_window: int = 10000
    readers: int = 2  # threads per rank fetching shards
    prefetch: int = 256  # samples per rank whose shards are fetched ahead
    flip_prob: float = 0.5  # probability of using the mirrored copy, when a sample has one
    tokenizer_id: str | None = None  # expected manifest tokenizer id (None: not checked)
    verify_sha256: bool = True  # skip shards whose bytes differ from the manifest's sha256

    def __post_init__(self) -> None:
        check(self.shuffle_window >= 1, "shuffle_window", ">= 1", self.shuffle_window)
        check(self.readers >= 1, "readers", ">= 1", self.readers)
        check(self.prefetch >= 1, "prefetch", ">= 1", self.prefetch)
        check(0.0 <= self.flip_prob <= 1.0, "flip_prob", "in [0, 1]", self.flip_prob)


@dataclass
class ValidationConfig:
    samples: int = 0  # token grids scored at each checkpoint; 0 = off
    split: str = ""  # manifest split to read them from; "" = the training split
    generation_steps: int = 8  # the masked counts of Strategy.default(generation_steps)
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.samples >= 0, "samples", ">= 0 (0 = off)", self.samples)
        check(self.generation_steps >= 1, "generation_steps", ">= 1", self.generation_steps)


@dataclass
class TrainConfig:
    run: str = "tiny-enat-demo"  # run name: everything goes under {root}/runs/<run>/
    root: str = "s3://enat/demo"  # storage root (s3://bucket/prefix or a local folder)
    model: ENATConfig | NATConfig = field(default_factory=ENATConfig)  # kind: enat or nat
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    p_uncond: float | None = None  # CFG label drop; None keeps the model preset's cond_dropout
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # per worker and micro-step
    grad_accum: int = 1  # micro-steps per step at the first start (see global_batch)
    # Samples per optimizer step. 0: batch_size * grad_accum * workers at the run's first
    # start. A resumed run keeps its checkpoint's global batch on any number of workers by
    # choosing grad_accum; setting this to another value changes it on purpose.
    global_batch: int = 0
    lr: float = 4e-4
    schedule: Literal["constant", "cosine"] = "constant"  # after a linear warmup
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine schedule's floor, as a share of lr
    betas: tuple[float, float] = (0.99, 0.99)
    weight_decay: float = 0.03
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it
    zero_stage: int = 2
    ema_decay: float = 0.9999
    log_every: int = 10  # steps between metric lines (stdout and MLflow)
    checkpoint_every: int = 500
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto: the run's latest checkpoint; never; or a step-<n> folder URL
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # val_loss at checkpoints
    mlflow_experiment: str = "enat-train"
    tracking: bool = True
    tracking_wait: float = 60.0  # seconds the run's end waits for an unreachable MLflow to take the buffer

    def __post_init__(self) -> None:
        check(bool(self.run) and "/" not in self.run, "run", "a non-empty name without '/'", self.run)
        if isinstance(self.model, NATConfig) and self.masking.reuse_prob > 0:
            raise ConfigError("bad value for 'masking.reuse_prob': must be 0 for a NAT model "
                              "(reuse training is ENAT's)")
        check(self.p_uncond is None or 0 <= self.p_uncond <= 1, "p_uncond", "in [0, 1]", self.p_uncond)
        for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        check(self.global_batch >= 0, "global_batch", ">= 0 (0 = batch_size * grad_accum * workers)",
              self.global_batch)
        check(self.lr > 0, "lr", "> 0", self.lr)
        check(all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)", self.betas)
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3", self.zero_stage)
        check(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)", self.ema_decay)
        check(self.keep_last >= 1, "keep_last", ">= 1", self.keep_last)
        check(self.grad_clip >= 0, "grad_clip", ">= 0", self.grad_clip)
        check(self.tracking_wait >= 0, "tracking_wait", ">= 0", self.tracking_wait)


@dataclass
class TokenizerTrainConfig:
    source: str = "demo-out/data/imagenet/train"  # image folder: local path or s3:// prefix
    root: str = "s3://enat/demo"  # storage root; the run lives in {root}/runs/<run>/
    run: str = "tokenizer"
    model: str = "models/tiny-tokenizer"  # preset of a `kind: vqgan` model
    # Defaults = the demo configuration, sized for the demo's ~4-5 min tokenizer stage on one
    # thread. Held-out PSNR on the 1,903 demo emoji (all with 100% of the 256 codes in use):
    #   steps=1800 (default)  21.86 dB   4.0 min
    #   steps=2000            22.05 dB   4.4-5.3 min (the other core busy)
    #   steps=8000            23.83 dB  17.5 min
    #   steps=12000           24.16 dB  24.8 min   <- the setting for the issue's >= 24 dB
    #   steps=16000           24.28 dB  34 min
    # i.e. `enat tokenizer train ... steps=12000`. The gain per doubling of steps falls from
    # ~1.3 dB (800 -> 1,600) to ~0.45 dB (8,000 -> 16,000). Small batches win on CPU: at
    # equal compute batch 8 beat batch 16 by 0.9 dB, which beat batch 32 by 1.3 dB.
    steps: int = 1800
    batch_size: int = 8
    lr: float = 2e-3  # 3e-3: -0.2 dB at 800 steps; 1e-3: -0.3 dB at 1,200 steps
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0 at `steps`
    # PSNR is an MSE figure, so L2 carries it, while L1 (a gradient that does not shrink
    # with the error) keeps edges moving: with seed 0 at 800 steps, L2 alone lost 0.5 dB
    # and L1 alone 1.7 dB. Over 3 seeds at 800 steps l2_weight 2 or 5 gained 0.35 dB over 1
    # (at 2,000 steps l2_weight 5 gained 0.4 dB), 20 lost it again (seed 0).
    l1_weight: float = 1.0
    l2_weight: float = 5.0
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25
    dead_code_steps: int = 100  # restart codes unused this many steps; 0 = never
    # Perceptual loss: a classifier trained on the same images (`enat eval train-features`,
    # never the FID extractor itself) whose features the reconstruction must keep
    # (models/classifier.FeatureDistance). "" = pixel losses only.
    perceptual: str = ""
    perceptual_weight: float = 0.1
    flip: bool = True  # random horizontal flips
    log_every: int = 100
    eval_every: int = 400
    checkpoint_every: int = 400
    keep_last: int = 2
    seed: int = 0
    resolution: int = 32  # must equal the model's image_size
    held_out_share: float = 0.05
    grid_images: int = 16
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False  # bf16 autocast (quantizer distances stay fp32)
    # CPU threads (at most 2 on the demo machine): at batch 8 a second thread gains little
    # and, when the two cores are shared with other jobs, made steps 4x slower.
    threads: int = 1
    experiment: str = "tokenizer"  # MLflow experiment
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one writer per run

    def __post_init__(self) -> None:
        check(bool(RUN_NAME.fullmatch(self.run)), "run", "letters, digits, '.', '_' or '-'", self.run)
        for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_last"):
            check(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        check(self.lr > 0, "lr", "> 0", self.lr)
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        check(self.dead_code_steps >= 0, "dead_code_steps", ">= 0 (0 = never)", self.dead_code_steps)
        for key in ("l1_weight", "l2_weight", "codebook_weight", "commitment_weight", "perceptual_weight"):
            check(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        check(0.0 <= self.held_out_share < 1.0, "held_out_share", "in [0, 1)", self.held_out_share)
        check(self.grid_images >= 0, "grid_images", ">= 0", self.grid_images)
        check(1 <= self.threads <= 2, "threads", "1 or 2", self.threads)

    @property
    def run_url(self) -> str:
        return runs.run_url(self.root, self.run)
