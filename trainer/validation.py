"""A validation loss that means the same under every training configuration.

The training loss depends on the mask-ratio distribution being trained (Beta(a, b) draws
easier or harder ratios), so it cannot rank runs that differ in exactly that. This loss
fixes everything but the weights: the same token grids, masked at the counts the
default T-step cosine schedule leaves masked at each generation step (what sampling
actually asks of the model), at the same positions (a seeded generator), scored without
label smoothing and without reuse. `enat search-train` ranks its trials by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enat.models.masking import mask_by_count
from enat.models.strategy import Strategy
from enat.pipelines.shards import read_shard
from enat.trainer.config import ValidationConfig
from enat.trainer.data import Batch, Dataset, collate


def validation_batch(dataset: Dataset, config: ValidationConfig) -> Batch:
    """The first `config.samples` grids of the split, in manifest order (no flips). With no
    held-out split they come from the training data: the loss then measures fit, which
    still ranks configurations trained for the same number of steps."""
    urls = dataset.manifest.shard_urls(dataset.url, config.split) if config.split else dataset.shards
    samples = []
    for url in urls:
        samples += read_shard(url)
        if len(samples) >= config.samples:
            break
    return collate(samples[: config.samples])


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batch: Batch, config: ValidationConfig, mask_id: int,
                    device: torch.device) -> float:
    """Mean masked-token cross-entropy over the schedule's masked counts (see the module)."""
    was_training = model.training
    model.eval()
    batch = batch.to(device)
    length = batch.ids.shape[1]
    counts = [length, *Strategy.default(config.generation_steps).masked_counts(length)[:-1]]
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for count in counts:  # the masked count the model sees before each generation step
        mask = mask_by_count(torch.full((len(batch),), count), length, generator).to(device)
        masked = torch.where(mask, torch.full_like(batch.ids, mask_id), batch.ids)
        out = model(masked, batch.cond)
        logits = out.logits if hasattr(out, "logits") else out  # ENAT's output / NAT's logits
        losses.append(F.cross_entropy(logits[mask].float(), batch.ids[mask]).item())
    model.train(was_training)
    return sum(losses) / len(losses)
