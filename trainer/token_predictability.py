"""How predictable a tokenizer's ids are: what decides whether a generator can learn them.

PSNR and codebook usage say how well ids reconstruct images, not whether a generator can
model them. Two figures do:
- the unigram entropy of the data set's ids (nats): what a model that knows only how often
  each id occurs pays per token. Near ln(codebook size), the ids look uniform;
- the probe loss: the held-out masked-token cross-entropy that one fixed small generator
  (a class-conditional NAT, fixed width, depth, steps, batch and masking) reaches on the
  ids. Its gap below the unigram entropy is what context and class teach; a probe that
  ends at the unigram entropy has learned nothing a generator could use.
Both are in nats per token, so tokenizers with different codebook sizes compare through
the gap and through how the generator they feed samples, not through either alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from enat.models import UViT
from enat.models.config import MaskingConfig, NATConfig
from enat.models.masking import mask_tokens, masked_token_loss


def unigram_entropy(ids: Tensor, codebook_size: int) -> float:
    """-sum p log p (nats) of the id histogram of `ids` (any shape)."""
    counts = torch.bincount(ids.flatten().long(), minlength=codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


@dataclass
class ProbeConfig:
    """The fixed probe generator and its budget (defaults: ~1 min on one CPU core at 8x8)."""

    width: int = 96
    depth: int = 4
    heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class Predictability:
    unigram_entropy: float  # nats, over the training ids
    probe_loss: float  # held-out masked-token loss of the probe generator, nats
    uniform_entropy: float  # ln(codebook size)

    @property
    def gain(self) -> float:
        """Nats per token the probe predicts beyond the id frequencies."""
        return self.unigram_entropy - self.probe_loss


def _held_out_loss(model: UViT, ids: Tensor, labels: Tensor, mask_id: int, seed: int) -> float:
    """Masked-token loss over `ids` at Beta(12, 3) mask ratios fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    masking = MaskingConfig(reuse_prob=0.0)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            batch, cond = ids[start : start + 256], labels[start : start + 256]
            masked, mask = mask_tokens(batch, mask_id, masking, generator, one_ratio_per_batch=False)
            loss = masked_token_loss(model(masked, cond), batch, mask, label_smoothing=0.0)
            total, count = total + float(loss) * int(mask.sum()), count + int(mask.sum())
    model.train()
    return total / count


def measure(train_ids: Tensor, train_labels: Tensor, held_ids: Tensor, held_labels: Tensor,
            codebook_size: int, num_classes: int, probe: ProbeConfig | None = None) -> Predictability:
    """Train the probe on (train_ids [N, h, w], labels [N]) and score it on the held-out ids.
    Pass labels of zeros with num_classes=1 for unlabelled data."""
    probe = probe or ProbeConfig()
    height, width = train_ids.shape[1:]
    config = NATConfig(codebook_size=codebook_size, grid_size=(height, width), width=probe.width,
                       depth=probe.depth, heads=probe.heads, num_classes=num_classes,
                       embed_dropout=0.0, cond_dropout=0.1)
    torch.manual_seed(probe.seed)
    model = UViT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=probe.lr, betas=(0.9, 0.99), weight_decay=0.03)
    generator = torch.Generator().manual_seed(probe.seed)
    flat_train, flat_held = train_ids.flatten(1).long(), held_ids.flatten(1).long()
    masking = MaskingConfig(reuse_prob=0.0)
    for step in range(probe.steps):
        for group in optimizer.param_groups:  # warmup, then cosine: the budget ends converged-ish
            warm = min(1.0, (step + 1) / 50)
            group["lr"] = probe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / probe.steps))
        rows = torch.randint(len(flat_train), (probe.batch_size,), generator=generator)
        batch = flat_train[rows]
        masked, mask = mask_tokens(batch, config.mask_id, masking, generator, one_ratio_per_batch=False)
        loss = masked_token_loss(model(masked, train_labels[rows].long()), batch, mask, label_smoothing=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    held = _held_out_loss(model, flat_held, held_labels.long(), config.mask_id, probe.seed + 1)
    return Predictability(unigram_entropy(train_ids, codebook_size), held, math.log(codebook_size))
