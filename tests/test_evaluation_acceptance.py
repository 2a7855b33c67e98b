"""Acceptance on the demo data: a trained tiny ENAT's samples get a clearly lower domain FID
than its untrained initialisation, with the real-vs-real floor measured beside it.

Self-contained: a tiny tokenizer is fitted for a few steps with trainer/tokenizer_train.py
(or ENAT_ACCEPTANCE_TOKENIZER names an exported one; a random-init tokenizer decodes every
id to a near-constant image, which leaves nothing to measure), the demo emoji are
pretokenized with it into the shared shard format, a tiny ENAT trains for a few hundred
steps with a plain torch loop (the shared masking and loss functions), is exported like a
checkpoint's EMA, and both exports are evaluated by evaluate_checkpoint against the token
shards decoded through the tokenizer, with a domain extractor trained on the same emoji.
Run with `-s` to see the figures.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from enat.evaluation.config import FeatureTrainConfig
from enat.evaluation.evaluate import evaluate_checkpoint
from enat.evaluation.features import train_domain_extractor
from enat.evaluation.image_sets import ImageSet, read_all
from enat.evaluation.metrics import load_extractor, real_floor
from enat.models import ENATConfig, VQGANConfig, build_model
from enat.models.config import MaskingConfig
from enat.models.masking import mask_tokens, masked_token_loss, previous_step_input
from enat.models.strategy import Strategy
from enat.pipelines import storage
from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import make_demo_data
from enat.pipelines.model_io import load_model, save_model
from enat.pipelines.pretokenize import encode_images
from enat.pipelines.shards import Manifest, TokenSample, shard_name, write_manifest, write_shard

pytestmark = [pytest.mark.slow]

IMAGES = 400  # the first 400 demo emoji: two classes
TRAIN_STEPS = 300
TOKENIZER_STEPS = 150
SAMPLES = 200
TOKENIZER = VQGANConfig(codebook_size=64, code_dim=8, base_channels=32, channel_mult=(1, 1, 1), image_size=32,
                        l2_normalize_codes=True)


def model_config(codebook_size: int, grid: int, classes: int) -> ENATConfig:
    return ENATConfig(codebook_size=codebook_size, grid_size=grid, width=64, heads=2, encoder_depth=2,
                      decoder_depth=1, num_classes=classes, embed_dropout=0.0, cond_dropout=0.1)


def pretokenize(tree: str, tokenizer_url: str, out: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids and labels of every image, written as one shard + manifest at `out`."""
    tokenizer = load_model(tokenizer_url)
    images, labels = read_all(ImageSet(f"imagenet:{tree}", tokenizer.config.image_size))
    ids = encode_images(tokenizer.model, images, batch_size=64)
    samples = [TokenSample(f"{i:09d}", ids[i], label=int(labels[i])) for i in range(len(ids))]
    entry = write_shard(storage.join(out, "train", shard_name(0)), samples)
    write_manifest(out, Manifest(tokenizer.model_id, tokenizer.sha256, tokenizer.config.image_size,
                                 list(ids.shape[1:]), tokenizer.config.codebook_size,
                                 classes=sorted(set(map(str, labels))), splits={"train": [entry]},
                                 tokenizer_url=tokenizer_url))
    return ids.astype(np.int64), labels, tokenizer.config.codebook_size


def train_tiny_enat(model: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, steps: int) -> None:
    """ENAT training in plain torch: one Beta(12, 3) mask ratio per batch, the reuse branch
    half of the time (the model itself, without gradients, encodes the previous step)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.03)
    masking, mask_id = MaskingConfig(), model.config.mask_id
    tokens, classes = torch.from_numpy(ids).flatten(1), torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(tokens), (32,), generator=generator)
        batch, cond = tokens[index], classes[index]
        masked, mask = mask_tokens(batch, mask_id, masking, generator, one_ratio_per_batch=True)
        prev = None
        if float(torch.rand(1, generator=generator)) < masking.reuse_prob:
            with torch.no_grad():
                prev = model(previous_step_input(masked, mask, mask_id, generator), cond)
        loss = masked_token_loss(model(masked, cond, prev).logits, batch, mask, masking.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def fit_tokenizer(tree: str, root: str) -> str:
    """A quickly fitted tiny tokenizer (blurry, but its images carry the emoji's colours and
    layout); returns its export URL."""
    from enat.trainer.config import TokenizerTrainConfig
    from enat.trainer.tokenizer_train import train_tokenizer

    config = TokenizerTrainConfig(source=f"{tree}/train", root=root, steps=TOKENIZER_STEPS, batch_size=16,
                                  warmup_steps=10, eval_every=TOKENIZER_STEPS, log_every=TOKENIZER_STEPS,
                                  checkpoint_every=TOKENIZER_STEPS, grid_images=0, device="cpu")
    return train_tokenizer(config, TOKENIZER, progress=False).export_url


def test_trained_tiny_enat_beats_its_initialisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store lands in the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_demo_data(DemoDataConfig(out=str(tmp_path / "data"), limit=IMAGES))
    tree = str(tmp_path / "data" / "imagenet")
    tokenizer_url = os.environ.get("ENAT_ACCEPTANCE_TOKENIZER") or fit_tokenizer(tree, str(tmp_path))
    shards = str(tmp_path / "shards")
    ids, labels, codebook = pretokenize(tree, tokenizer_url, shards)
    extractor_url = str(tmp_path / "extractor")
    train_domain_extractor(FeatureTrainConfig(data=tree, out=extractor_url, epochs=4), progress=False)

    config = model_config(codebook, ids.shape[1], int(labels.max()) + 1)
    torch.manual_seed(1)
    model = build_model(config)
    untrained = str(tmp_path / "runs/tiny/checkpoints/step-0/ema")
    save_model(untrained, model, config, extra={"step": 0})
    train_tiny_enat(model, ids, labels, TRAIN_STEPS)
    trained = str(tmp_path / f"runs/tiny/checkpoints/step-{TRAIN_STEPS}/ema")
    save_model(trained, model, config, extra={"step": TRAIN_STEPS})

    strategy = Strategy.default(8, cfg_scale=1.0)
    results = {name: evaluate_checkpoint(url, tokenizer_url, strategy, SAMPLES, seed=0, reference=shards,
                                         extractor=extractor_url, batch_size=50, progress=False,
                                         out=str(tmp_path / "eval" / name))
               for name, url in (("untrained", untrained), ("trained", trained))}
    reference, _ = read_all(ImageSet(shards, 32))
    floor = real_floor(reference, load_extractor(extractor_url, "cpu"), seed=0)
    for name, result in {**results, "real-vs-real floor": floor}.items():
        print(f"{name}: FID {result['fid']:.3f}  KID {result.get('kid', float('nan')):.4f}  "
              f"IS {result['is']:.3f}  [{result['extractor_id']}, {result['num_samples']} samples]")
    assert results["trained"]["extractor_id"] == results["untrained"]["extractor_id"] == floor["extractor_id"]
    assert results["trained"]["fid"] < 0.5 * results["untrained"]["fid"]
    assert floor["fid"] < results["trained"]["fid"]
