"""The FSQ quantizer (models/vqgan.py) and its config rules; the id predictability figures."""

from __future__ import annotations

import math

import pytest
import torch

from enat.models import VQGAN, build_config
from enat.models.typed_config import ConfigError
from enat.models.vqgan import FSQuantizer
from enat.trainer.token_predictability import ProbeConfig, measure, unigram_entropy


def fsq_config(levels=(4, 4, 4, 4), **extra):
    return build_config({"kind": "vqgan", "quantizer": "fsq", "fsq_levels": list(levels),
                         "code_dim": len(levels), "codebook_size": math.prod(levels),
                         "base_channels": 32, "channel_mult": [1, 2], "norm_groups": 8, **extra})


@pytest.mark.parametrize("levels", [(4, 4, 4, 4), (5, 5, 5), (8, 6, 5), (2, 3)])
def test_every_id_round_trips_through_its_code(levels):
    quantizer = FSQuantizer(fsq_config(levels))
    size = math.prod(levels)
    ids = torch.arange(size).view(1, 1, size)
    codes = quantizer.lookup(ids)
    assert codes.abs().max() <= 1.0
    # A latent whose squashed value lies 0.3 inside a code's rounding cell quantizes back to
    # that code's id (atanh inverts the squash; the outermost values are approached, not hit).
    levels_t = torch.tensor(levels).view(1, -1, 1, 1).float()
    offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
    half = (levels_t - 1) * (1 + 1e-3) / 2
    digits = codes * (levels_t // 2)
    target = digits - 0.3 * digits.sign()
    latent = torch.atanh((target + offset) / half) - torch.atanh(offset / half)
    quantized, back, codebook_loss, commitment_loss = quantizer(latent)
    assert torch.equal(back, ids)
    assert torch.allclose(quantized, codes)
    assert float(codebook_loss) == 0 and float(commitment_loss) == 0
    assert len(torch.unique(codes.flatten(2), dim=2)[0, 0]) == size  # distinct codes


def test_flat_latents_give_one_id_and_gradients_pass_straight_through():
    quantizer = FSQuantizer(fsq_config())
    latent = torch.full((2, 4, 8, 8), 0.3, requires_grad=True)
    quantized, ids, _, _ = quantizer(latent)
    assert ids.unique().numel() == 1
    quantized.sum().backward()
    assert latent.grad is not None and latent.grad.abs().min() > 0


def test_fsq_model_encodes_decodes_and_has_no_quantizer_state():
    model = VQGAN(fsq_config())
    images = torch.rand(3, 3, 32, 32)
    ids = model.encode(images)
    assert ids.shape == (3, 16, 16) and int(ids.max()) < 256
    assert model.decode(ids).shape == images.shape
    assert not any(key.startswith("quantizer") for key in model.state_dict())


@pytest.mark.parametrize(("change", "key"), [
    ({"codebook_size": 255}, "codebook_size"),
    ({"code_dim": 3}, "code_dim"),
    ({"l2_normalize_codes": True}, "l2_normalize_codes"),
    ({"fsq_levels": [4, 1, 4, 4], "codebook_size": 64}, "fsq_levels"),
    ({"norm_groups": 7}, "base_channels"),
])
def test_bad_fsq_configs_name_their_key(change, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        fsq_config(**change)


def test_vq_rejects_fsq_levels():
    with pytest.raises(ConfigError, match="'fsq_levels'"):
        build_config({"kind": "vqgan", "fsq_levels": [4, 4]})


def test_unigram_entropy():
    assert unigram_entropy(torch.zeros(10, 4, dtype=torch.long), 8) == 0.0
    assert unigram_entropy(torch.arange(8).repeat(5), 8) == pytest.approx(math.log(8))


def test_probe_learns_structured_ids_but_not_random_ones():
    """Ids that are a function of the class and position are predictable: the probe ends far
    below their unigram entropy; uniformly random ids teach it nothing."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    pattern = torch.randint(0, 16, (4, 4, 4), generator=generator)
    structured = pattern[labels]
    noise = torch.randint(0, 16, (400, 4, 4), generator=generator)
    probe = ProbeConfig(width=32, depth=2, heads=2, steps=400, batch_size=32, lr=3e-3)
    learned = measure(structured[:300], labels[:300], structured[300:], labels[300:], 16, 4, probe)
    random = measure(noise[:300], labels[:300], noise[300:], labels[300:], 16, 4, probe)
    assert learned.probe_loss < 0.5 * learned.unigram_entropy
    assert random.gain < 0.1


@pytest.mark.slow
def test_fsq_tokenizer_round_trips_through_pretokenize_train_and_sample(tmp_path, monkeypatch):
    """An FSQ tokenizer fitted by `enat tokenizer train`'s code, its ids written to a shard
    and read back, a tiny ENAT trained on them, and samples decoded through it."""
    import numpy as np
    from test_evaluation_acceptance import model_config, pretokenize, train_tiny_enat

    from enat.evaluation.config import SampleConfig
    from enat.evaluation.sampling import run_sample
    from enat.models import build_model
    from enat.pipelines.config import DemoDataConfig
    from enat.pipelines.demo_data import make_demo_data
    from enat.pipelines.model_io import load_model, save_model
    from enat.pipelines.shards import read_manifest, read_shard
    from enat.trainer.config import TokenizerTrainConfig
    from enat.trainer.tokenizer_train import train_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_demo_data(DemoDataConfig(out=str(tmp_path / "data"), limit=120))
    tree = str(tmp_path / "data" / "imagenet")
    tokenizer_config = fsq_config((4, 4, 4), channel_mult=[1, 2, 2])
    fitted = train_tokenizer(TokenizerTrainConfig(
        source=f"{tree}/train", root=str(tmp_path), steps=40, warmup_steps=5, eval_every=40, log_every=40,
        checkpoint_every=40, grid_images=0, device="cpu"), tokenizer_config, progress=False)
    assert load_model(fitted.export_url).config == tokenizer_config

    shards = str(tmp_path / "shards")
    ids, labels, codebook = pretokenize(tree, fitted.export_url, shards)
    manifest = read_manifest(shards)
    assert codebook == manifest.codebook_size == 64 and manifest.grid == [8, 8]
    stored = np.stack([s.tokens for s in read_shard(manifest.shard_urls(shards)[0])])
    assert np.array_equal(stored, ids) and ids.max() < 64

    config = model_config(codebook, 8, int(labels.max()) + 1)
    model = build_model(config)
    train_tiny_enat(model, ids, labels, steps=10)
    checkpoint = str(tmp_path / "runs/fsq/checkpoints/step-10/ema")
    save_model(checkpoint, model, config, extra={"step": 10})
    summary = run_sample(SampleConfig(checkpoint=checkpoint, tokenizer=fitted.export_url, num_samples=8,
                                      batch_size=8, out=str(tmp_path / "samples"), device="cpu"),
                         progress=False)
    assert summary["generated"] == 8
    with np.load(tmp_path / "samples" / "samples.npz") as saved:
        assert saved["arr_0"].shape == (8, 32, 32, 3)
