"""bench/vs_reference.py without the reference checkout: its exit-0 path, its error for a
folder that is not a checkout, and its compare and timing logic against stand-ins (a
reference-style module written here, a fake clock)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from enat.models import ENATConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vs_reference", ROOT / "bench" / "vs_reference.py")
vs_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_reference)


def test_without_reference_it_says_so_and_exits_0(capsys):
    assert vs_reference.main([]) == 0
    assert "no --reference" in capsys.readouterr().out


def test_a_folder_that_is_no_checkout_is_a_one_line_error(tmp_path, capsys):
    assert vs_reference.main(["--reference", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "not a LeapLabTHU/ENAT checkout" in error and "\n" not in error


class ReferenceStyle(torch.nn.Module):
    """The reference DiT's calling convention (context [B, 1], prev_dict, return_dict) around
    one of our models, optionally with its logits shifted."""

    def __init__(self, model, shift: float = 0.0):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, masked_ids, context=None, prev_dict=None, return_dict=False):
        prev = None if prev_dict is None else (None, prev_dict["feat"], prev_dict["masking"])
        out = vs_reference.enat_step(self.model)(masked_ids, context.reshape(-1), prev)
        return {"logits": out[0] + self.shift, "feat": out[1], "masking": out[2]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(ENATConfig(codebook_size=32, grid_size=4, width=32, heads=2, num_classes=3,
                                   encoder_depth=2, decoder_depth=1)).eval()
    vs_reference.perturb_(model)  # so that no block is the identity
    return model


def test_same_function_gives_zero_difference_and_a_change_is_seen(tiny):
    config = tiny.config
    args = (config.seq_len, config.mask_id, config.num_classes)
    same = vs_reference.max_difference(vs_reference.reference_step(ReferenceStyle(tiny)),
                                       vs_reference.enat_step(tiny), *args)
    assert same == {"logits": 0.0, "feat": 0.0}
    shifted = vs_reference.max_difference(vs_reference.reference_step(ReferenceStyle(tiny, 0.5)),
                                          vs_reference.enat_step(tiny), *args)
    assert shifted["logits"] == pytest.approx(0.5) and shifted["feat"] == 0.0


def test_a_disagreement_on_the_mask_is_an_error(tiny):
    def wrong_mask(ids, labels, prev):
        logits, feat, masking = vs_reference.enat_step(tiny)(ids, labels, prev)
        return logits, feat, ~masking

    config = tiny.config
    with pytest.raises(AssertionError, match="masked"):
        vs_reference.max_difference(wrong_mask, vs_reference.enat_step(tiny), config.seq_len,
                                    config.mask_id, config.num_classes)


def test_timing_is_interleaved_in_alternating_order_and_uses_medians(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(vs_reference.time, "perf_counter", lambda: clock[0])

    def contestant(name: str, costs: list[float]):
        def call():
            calls.append(name)
            clock[0] += costs[len([c for c in calls if c == name]) - 1]
        return call

    # The first call of each is the warm-up; the reference has one slow outlier.
    times = vs_reference.interleaved({"reference": contestant("reference", [50, 3, 3, 90]),
                                      "enat": contestant("enat", [50, 2, 2, 2])}, repeats=3)
    assert calls == ["reference", "enat", "enat", "reference", "reference", "enat", "enat", "reference"]
    assert times == {"reference": 3, "enat": 2}
    assert vs_reference.speed_ratio(times) == 1.5


@pytest.mark.parametrize("steps", [1, 4, 8, 12])
def test_the_matching_strategy_masks_what_the_reference_sampler_masks(steps):
    strategy = vs_reference.matching_strategy(steps)
    for length in (256, 1024):
        reference = vs_reference.reference_masked_counts(length, steps)
        assert strategy.masked_counts(length) == reference[:-1] + [0]
    assert strategy.cfg_scales[0] == 0 and strategy.uses_guidance == (steps > 1)


def test_short_sequences_with_many_steps_differ_so_the_bench_checks_the_counts():
    # The reference may reveal nothing in a step (15, 15, ...); ours reveals at least one.
    assert vs_reference.matching_strategy(12).masked_counts(16)[:2] == [15, 14]
    assert vs_reference.reference_masked_counts(16, 12)[:2] == [15, 15]
