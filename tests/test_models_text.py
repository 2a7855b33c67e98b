"""Model behaviour the reference fixtures do not cover: text conditioning of ENAT and NAT,
input validation, autocast, and the training paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from enat.models import ENAT, VQGAN, ENATConfig, NATConfig, VQGANConfig, build_model

SMALL = dict(codebook_size=32, grid_size=4, width=64, heads=4, num_classes=10, embed_dropout=0.0)
TEXT = dict(SMALL, context_dim=24, context_len=6)
CONFIGS = {
    "enat": ENATConfig(**TEXT, encoder_depth=2, decoder_depth=1),
    "nat": NATConfig(**TEXT, depth=2),
}
LENGTHS = [3, 6, 0]  # real context tokens per row; the last row is unconditional


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (as the reference fixtures do): the stock init zeroes the
    adaLN modulation, which would make ENAT ignore its condition entirely."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fan_in = param[0].numel() if param.dim() >= 2 else 0
            std = fan_in**-0.5 if fan_in and not name.endswith("bias") else 0.2
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def masked_ids(batch: int, masked: int, seed: int = 0, codebook: int = 32, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, codebook, (batch, length), generator=generator)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    return ids.scatter(1, order[:, :masked], codebook)


def reveal(ids: torch.Tensor, count: int, value: int = 5) -> torch.Tensor:
    """The next sampling step's input: `count` more tokens per row revealed (as `value`)."""
    ids = ids.clone()
    for row in range(ids.shape[0]):
        ids[row, (ids[row] == 32).nonzero()[:count, 0]] = value
    return ids


