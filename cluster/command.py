"""What a subcommand of `enat` is: its config class, what runs it, and its flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Command:
    """A subcommand: its config class, what runs it, and flags that are config keys."""

    help: str
    config_cls: type | None
    run: Callable[[Any, argparse.Namespace], int | None]
    flags: dict[str, str] = field(default_factory=dict)  # "--out" -> config key "out"
    # A config key that may also be given as the first argument (`enat search <checkpoint>`).
    positional: str | None = None
    # Where `--config NAME` looks first: configs/<preset_folder>/NAME.yaml (e.g. "train").
    preset_folder: str = ""
    # Extra argparse arguments that are not config keys (e.g. `services up --mlflow`).
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
