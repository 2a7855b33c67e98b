"""Generation strategies on storage: a YAML file (path, file:// or s3:// URL) or "default".

The file format is AutoNAT's (manual_ratios, manual_temp, manual_samp_temp, manual_cfg), so
the released strategy files load as they are; "default" is AutoNAT's starting point
(`Strategy.default(steps)`).
"""

from __future__ import annotations

import yaml

from enat.models.errors import UserError
from enat.models.strategy import Strategy
from enat.pipelines import storage

DEFAULT = "default"
DEFAULT_STEPS = 8


class StrategyError(UserError, ValueError):
    """A strategy file that is missing, not YAML, or not a valid strategy."""


def load_strategy(spec: str = DEFAULT, steps: int | None = None) -> Strategy:
    """The strategy named by `spec`: "default" (with `steps`, 8 if None) or a YAML path/URL.

    For a file, `steps` (when given) must equal the file's step count: a silent mismatch
    would evaluate a different schedule than the one asked for.
    """
    if spec in ("", DEFAULT):
        return Strategy.default(DEFAULT_STEPS if steps is None else steps)
    try:
        text = storage.read_bytes(spec)
    except FileNotFoundError:
        raise StrategyError(f"no strategy file at {spec}: pass a YAML path/URL or 'default'") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise StrategyError(f"strategy file {spec} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise StrategyError(f"strategy file {spec} must hold a mapping with AutoNAT's keys")
    try:
        strategy = Strategy.from_dict(data)
    except ValueError as err:
        raise StrategyError(f"strategy file {spec}: {err}") from None
    if steps is not None and steps != strategy.steps:
        raise StrategyError(f"strategy file {spec} has {strategy.steps} steps but steps={steps} was "
                            f"asked: leave steps unset or pick a {steps}-step file")
    return strategy


def save_strategy(url: str, strategy: Strategy) -> None:
    """Publish `strategy` as AutoNAT-format YAML at `url` (atomically)."""
    storage.write_bytes(url, strategy.to_yaml().encode())


def describe_strategy(spec: str, strategy: Strategy) -> str:
    """A short label for logs and MLflow: the file's name or `default-<T>`."""
    if spec in ("", DEFAULT):
        return f"{DEFAULT}-{strategy.steps}"
    return spec.rstrip("/").rsplit("/", 1)[-1]
