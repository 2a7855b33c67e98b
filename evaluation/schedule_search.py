"""AutoNAT's generation-strategy search as a pure optimizer (no Ray here).

The strategy of T steps is a vector of 4T-2 numbers: T-1 mask ratios, T-1 mask
temperatures, T sampling temperatures, T CFG scales. One update estimates the gradient
of FID by one-sided finite differences, one coordinate at a time (step 0.01 for ratios,
0.1 for the rest): 4T-1 evaluations (the base point and 4T-2 perturbed points), all
independent, so they can run at once. It then takes an SGD-with-momentum step (momentum
0.5, lr 1e-3 for ratios, 0.1 for the rest) and clips ratios to [0, 0.99] and the rest to
>= 1e-4.

`blocks="kind"` moves each kind together instead (all ratios, all mask temperatures, all
sampling temperatures, all CFG scales: 4 directions, 5 evaluations per update). That is the
same update restricted to one shared offset per kind. Use it when evaluations are small: at
250 images of a tiny model, moving one step's temperature by 0.1 changes FID by less than
the sampling noise (the finite differences are then noise), while moving a whole kind
changes it by several times the noise.

Ratios are not forced to be non-increasing: a non-monotone schedule is still valid,
because every step reveals at least one token (Strategy.masked_counts). Set
`monotone_ratios` to project them onto non-increasing sequences after each update.

After the last update the search measures where its step landed (one evaluation of the
new point, no differences around it): `pending(base_only=True)` / `record(..., base_only=True)`.
So `updates` steps cost updates * (4T-1) + 1 evaluations (updates * 5 + 1 by kind), and
every step taken is scored.

The state is plain JSON (`to_json`/`from_json`), so an interrupted search resumes: the
evaluations already finished for the current update are kept and only the missing ones
are asked for again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from enat.models.strategy import Strategy
from enat.models.typed_config import check


@dataclass
class SearchHyperparameters:
    ratio_delta: float = 0.01  # finite-difference step for mask ratios
    other_delta: float = 0.1  # ... for temperatures and CFG scales
    ratio_lr: float = 1e-3
    other_lr: float = 0.1
    momentum: float = 0.5
    max_ratio: float = 0.99
    min_other: float = 1e-4
    monotone_ratios: bool = False
    blocks: Literal["step", "kind"] = "step"  # one difference per coordinate, or per kind

    def __post_init__(self) -> None:
        for key in ("ratio_delta", "other_delta", "ratio_lr", "other_lr"):
            check(getattr(self, key) > 0, key, "> 0", getattr(self, key))
        check(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        check(self.blocks in ("step", "kind"), "blocks", "step or kind", self.blocks)


def to_vector(strategy: Strategy) -> list[float]:
    return [float(v) for group in strategy.as_tuple() for v in group]


def from_vector(vector: list[float], steps: int) -> Strategy:
    cuts = [0, steps - 1, 2 * (steps - 1), 3 * steps - 2, 4 * steps - 2]
    parts = [tuple(vector[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return Strategy(*parts)


@dataclass
class Evaluation:
    """One point to evaluate: the base (direction -1) or a perturbed direction."""

    update: int
    direction: int
    vector: list[float]

    @property
    def key(self) -> str:
        return f"{self.update}:{self.direction}"


@dataclass
class AutoNATSearch:
    steps: int
    params: list[float]
    hyper: SearchHyperparameters = field(default_factory=SearchHyperparameters)
    velocity: list[float] = field(default_factory=list)  # one per direction
    update: int = 0
    results: dict[str, float] = field(default_factory=dict)  # key -> FID, current update
    history: list[dict] = field(default_factory=list)  # per finished update: base FID, params

    def __post_init__(self) -> None:
        if len(self.params) != 4 * self.steps - 2:
            raise ValueError(f"{self.steps} steps need {4 * self.steps - 2} parameters")
        if not self.velocity:
            self.velocity = [0.0] * len(self.directions())

    @classmethod
    def start(cls, strategy: Strategy, hyper: SearchHyperparameters | None = None) -> AutoNATSearch:
        return cls(strategy.steps, to_vector(strategy), hyper or SearchHyperparameters())

    def directions(self) -> list[list[int]]:
        """The coordinates each finite difference moves together."""
        if self.hyper.blocks == "step":
            return [[i] for i in range(len(self.params))]
        t = self.steps
        cuts = [0, t - 1, 2 * (t - 1), 3 * t - 2, 4 * t - 2]
        return [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def is_ratio(self, direction: int) -> bool:
        return self.directions()[direction][0] < self.steps - 1

    def delta(self, direction: int) -> float:
        """The finite-difference step of a direction in this update: forward, except for
        ratios at their upper bound, which step backward (a ratio of 1 would mask everything)."""
        if self.is_ratio(direction):
            step = self.hyper.ratio_delta
            top = max(self.params[i] for i in self.directions()[direction])
            return -step if top + step > self.hyper.max_ratio else step
        return self.hyper.other_delta

    def evaluations(self) -> list[Evaluation]:
        """All evaluations of the current update (base first, then one per direction)."""
        points = [Evaluation(self.update, -1, list(self.params))]
        for d, coordinates in enumerate(self.directions()):
            moved, delta = list(self.params), self.delta(d)
            for i in coordinates:
                moved[i] += delta
            points.append(Evaluation(self.update, d, moved))
        return points

    def pending(self, base_only: bool = False) -> list[Evaluation]:
        """The current update's evaluations without a result; `base_only`: its base point
        alone (measuring the last step's landing point, with no step to follow)."""
        points = self.evaluations()[:1] if base_only else self.evaluations()
        return [e for e in points if e.key not in self.results]

    def record(self, evaluation: Evaluation, fid: float, base_only: bool = False) -> bool:
        """Store one result; when the update's last result arrives, take the step (or, with
        `base_only`, only log the base point). Returns True when an update was completed.
        Results of other updates are ignored."""
        if evaluation.update != self.update:
            return False
        self.results[evaluation.key] = float(fid)
        if self.pending(base_only):
            return False
        if base_only:
            self._close({"gradient": None})
        else:
            self._step()
        return True

    def _step(self) -> None:
        base = self.results[f"{self.update}:-1"]
        gradient = [(self.results[f"{self.update}:{d}"] - base) / self.delta(d)
                    for d in range(len(self.directions()))]
        params = list(self.params)
        for d, (g, coordinates) in enumerate(zip(gradient, self.directions(), strict=True)):
            self.velocity[d] = self.hyper.momentum * self.velocity[d] + g
            lr = self.hyper.ratio_lr if self.is_ratio(d) else self.hyper.other_lr
            for i in coordinates:
                self.params[i] -= lr * self.velocity[d]
        self._clip()
        self._close({"params": params, "gradient": gradient})

    def _close(self, entry: dict) -> None:
        """Log the update (its base point's FID and parameters) and move to the next one."""
        self.history.append({"update": self.update, "base_fid": self.results[f"{self.update}:-1"],
                             "params": list(self.params), **entry})
        self.update += 1
        self.results = {}

    def _clip(self) -> None:
        ratios = self.steps - 1
        for i in range(len(self.params)):
            if i < ratios:
                self.params[i] = min(max(self.params[i], 0.0), self.hyper.max_ratio)
            else:
                self.params[i] = max(self.params[i], self.hyper.min_other)
        if self.hyper.monotone_ratios:
            for i in range(1, ratios):
                self.params[i] = min(self.params[i], self.params[i - 1])

    def best(self) -> tuple[Strategy, float]:
        """The evaluated base point with the lowest FID (the current one if none yet)."""
        if not self.history:
            return from_vector(self.params, self.steps), float("nan")
        best = min(self.history, key=lambda h: h["base_fid"])
        return from_vector(best["params"], self.steps), best["base_fid"]

    def strategy(self) -> Strategy:
        return from_vector(self.params, self.steps)

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps, "params": self.params, "hyper": self.hyper.__dict__,
                           "velocity": self.velocity, "update": self.update,
                           "results": self.results, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> AutoNATSearch:
        data = json.loads(text)
        data["hyper"] = SearchHyperparameters(**data["hyper"])
        return cls(**data)
