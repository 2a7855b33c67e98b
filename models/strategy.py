"""A generation strategy: the per-step schedule that AutoNAT searches.

For T steps: T-1 mask ratios (share of tokens still masked after steps 1..T-1; after the
last step none is), T-1 mask temperatures (Gumbel noise on the confidence that chooses
what to re-mask), T sampling temperatures and T CFG scales. The plain-dict form uses
AutoNAT's keys, so the released strategy YAML files load as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AUTONAT_KEYS = ("manual_ratios", "manual_temp", "manual_samp_temp", "manual_cfg")


@dataclass(frozen=True)
class Strategy:
    mask_ratios: tuple[float, ...]
    mask_temperatures: tuple[float, ...]
    sample_temperatures: tuple[float, ...]
    cfg_scales: tuple[float, ...]

    def __post_init__(self) -> None:
        steps = len(self.sample_temperatures)
        if steps < 1:
            raise ValueError("a strategy needs at least one step")
        lengths = {"manual_ratios": (len(self.mask_ratios), steps - 1),
                   "manual_temp": (len(self.mask_temperatures), steps - 1),
                   "manual_cfg": (len(self.cfg_scales), steps)}
        for key, (have, want) in lengths.items():
            if have != want:
                raise ValueError(f"strategy '{key}' has {have} values; {steps} steps need {want}")
        if any(not 0 <= r < 1 for r in self.mask_ratios):
            raise ValueError(f"strategy 'manual_ratios' must lie in [0, 1), got {self.mask_ratios}")
        if any(t < 0 for t in self.mask_temperatures + self.sample_temperatures):
            raise ValueError("strategy temperatures must be >= 0")

    @property
    def steps(self) -> int:
        return len(self.sample_temperatures)

    @property
    def uses_guidance(self) -> bool:
        return any(s != 0 for s in self.cfg_scales)

    def masked_counts(self, seq_len: int) -> list[int]:
        """Tokens still masked after each step (AutoNAT's rule): floor(L * ratio), but every
        step reveals at least one token, so a non-monotone schedule (the search may make
        one) still ends fully revealed after the last step."""
        counts, masked = [], seq_len
        for ratio in self.mask_ratios:
            masked = max(min(math.floor(seq_len * ratio), masked - 1), 0)
            counts.append(masked)
        return counts + [0]

    @classmethod
    def default(cls, steps: int = 8, cfg_scale: float = 2.0, mask_temperature: float = 3.0,
                sample_temperature: tuple[float, float] = (1.0, 0.6)) -> Strategy:
        """AutoNAT's starting point: cosine ratios, linearly decaying temperatures, a
        linear CFG ramp from 0 to `cfg_scale`."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        start, end = sample_temperature
        ramp = [t / (steps - 1) if steps > 1 else 1.0 for t in range(steps)]
        return cls(
            mask_ratios=tuple(math.cos(math.pi / 2 * (t + 1) / steps) for t in range(steps - 1)),
            mask_temperatures=tuple(mask_temperature * (1 - (t + 1) / steps) for t in range(steps - 1)),
            sample_temperatures=tuple(start + (end - start) * r for r in ramp),
            cfg_scales=tuple(cfg_scale * r for r in ramp),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Strategy:
        """From AutoNAT's keys (the released YAML files), with a one-line error otherwise."""
        unknown = sorted(set(data) - set(AUTONAT_KEYS))
        missing = [k for k in AUTONAT_KEYS if k not in data]
        if unknown or missing:
            raise ValueError(f"strategy keys must be {', '.join(AUTONAT_KEYS)}; "
                             f"unknown: {unknown or 'none'}, missing: {missing or 'none'}")
        try:
            values = [tuple(float(v) for v in data[k]) for k in AUTONAT_KEYS]
        except (TypeError, ValueError):
            raise ValueError("strategy values must be lists of numbers") from None
        return cls(*values)

    def to_dict(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in zip(AUTONAT_KEYS, self.as_tuple(), strict=True)}

    def as_tuple(self) -> tuple[tuple[float, ...], ...]:
        return (self.mask_ratios, self.mask_temperatures, self.sample_temperatures, self.cfg_scales)

    def to_yaml(self) -> str:
        """YAML text in AutoNAT's format (flow lists, full float precision)."""
        return "".join(f"{k}: [{', '.join(repr(float(v)) for v in vals)}]\n"
                       for k, vals in self.to_dict().items())
