"""The strategy search as a real Ray Tune experiment, on objectives with known minima."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ray import cloudpickle

from enat.evaluation.schedule_search import AutoNATSearch, SearchHyperparameters, to_vector
from enat.models.strategy import Strategy

TARGET = [0.8, 0.5, 0.2, 1.0, 0.7, 0.4, 1.2, 1.0, 0.8, 0.6, 0.5, 1.0, 1.5, 2.0]


def quadratic_factory():
    return lambda strategy, seed: sum((a - b) ** 2 for a, b in zip(to_vector(strategy), TARGET,
                                                                       strict=True))


def seed_marking_factory():
    """The quadratic plus 10 x the seed: a trial run with another seed stands out."""
    return lambda strategy, seed: quadratic_factory()(strategy, seed) + 10 * seed


# Ray workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


HYPER = SearchHyperparameters(ratio_lr=0.1, other_lr=0.1, ratio_delta=1e-3, other_delta=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_autonat_searcher_runs_updates_as_tune_trials_and_improves(local_ray, tmp_path):
    from enat.cluster.tune_search import TuneSettings, run_search

    initial = Strategy.default(4)
    state = str(tmp_path / "state.json")
    result = run_search(seed_marking_factory, initial, TuneSettings("t1", str(tmp_path / "tune")),
                        updates=3, state_url=state, hyper=HYPER, seed=5)
    assert len(result["trials"]) == 3 * 15 + 1  # 4T-1 evaluations per update, then the last step's point
    # Every trial, in every update, used the search's seed: base points compare like with like.
    assert all(50 <= t["fid"] < 60 for t in result["trials"])
    fids = [h["base_fid"] for h in result["history"]]
    assert len(fids) == 4 and fids[3] < fids[2] < fids[1] < fids[0]
    assert result["best_fid"] == fids[3]
    saved = AutoNATSearch.from_json(open(state).read())
    assert saved.update == 4 and saved.strategy() == result["final"] == result["best"]


@pytest.mark.integration
@pytest.mark.slow
def test_failing_evaluations_stop_the_search_with_the_error(local_ray, tmp_path):
    from enat.cluster.tune_search import TuneSettings, run_search

    def broken_factory():
        def objective(strategy, seed):
            raise ValueError("checkpoint unreadable")
        return objective

    with pytest.raises(RuntimeError, match="keep failing: .*checkpoint unreadable"):
        run_search(broken_factory, Strategy.default(3), TuneSettings("t3", str(tmp_path / "tune")))


@pytest.mark.integration
@pytest.mark.slow
def test_optuna_searcher_over_the_same_space(local_ray, tmp_path):
    from enat.cluster.tune_search import TuneSettings, run_search

    initial = Strategy.default(4)
    result = run_search(quadratic_factory, initial, TuneSettings("t2", str(tmp_path / "tune")),
                        searcher="optuna", evaluations=12)
    assert len(result["trials"]) == 12
    first = quadratic_factory()(initial, 0)
    assert result["best_fid"] <= first  # the starting point is evaluated first
    assert result["best"].steps == 4


DRIVER = """
import sys, time
from enat.cluster.tune_search import TuneSettings, run_search
from enat.evaluation.schedule_search import SearchHyperparameters, to_vector
from enat.models.strategy import Strategy
TARGET = {target!r}
def factory():
    def objective(strategy, seed):
        time.sleep(0.3)
        return sum((a - b) ** 2 for a, b in zip(to_vector(strategy), TARGET))
    return objective
hyper = SearchHyperparameters(ratio_lr=0.1, other_lr=0.1, ratio_delta=1e-3, other_delta=1e-3)
run_search(factory, Strategy.default(4), TuneSettings("kill", {tune!r}), updates=2,
           state_url={state!r}, hyper=hyper)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_killed_driver_resumes_the_current_update(tmp_path):

    state = tmp_path / "state.json"
    script = DRIVER.format(target=TARGET,
                           tune=str(tmp_path / "tune"), state=str(state))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until update 1 is under way
        if state.exists():
            data = json.loads(state.read_text())
            if data["update"] == 1 and len(data["results"]) >= 3:
                break
        time.sleep(0.2)
    else:
        pytest.fail("the search made no progress")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    before = json.loads(state.read_text())
    assert before["update"] == 1 and len(before["history"]) == 1

    rerun = subprocess.run([sys.executable, "-c", script], env=env, timeout=600,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = json.loads(state.read_text())
    assert after["update"] == 3  # two updates, then the point the second one reached
    assert after["history"][0] == before["history"][0]  # update 0 was not redone
