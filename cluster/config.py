"""Presets + `key=value` overrides -> typed config objects, before anything starts.

A preset is a YAML file: a bare name (`demo`, `models/tiny-enat`) is looked up in the
presets folder (enat/configs, the checkout's configs/, or $ENAT_CONFIG_DIR), anything else
is a path. Overrides use dotted keys (`train.lr=3e-4`); their values are parsed as YAML
scalars, so `steps=10` is an int and `name=abc` a string. A section typed as a config
(`model:` of a train job) may name a preset instead of spelling out its keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from enat.models.typed_config import ConfigError, from_dict

T = TypeVar("T")

CONFIG_DIR = Path(os.environ.get("ENAT_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def preset_path(name_or_path: str, folder: str = "") -> Path:
    """Resolve a preset name (configs/<folder>/<name>.yaml when there is one, else
    configs/<name>.yaml) or an explicit path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file '{name_or_path}' not found")
        return path
    if folder and "/" not in name_or_path and (CONFIG_DIR / folder / f"{name_or_path}.yaml").exists():
        return CONFIG_DIR / folder / f"{name_or_path}.yaml"
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(str(p.relative_to(CONFIG_DIR))[:-5] for p in CONFIG_DIR.rglob("*.yaml"))
        raise ConfigError(f"unknown preset '{name_or_path}'; known presets: {', '.join(known)}")
    return candidate


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override '{item}': expected key=value (e.g. train.steps=100)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[leaf] = value
    return result


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_config(tp: Any) -> bool:
    """A dataclass, or a union of dataclasses (such as a model of any kind)."""
    if get_origin(tp) in (Union, types.UnionType):
        return all(dataclasses.is_dataclass(option) for option in get_args(tp) if option is not type(None))
    return dataclasses.is_dataclass(tp)


def load_config(
    cls: type[T],
    preset: str | None = None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    preset_folder: str = "",
) -> T:
    """defaults < preset file < overrides < flags (values taken as given), validated into `cls`.

    A config-typed section given as a string is a preset: `model: models/tiny-enat` in the
    file, then `model.width=64` changes that preset's value, while `model=models/tiny-nat`
    replaces the whole section."""
    data = dict(defaults or {})
    if preset:
        data = merge(data, read_yaml(preset_path(preset, preset_folder)))
    update = merge(parse_overrides(overrides), flags or {})
    hints = get_type_hints(cls)
    for key in [key for key, tp in hints.items() if _is_config(tp)]:
        if isinstance(update.get(key), str):
            data[key] = update.pop(key)
        if isinstance(data.get(key), str):
            data[key] = read_yaml(preset_path(data[key]))
    return from_dict(cls, merge(data, update))