def text_condition(lengths: list[int], total: int = 6, dim: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(len(lengths), total, dim, generator=generator)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return context, mask


def logits_of(model: torch.nn.Module, ids: torch.Tensor, cond, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, cond, **kwargs)
    return out.logits if isinstance(model, ENAT) else out


@pytest.fixture(params=sorted(CONFIGS))
def text_model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomized(build_model(CONFIGS[request.param]))


# --- text conditioning -----------------------------------------------------------------------


def test_text_conditioned_model_runs(text_model: torch.nn.Module) -> None:
    logits = logits_of(text_model, masked_ids(3, 10), text_condition(LENGTHS))
    assert logits.shape == (3, 16, 32)
    assert torch.isfinite(logits).all()


def test_padding_tokens_do_not_change_outputs(text_model: torch.nn.Module) -> None:
    ids = masked_ids(3, 10)
    context, mask = text_condition(LENGTHS)
    reference = logits_of(text_model, ids, (context, mask))
    # Other values in the padding change nothing...
    noisy = torch.where(mask[..., None], context, torch.randn_like(context) * 100)
    torch.testing.assert_close(logits_of(text_model, ids, (noisy, mask)), reference)
    # ...and neither does the amount of padding: each row alone, with no padding at all.
    for row, length in enumerate(LENGTHS):
        alone = (context[row : row + 1, :length], mask[row : row + 1, :length])
        torch.testing.assert_close(logits_of(text_model, ids[row : row + 1], alone), reference[row : row + 1])


def test_different_contexts_give_different_logits(text_model: torch.nn.Module) -> None:
    ids = masked_ids(3, 10)
    first = logits_of(text_model, ids, text_condition(LENGTHS, seed=1))
    second = logits_of(text_model, ids, text_condition(LENGTHS, seed=2))
    conditioned = torch.tensor(LENGTHS) > 0
    assert ((first - second).abs().amax(dim=(1, 2)) > 1e-3)[conditioned].all()
    # Rows with no real context token are the unconditional prediction either way.
    torch.testing.assert_close(first[~conditioned], second[~conditioned])


def test_text_conditioned_enat_reuse() -> None:
    model = randomized(ENAT(CONFIGS["enat"]))
    cond = text_condition(LENGTHS)
    step1_ids = masked_ids(3, 10)
    with torch.no_grad():
        step1 = model(step1_ids, cond)
        step2 = model(reveal(step1_ids, 4), cond, prev=step1)
    reused = ~step1.masking
    torch.testing.assert_close(step2.feat[reused], model.reuse_proj(step1.feat)[reused])
    assert torch.isfinite(step2.logits).all()


def test_condition_must_match_the_conditioning_mode(text_model: torch.nn.Module) -> None:
    ids = masked_ids(2, 8)
    with pytest.raises(ValueError, match="context, context_mask"):
        text_model(ids, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="context_len"):
        text_model(ids, text_condition([7, 7], total=7))
    class_model = build_model(NATConfig(**SMALL, depth=2)).eval()
    with pytest.raises(ValueError, match="class ids"):
        class_model(ids, text_condition([1, 1]))


# --- ENAT input validation -------------------------------------------------------------------


def test_enat_requires_equal_mask_counts_and_nested_masks() -> None:
    model = ENAT(ENATConfig(**SMALL, encoder_depth=1, decoder_depth=1)).eval()
    labels = torch.tensor([1, 2])
    uneven = torch.cat([masked_ids(1, 10), masked_ids(1, 9, seed=1)])
    with pytest.raises(ValueError, match="same number of tokens"):
        model(uneven, labels)
    first = model(masked_ids(2, 6), labels)
    with pytest.raises(ValueError, match="subset"):
        model(masked_ids(2, 3, seed=5), labels, prev=first)


# --- autocast and training -------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_bfloat16_autocast_matches_float32(kind: str, text: bool) -> None:
    config = CONFIGS[kind] if text else dataclasses.replace(CONFIGS[kind], context_dim=0, context_len=0)
    model = randomized(build_model(config))
    ids = masked_ids(3, 10)
    cond = text_condition(LENGTHS) if text else torch.tensor([1, 2, 10])
    reference = logits_of(model, ids, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_of(model, ids, cond)
        if kind == "enat":  # a reuse step under autocast too
            with torch.no_grad():
                step2 = model(reveal(ids, 4), cond, prev=model(ids, cond))
            assert torch.isfinite(step2.logits).all()
    assert (logits.float() - reference).norm() / reference.norm() < 0.05


def test_enat_training_step_reaches_every_used_parameter() -> None:
    model = randomized(ENAT(ENATConfig(**SMALL, encoder_depth=1, decoder_depth=1))).train()
    labels = torch.tensor([1, 2])
    ids = masked_ids(2, 10)
    with torch.no_grad():  # the reuse state comes from a no-grad pass, as in ENAT training
        prev = model(ids, labels)
    out = model(reveal(ids, 4), labels, prev=prev)
    target = torch.randint(0, 32, (2, 16))
    F.cross_entropy(out.logits[out.masking], target[out.masking]).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_cond_dropout_replaces_the_condition_by_the_null_class() -> None:
    config = ENATConfig(**SMALL, encoder_depth=1, decoder_depth=1, cond_dropout=1.0)
    model = randomized(ENAT(config))
    ids = masked_ids(2, 10)
    null = logits_of(model, ids, torch.full((2,), config.null_class))
    model.train()
    torch.testing.assert_close(logits_of(model, ids, torch.tensor([1, 2])), null)


def test_vqgan_training_forward_with_l2_normalized_codes() -> None:
    model = VQGAN(VQGANConfig(codebook_size=16, code_dim=8, l2_normalize_codes=True))
    images = torch.rand(2, 3, 32, 32)
    reconstruction, ids, codebook_loss, commitment_loss = model(images)
    assert reconstruction.shape == images.shape and ids.shape == (2, 8, 8)
    loss = F.mse_loss(reconstruction, images) + codebook_loss + 0.25 * commitment_loss
    loss.backward()
    assert model.quantizer.codebook.weight.grad.any() and model.encoder.stem.weight.grad.any()
    with torch.no_grad():
        quantized = model.quantize(model.encoder(images))[0]
        assert torch.allclose(quantized.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
        torch.testing.assert_close(model.decode(ids), model.decoder(quantized), rtol=1e-4, atol=1e-4)
