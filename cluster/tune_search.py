"""Strategy search as a Ray Tune experiment: each trial evaluates one generation strategy.

`AutoNATSearcher` adapts the pure optimizer in evaluation/schedule_search.py to Tune's
Searcher interface: it hands out the evaluations of the current update (4T-1, or 5 by kind) as
concurrent trials, takes the step when the last one reports (after the last update, it
only evaluates the point that step reached), and persists its JSON
state to storage after every result, so a killed driver resumes the current update
instead of restarting the search. `run_search` drives either it or a standard Tune
searcher (Optuna) over the same space and the same evaluation budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from enat.cluster.ray_session import ray_session
from enat.evaluation.schedule_search import AutoNATSearch, Evaluation, from_vector
from enat.models.strategy import Strategy
from enat.pipelines import storage

# A factory, called inside each trial's worker, returning strategy, seed -> FID.
ObjectiveFactory = Callable[[], Callable[[Strategy, int], float]]
STATE_NAME = "search_state.json"


class AutoNATSearcher(Searcher):
    def __init__(self, search: AutoNATSearch, max_updates: int, state_url: str | None = None,
                 max_failures: int = 2):
        super().__init__(metric="fid", mode="min")
        self.search, self.max_updates, self.state_url = search, max_updates, state_url
        self.in_flight: dict[str, Evaluation] = {}
        self.failures: dict[str, int] = {}
        self.max_failures = max_failures

    @property
    def measuring_last_step(self) -> bool:
        return self.search.update == self.max_updates

    @property
    def failed(self) -> bool:
        """Some evaluation failed `max_failures` times: stop instead of retrying forever."""
        return any(count >= self.max_failures for count in self.failures.values())

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.search.update > self.max_updates or self.failed:
            return Searcher.FINISHED
        busy = {e.key for e in self.in_flight.values()}
        waiting = [e for e in self.search.pending(self.measuring_last_step) if e.key not in busy]
        if not waiting:
            return None  # the rest of this update is running; Tune asks again later
        evaluation = waiting[0]
        self.in_flight[trial_id] = evaluation
        return {"vector": evaluation.vector, "steps": self.search.steps,
                "update": evaluation.update, "direction": evaluation.direction}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        evaluation = self.in_flight.pop(trial_id, None)
        if evaluation is None:
            return
        if error or not result or "fid" not in result:
            # Stays pending, so a later trial retries it (up to max_failures times).
            self.failures[evaluation.key] = self.failures.get(evaluation.key, 0) + 1
            return
        self.search.record(evaluation, result["fid"], base_only=evaluation.update == self.max_updates)
        self.persist()

    def persist(self) -> None:
        if self.state_url:
            storage.write_bytes(self.state_url, self.search.to_json().encode())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as handle:
            handle.write(self.search.to_json())

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as handle:
            self.search = AutoNATSearch.from_json(handle.read())


def load_or_start(state_url: str | None, initial: Strategy, hyper) -> AutoNATSearch:
    """The saved search under `state_url` when there is one (resume), else a new one."""
    if state_url and storage.exists(state_url):
        search = AutoNATSearch.from_json(storage.read_bytes(state_url).decode())
        if search.steps != initial.steps:
            raise ValueError(f"{state_url} holds a {search.steps}-step search, not {initial.steps}; "
                             f"choose another search name")
        return search
    return AutoNATSearch.start(initial, hyper)


def search_space(steps: int, max_temperature: float, max_cfg: float) -> dict[str, Any]:
    """The same 4T-2 coordinates for a standard searcher, with explicit bounds."""
    space = {}
    for i in range(steps - 1):
        space[f"ratio_{i}"] = tune.uniform(0.0, 0.99)
        space[f"mask_temp_{i}"] = tune.uniform(1e-4, max_temperature)
    for i in range(steps):
        space[f"samp_temp_{i}"] = tune.uniform(1e-4, max_temperature)
        space[f"cfg_{i}"] = tune.uniform(1e-4, max_cfg)
    return space


def strategy_of(config: dict[str, Any]) -> Strategy:
    """The strategy a trial config describes (AutoNAT vector or named coordinates)."""
    if "vector" in config:
        return from_vector(config["vector"], config["steps"])
    steps = sum(key.startswith("samp_temp_") for key in config)
    return Strategy(tuple(config[f"ratio_{i}"] for i in range(steps - 1)),
                    tuple(config[f"mask_temp_{i}"] for i in range(steps - 1)),
                    tuple(config[f"samp_temp_{i}"] for i in range(steps)),
                    tuple(config[f"cfg_{i}"] for i in range(steps)))


def trial(config: dict[str, Any], objective_factory: ObjectiveFactory, seed: int) -> None:
    """One Tune trial: evaluate one strategy, report its FID. Every trial of the search
    uses the same seed, so differences (within an update, and between the base points the
    search keeps the best of) measure the strategy, not sampling noise."""
    objective = objective_factory()
    strategy = strategy_of(config)
    tune.report({"fid": float(objective(strategy, seed)),
                 "update": int(config.get("update", -1))})


@dataclass
class TuneSettings:
    name: str
    local_dir: str  # Ray Tune's own bookkeeping (our state lives in `state_url`)
    concurrency: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


def run_search(objective_factory: ObjectiveFactory, initial: Strategy, settings: TuneSettings,
               searcher: str = "autonat", updates: int = 1, evaluations: int = 0,
               seed: int = 0, state_url: str | None = None, hyper=None,
               callbacks: list | None = None, max_temperature: float = 5.0,
               max_cfg: float = 10.0) -> dict[str, Any]:
    """Run the experiment; returns the best strategy, its FID and per-trial results. A search
    started from the CLI leaves no Ray behind (see ray_session)."""
    with ray_session(quiet=True):
        if searcher == "autonat":
            search = load_or_start(state_url, initial, hyper)
            algorithm: Searcher = AutoNATSearcher(search, updates, state_url)
            num_samples = -1  # until the searcher says FINISHED
        elif searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            algorithm = OptunaSearch(metric="fid", mode="min", seed=seed,
                                     points_to_evaluate=[named_point(initial)])
            num_samples = evaluations or updates * (4 * initial.steps - 1)
        else:
            raise ValueError(f"unknown searcher '{searcher}' (autonat or optuna)")
        param_space = {} if searcher == "autonat" else search_space(initial.steps, max_temperature, max_cfg)
        trainable = tune.with_resources(
            tune.with_parameters(trial, objective_factory=objective_factory, seed=seed),
            {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=algorithm, num_samples=num_samples,
                                        max_concurrent_trials=settings.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=settings.name, storage_path=os.path.abspath(settings.local_dir),
                                      callbacks=callbacks or [], verbose=0),
        )
        results = tuner.fit()
        if isinstance(algorithm, AutoNATSearcher) and algorithm.failed:
            errors = [str(r.error).splitlines()[-1] for r in results if r.error]
            raise RuntimeError(f"strategy evaluations keep failing: {errors[-1] if errors else 'unknown'}")
        trials = [{"fid": r.metrics.get("fid"), "config": r.config} for r in results
                  if r.metrics and "fid" in r.metrics]
        if searcher == "autonat":
            best, best_fid = algorithm.search.best()
            return {"best": best, "best_fid": best_fid, "trials": trials,
                    "history": algorithm.search.history, "final": algorithm.search.strategy()}
        top = min(trials, key=lambda t: t["fid"])
        return {"best": strategy_of(top["config"]), "best_fid": top["fid"], "trials": trials,
                "history": [], "final": strategy_of(top["config"])}


def named_point(strategy: Strategy, low: float = 1e-4) -> dict[str, float]:
    """The strategy as search_space coordinates (clipped into the space's bounds)."""
    point = {}
    for i, (ratio, temperature) in enumerate(zip(strategy.mask_ratios, strategy.mask_temperatures,
                                                 strict=True)):
        point[f"ratio_{i}"], point[f"mask_temp_{i}"] = ratio, max(temperature, low)
    for i, (temperature, cfg) in enumerate(zip(strategy.sample_temperatures, strategy.cfg_scales,
                                               strict=True)):
        point[f"samp_temp_{i}"], point[f"cfg_{i}"] = max(temperature, low), max(cfg, low)
    return point
