"""How good a VQ tokenizer is: PSNR, codebook usage and a reconstruction grid.

Separate from the training loop (trainer/tokenizer_train.py) because these figures are
also what anyone judging a trained tokenizer computes: the loop reports them on its
held-out images, and the grid is the picture a person looks at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from enat.models import VQGAN


@dataclass
class Evaluation:
    psnr: float  # mean per-image PSNR (dB) of clamped reconstructions
    codebook_usage: float  # share of codes used at least once
    perplexity: float  # exp(entropy) of the code histogram
    reconstructions: Tensor  # float [N, 3, H, W] in [0, 1]


def psnr(reference: Tensor, reconstruction: Tensor, max_value: float = 1.0) -> Tensor:
    """Per-image PSNR in dB of [N, ...] tensors; identical images give 100 dB, not inf."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(max_value**2 / mse.clamp_min(max_value**2 * 1e-10))


def codebook_stats(ids: Tensor, codebook_size: int) -> tuple[float, float]:
    """(share of the codebook used, perplexity = exp(entropy) of the code histogram)."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    return (counts > 0).double().mean().item(), math.exp(-(probs * probs.log()).sum().item())


@torch.no_grad()
def evaluate(model: VQGAN, images: Tensor, device: torch.device, batch_size: int = 256) -> Evaluation:
    """Reconstruct uint8 images [N, 3, H, W]; PSNR and code statistics over all of them."""
    was_training = model.training
    model.eval()
    all_ids, reconstructions = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255
        ids = model.encode(batch)
        all_ids.append(ids.cpu())
        reconstructions.append(model.decode(ids).float().clamp(0, 1).cpu())
    model.train(was_training)
    reconstruction = torch.cat(reconstructions)
    usage, perplexity = codebook_stats(torch.cat(all_ids), model.config.codebook_size)
    value = psnr(images.float() / 255, reconstruction).mean().item()
    return Evaluation(value, usage, perplexity, reconstruction)


def reconstruction_grid(originals: Tensor, reconstructions: Tensor, columns: int = 8,
                        scale: int = 2) -> Image.Image:
    """Rows of originals, each above the row of their reconstructions (float [0, 1] NCHW)."""
    count, _, height, width = originals.shape
    columns = min(columns, count)
    canvas = torch.ones(3, 2 * math.ceil(count / columns) * height, columns * width)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = 2 * row * height, column * width
        canvas[:, top : top + height, left : left + width] = originals[index]
        canvas[:, top + height : top + 2 * height, left : left + width] = reconstructions[index]
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
