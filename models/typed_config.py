"""Typed configuration objects built from plain mappings, with one-line errors.

Every job in enat is described by a dataclass. Presets (YAML) and command-line overrides
are merged into a plain dict first; `from_dict` then turns that dict into the dataclass,
rejecting unknown keys and values of the wrong type before any work starts. Only the
standard library is used, so every package (models included) can depend on it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from enat.models.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message is one line naming the key."""


class BadValue(ConfigError):
    """A value failed a range check; `key` is re-prefixed when the config is nested."""

    def __init__(self, key: str, requirement: str, value: Any):
        self.key, self.requirement, self.value = key, requirement, value
        super().__init__(f"bad value for '{key}': must be {requirement}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str = "") -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` ("": the top level)."""
    origin = get_origin(tp)
    bad = ConfigError(f"bad value for '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        keyed = {getattr(option, "kind", None): option for option in get_args(tp)
                 if dataclasses.is_dataclass(option)}
        if isinstance(value, Mapping) and keyed and None not in keyed:
            prefix = f"{key}." if key else ""
            return from_dict(keyed[_kind_of(value, keyed, prefix)], value, prefix=prefix)
        for option in get_args(tp):
            if option is type(None):
                continue
            try:
                return convert(value, option, key)
            except ConfigError:
                pass
        raise bad
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        items = [convert(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): convert(v, get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"'{key}': unsupported config type {tp!r}")


def _kind_of(value: Mapping[str, Any], keyed: Mapping[str, Any], prefix: str) -> str:
    kind = value.get("kind")
    if kind not in keyed:
        raise ConfigError(f"bad value for '{prefix}kind': expected one of {', '.join(map(repr, keyed))}, "
                          f"got {kind!r}")
    return kind


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and bad values raise ConfigError.

    A dataclass with a `kind` class attribute (e.g. `kind: ClassVar[str] = "enat"`) is one
    member of a keyed union: its mapping may carry `kind:`, which must be its own; a field
    typed as a union of such classes picks the class by the mapping's `kind:`."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    own_kind = getattr(cls, "kind", None)
    if own_kind is not None and "kind" in data:
        _kind_of(data, {own_kind: cls}, prefix)
        data = {key: value for key, value in data.items() if key != "kind"}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key '{prefix}{key}'; allowed keys: {allowed}")
        kwargs[key] = convert(value, hints[key], prefix + key)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except BadValue as err:
        raise BadValue(prefix + err.key, err.requirement, err.value) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (tuples become lists, for YAML/JSON)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            kind = {"kind": value.kind} if getattr(type(value), "kind", None) is not None else {}
            return kind | {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def narrow(config: Any, cls: type[T], **changes: Any) -> T:
    """`config`, an instance of a subclass of dataclass `cls`, as a plain `cls` (validated
    again), with `changes`: e.g. a job without the sections only its driver reads."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init} | changes)


def check(condition: bool, key: str, requirement: str, value: Any) -> None:
    """Raise ConfigError unless `condition`: used in __post_init__ for range checks."""
    if not condition:
        raise BadValue(key, requirement, value)
