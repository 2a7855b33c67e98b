"""Masking, strategies and strategy-driven generation for ENAT and the NAT baseline."""

from __future__ import annotations

import math

import pytest
import torch

from enat.models import ENATConfig, NATConfig, build_model
from enat.models.config import MaskingConfig
from enat.models.generate import generate
from enat.models.masking import mask_tokens, masked_token_loss, previous_step_input, sample_beta
from enat.models.strategy import Strategy

TINY = dict(codebook_size=32, grid_size=4, width=32, heads=2, num_classes=3)


def tiny(kind: str):
    config = ENATConfig(**TINY, encoder_depth=2, decoder_depth=1) if kind == "enat" \
        else NATConfig(**TINY, depth=2)
    torch.manual_seed(0)
    return build_model(config).eval()


def test_beta_ratios_follow_the_distribution_and_the_generator():
    draws = sample_beta(12, 3, 4000, torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 12 / 15) < 0.01
    again = sample_beta(12, 3, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_enat_masks_one_count_per_batch_and_nat_per_sample():
    ids = torch.randint(0, 32, (64, 16))
    config = MaskingConfig(beta_a=2, beta_b=2)
    masked, mask = mask_tokens(ids, 32, config, torch.Generator().manual_seed(1), one_ratio_per_batch=True)
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and 1 <= counts[0] <= 15
    assert torch.equal(masked == 32, mask) and torch.equal(masked[~mask], ids[~mask])
    _, mask = mask_tokens(ids, 32, config, torch.Generator().manual_seed(1), one_ratio_per_batch=False)
    assert len(set(mask.sum(1).tolist())) > 3  # per-sample ratios differ
    assert mask.sum(1).min() >= 1 and mask.sum(1).max() <= 15


def test_previous_step_input_only_remasks_visible_tokens_equally_per_row():
    ids = torch.randint(0, 32, (8, 16))
    masked, mask = mask_tokens(ids, 32, MaskingConfig(), torch.Generator().manual_seed(2), True)
    for seed in range(5):
        prev = previous_step_input(masked, mask, 32, torch.Generator().manual_seed(seed))
        prev_mask = prev == 32
        assert prev_mask[mask].all()  # everything masked now was masked before
        assert (prev_mask.sum(1) == prev_mask.sum(1)[0]).all()
        assert torch.equal(prev[~prev_mask], masked[~prev_mask])


def test_loss_counts_masked_positions_only():
    logits = torch.randn(2, 4, 8)
    targets = torch.randint(0, 8, (2, 4))
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    changed = targets.clone()
    changed[~mask] = (changed[~mask] + 1) % 8
    assert masked_token_loss(logits, targets, mask, 0.1) == masked_token_loss(logits, changed, mask, 0.1)


def test_default_strategy_is_cosine_with_ramps():
    strategy = Strategy.default(8, cfg_scale=3.0)
    assert strategy.mask_ratios[0] == pytest.approx(math.cos(math.pi / 16))
    assert list(strategy.mask_ratios) == sorted(strategy.mask_ratios, reverse=True)
    assert strategy.cfg_scales[0] == 0 and strategy.cfg_scales[-1] == pytest.approx(3.0)
    assert list(strategy.mask_temperatures) == sorted(strategy.mask_temperatures, reverse=True)
    assert strategy.masked_counts(256) == [251, 236, 212, 181, 142, 97, 49, 0]


def test_strategy_yaml_round_trip_and_autonat_release_format(tmp_path):
    import yaml

    released = (
        "manual_ratios: [0.95, 0.88, 0.79, 0.74, 0.62, 0.40, 0.26]\n"
        "manual_temp: [2.4, 2.47, 1.19, 0.76, 1.06, 0.93, 0.78]\n"
        "manual_samp_temp: [2.89, 1.86, 1.14, 1.37, 1.46, 1.37, 1.70, 0.71]\n"
        "manual_cfg: [0.0001, 0.0001, 0.0001, 0.91, 1.61, 1.19, 1.38, 1.22]\n")
    strategy = Strategy.from_dict(yaml.safe_load(released))
    assert strategy.steps == 8 and strategy.cfg_scales[3] == 0.91
    assert Strategy.from_dict(yaml.safe_load(strategy.to_yaml())) == strategy
    with pytest.raises(ValueError, match="manual_cfg' has 7 values; 8 steps need 8"):
        Strategy.from_dict({**strategy.to_dict(), "manual_cfg": [1.0] * 7})
    with pytest.raises(ValueError, match="unknown: \\['bogus'\\]"):
        Strategy.from_dict({**strategy.to_dict(), "bogus": [1]})


def test_non_monotone_strategy_still_reveals_at_least_one_token_per_step():
    strategy = Strategy((0.5, 0.9, 0.9), (1.0, 1.0, 1.0), (1.0,) * 4, (0.0,) * 4)
    assert strategy.masked_counts(16) == [8, 7, 6, 0]


@pytest.mark.parametrize("kind", ["enat", "nat"])
@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_generation_reveals_the_scheduled_count_and_never_remasks(kind, cfg_scale, monkeypatch):
    model = tiny(kind)
    strategy = Strategy.default(5, cfg_scale=cfg_scale)
    inputs = []
    forward = model.forward

    def recording_forward(ids, *args, **kwargs):
        inputs.append(ids.clone())
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    labels = torch.tensor([0, 1, 2])
    out = generate(model, labels, strategy, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 4) and out.max() < 32
    expected = [16] + strategy.masked_counts(16)[:-1]
    for step, ids in enumerate(inputs):
        assert ids.shape[0] == (6 if cfg_scale else 3)  # CFG: one batched forward
        masked = ids == 32
        assert (masked.sum(1) == expected[step]).all()
        if step:
            previous = inputs[step - 1]
            revealed = previous != 32
            assert not masked[revealed].any()  # never re-mask a revealed token
            assert torch.equal(ids[revealed], previous[revealed])  # revealed ids stay fixed
    final = out.flatten(1)
    assert torch.equal(final[inputs[-1][:3] != 32], inputs[-1][:3][inputs[-1][:3] != 32])


@pytest.mark.parametrize("kind", ["enat", "nat"])
def test_same_seed_same_images(kind):
    model, strategy, labels = tiny(kind), Strategy.default(4), torch.tensor([0, 1, 2, 0])
    first = generate(model, labels, strategy, torch.Generator().manual_seed(7))
    second = generate(model, labels, strategy, torch.Generator().manual_seed(7))
    third = generate(model, labels, strategy, torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_enat_reuse_encodes_only_new_tokens_and_is_cheaper():
    from enat.models.flops import generation_flops

    model = tiny("enat")
    strategy = Strategy.default(8)
    with_reuse = generation_flops(model, strategy)
    without = generation_flops(model, strategy, reuse=False)
    assert with_reuse < without
    same_seed = [generate(model, torch.tensor([1]), strategy, torch.Generator().manual_seed(3), reuse=r)
                 for r in (True, False)]
    assert same_seed[0].shape == same_seed[1].shape


def test_flops_include_the_decoder_when_given():
    from enat.models import VQGANConfig
    from enat.models.flops import generation_flops

    model = tiny("enat")
    decoder = build_model(VQGANConfig(codebook_size=32, code_dim=8, channel_mult=(1, 2, 1),
                                      image_size=16)).eval()
    strategy = Strategy.default(4)
    assert generation_flops(model, strategy, decoder) > generation_flops(model, strategy)


@pytest.mark.slow
def test_enat_s_reuse_counts_at_most_0_6_of_the_flops_without_reuse():
    """The paper: 22.6 vs 39.8 GFLOPs (multiply-adds) for ENAT-S at 8 steps."""
    from pathlib import Path

    import yaml

    from enat.models import build_config
    from enat.models.flops import generation_flops

    preset = Path(__file__).resolve().parents[1] / "configs" / "models" / "enat-s.yaml"
    model = build_model(build_config(yaml.safe_load(preset.read_text()))).eval()
    strategy = Strategy.default(8)
    with_reuse = generation_flops(model, strategy)
    without = generation_flops(model, strategy, reuse=False)
    assert with_reuse <= 0.6 * without
