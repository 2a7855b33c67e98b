"""`enat tokenizer train`: train the VQGAN tokenizer on an image folder (local or s3://).

The model preset is resolved here, in the CLI layer that owns configs/, and handed to the
trainer as a typed VQGANConfig; the trainer checks it against the job config.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from enat.cluster.command import Command
from enat.cluster.config import preset_path, read_yaml
from enat.models import VQGANConfig, build_config
from enat.models.typed_config import ConfigError
from enat.trainer.config import TokenizerTrainConfig

if TYPE_CHECKING:  # the trainer loads torch: only when a job runs
    from enat.trainer.tokenizer_train import TokenizerTrainResult


def resolve_model(config: TokenizerTrainConfig) -> VQGANConfig:
    """The `model` preset (configs/ name or YAML path) as a validated VQGANConfig."""
    from enat.trainer.tokenizer_train import check_model

    try:
        model_config = build_config(read_yaml(preset_path(config.model)))
    except ConfigError as err:
        raise ConfigError(f"bad value for 'model': {err}") from None
    return check_model(config, model_config)


def run_tokenizer_training(config: TokenizerTrainConfig, progress: bool = True) -> TokenizerTrainResult:
    """Train while holding the run's lease (one writer per run)."""
    from enat.pipelines import runs, storage
    from enat.pipelines.lease import new_owner
    from enat.trainer.tokenizer_train import train_tokenizer

    model_config = resolve_model(config)
    storage.check_writable(config.run_url)
    with runs.run_lease(config.root, config.run, new_owner("tokenizer"), config.lease).held():
        return train_tokenizer(config, model_config, progress=progress)


def _train(config: TokenizerTrainConfig, _args: argparse.Namespace) -> int:
    result = run_tokenizer_training(config)
    figures = result.evaluation
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    print(f"tokenizer {config.run}: step {result.step}{resumed}, held-out PSNR {figures.psnr:.2f} dB, "
          f"codebook usage {figures.codebook_usage:.0%}, perplexity {figures.perplexity:.1f}, "
          f"{result.seconds:.0f} s")
    print(f"  export: {result.export_url}")
    if result.grid_url:
        print(f"  reconstructions: {result.grid_url}")
    return 0


def commands() -> dict[str, dict[str, Command]]:
    return {"tokenizer": {"train": Command(
        "train the VQGAN tokenizer on an image folder (checkpoints, resume, export, MLflow)",
        TokenizerTrainConfig, _train, {"--source": "source", "--root": "root", "--run": "run"})}}


GROUP_HELP = {"tokenizer": "VQ tokenizer: train"}
