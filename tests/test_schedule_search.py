"""AutoNAT's finite-difference search as a pure optimizer."""

from __future__ import annotations

import pytest

from enat.evaluation.schedule_search import (
    AutoNATSearch,
    SearchHyperparameters,
    from_vector,
    to_vector,
)
from enat.models.strategy import Strategy


def quadratic(target: list[float]):
    return lambda v: sum((a - b) ** 2 for a, b in zip(v, target, strict=True))


def run(search: AutoNATSearch, objective, updates: int) -> None:
    for _ in range(updates):
        for evaluation in search.pending():
            search.record(evaluation, objective(evaluation.vector))


def test_vector_round_trip():
    strategy = Strategy.default(4)
    assert from_vector(to_vector(strategy), 4) == strategy
    assert len(to_vector(strategy)) == 4 * 4 - 2


def test_one_update_asks_for_4t_minus_1_evaluations_with_the_right_deltas():
    search = AutoNATSearch.start(Strategy.default(8))
    points = search.evaluations()
    assert len(points) == 31 and points[0].direction == -1
    assert points[2].vector[1] == pytest.approx(search.params[1] + 0.01)  # a ratio
    assert points[1].vector[0] == pytest.approx(search.params[0] - 0.01)  # 0.981 + 0.01 > 0.99: backwards
    assert points[8].vector[7] == pytest.approx(search.params[7] + 0.1)  # a mask temperature


def test_converges_on_a_quadratic_with_its_minimum_inside_the_box():
    start = Strategy.default(4)
    target = [0.8, 0.5, 0.2, 1.0, 0.7, 0.4, 1.2, 1.0, 0.8, 0.6, 0.5, 1.0, 1.5, 2.0]
    # The quadratic's curvature is 2 per coordinate; lrs chosen for it (the FID defaults
    # are scaled for FID's units).
    hyper = SearchHyperparameters(ratio_lr=0.1, other_lr=0.1, ratio_delta=1e-3, other_delta=1e-3)
    search = AutoNATSearch(4, to_vector(start), hyper)
    objective = quadratic(target)
    initial = objective(search.params)
    run(search, objective, 60)
    assert objective(search.params) < 1e-3 * initial
    assert search.params == pytest.approx(target, abs=0.02)
    assert search.history[-1]["base_fid"] < search.history[0]["base_fid"]
    best, best_fid = search.best()
    assert best_fid == min(h["base_fid"] for h in search.history)


def test_clipping_keeps_ratios_in_range_and_the_rest_positive():
    hyper = SearchHyperparameters(ratio_lr=1.0, other_lr=1.0)
    search = AutoNATSearch.start(Strategy.default(3), hyper)
    # Pushes ratios up past 0.99 and everything else below zero.
    objective = lambda v: -10 * (v[0] + v[1]) + 10 * sum(v[2:])
    run(search, objective, 5)
    assert all(0 <= r <= 0.99 for r in search.params[:2])
    assert all(x >= 1e-4 for x in search.params[2:])
    search.strategy()  # still a valid Strategy
    # A ratio at its bound is probed backwards: every point to evaluate is a valid strategy.
    assert search.params[0] == pytest.approx(0.99)
    for evaluation in search.evaluations():
        assert all(0 <= r <= 0.99 for r in evaluation.vector[:2])
        from_vector(evaluation.vector, 3)
    assert search.evaluations()[1].vector[0] == pytest.approx(0.98)


@pytest.mark.parametrize("monotone", [False, True])
def test_monotone_option_projects_ratios(monotone):
    hyper = SearchHyperparameters(ratio_lr=1.0, monotone_ratios=monotone)
    search = AutoNATSearch.start(Strategy.default(4), hyper)
    objective = lambda v: 30 * v[1] - 30 * v[2]  # pushes the third ratio above the second
    run(search, objective, 3)
    ratios = search.params[:3]
    assert (ratios == sorted(ratios, reverse=True)) == monotone


def test_interrupted_update_resumes_from_json_without_redoing_finished_points():
    objective = quadratic([0.5] * 14)
    search = AutoNATSearch.start(Strategy.default(4))
    points = search.pending()
    for point in points[:6]:
        search.record(point, objective(point.vector))
    restored = AutoNATSearch.from_json(search.to_json())
    assert [p.key for p in restored.pending()] == [p.key for p in points[6:]]
    for point in restored.pending():
        restored.record(point, objective(point.vector))
    reference = AutoNATSearch.start(Strategy.default(4))
    run(reference, objective, 1)
    assert restored.update == 1 and restored.params == pytest.approx(reference.params)
    # A late result from an older update is ignored.
    assert not restored.record(points[0], 123.0)


def test_the_last_step_is_measured_with_one_evaluation_and_can_win():
    objective = quadratic([0.5] * 14)
    hyper = SearchHyperparameters(ratio_lr=0.1, other_lr=0.1, ratio_delta=1e-3, other_delta=1e-3)
    search = AutoNATSearch.start(Strategy.default(4), hyper)
    run(search, objective, 1)  # one full update: the step is taken, not yet scored
    stepped = list(search.params)
    (final,) = search.pending(base_only=True)
    assert final.direction == -1 and final.vector == stepped
    assert search.record(final, objective(final.vector), base_only=True)
    assert search.update == 2 and search.params == stepped  # measured, not moved
    assert [h["gradient"] is None for h in search.history] == [False, True]
    best, best_fid = search.best()
    assert best_fid == objective(stepped) < search.history[0]["base_fid"]
    assert to_vector(best) == pytest.approx(stepped)


def test_kind_blocks_move_each_kind_together_with_five_evaluations_per_update():
    hyper = SearchHyperparameters(ratio_lr=0.05, other_lr=0.1, ratio_delta=1e-3, other_delta=1e-3,
                                  blocks="kind")
    start = Strategy.default(4)
    search = AutoNATSearch(4, to_vector(start), hyper)
    points = search.evaluations()
    assert len(points) == 5 and points[0].direction == -1
    # Direction 2 moves the four sampling temperatures (coordinates 6..9) and nothing else.
    moved = [i for i, (a, b) in enumerate(zip(points[3].vector, search.params, strict=True)) if a != b]
    assert moved == [6, 7, 8, 9]
    # The best offset per kind of a quadratic is the mean offset of that kind's targets.
    offsets = [-0.05, 0.4, 0.3, 0.6]
    target = [p + offsets[k] + (0.1 if i % 2 else -0.1)
              for k, coordinates in enumerate(search.directions()) for i, p in
              ((i, search.params[i]) for i in coordinates)]
    run(search, quadratic(target), 40)
    assert len(search.velocity) == 4
    for coordinates in search.directions():
        shifts = [search.params[i] - to_vector(start)[i] for i in coordinates]
        assert shifts == pytest.approx([shifts[0]] * len(shifts))  # the kind moved as one
        mean = sum(target[i] - to_vector(start)[i] for i in coordinates) / len(coordinates)
        assert shifts[0] == pytest.approx(mean, abs=0.01)
    restored = AutoNATSearch.from_json(search.to_json())
    assert restored.hyper.blocks == "kind"
    assert restored.evaluations()[3].vector == search.evaluations()[3].vector


def test_unknown_blocks_are_refused():
    with pytest.raises(ValueError, match="blocks"):
        SearchHyperparameters(blocks="coordinate")
