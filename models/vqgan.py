"""MaskGIT's VQGAN tokenizer (the PyTorch port of its JAX VQGAN, `vq-f16-jax`).

Differences from the original taming VQGAN, all needed for the released weights:
no attention blocks, no quant_conv / post_quant_conv, 2x2 average-pool downsampling,
nearest x2 + 3x3 conv upsampling, `num_res_blocks` blocks per decoder level, and a residual
block whose channel-changing shortcut is applied to the residual branch's output (as in
MaskGIT's JAX ResBlock), not to the block input.

Two quantizers sit between encoder and decoder: the released weights use `VectorQuantizer`
(a learned codebook); `FSQuantizer` (finite scalar quantization) is the option for
tokenizers trained here for generation (see configs/models/tiny-tokenizer.yaml for why).

Images are float RGB in [0, 1], NCHW; token ids are [B, h, w] long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from enat.models.config import VQGANConfig


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3x3(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        changes_width = in_channels != out_channels
        self.shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if changes_width else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut is not None:
            # MaskGIT's quirk: the block input is discarded, the shortcut reads h.
            return self.shortcut(h) + h
        return x + h


def _in_out(widths: list[int], first_in: int) -> list[tuple[int, int]]:
    """(in, out) channels of consecutive levels whose output widths are `widths`."""
    return list(zip([first_in, *widths[:-1]], widths, strict=True))


def _level(in_channels: int, out_channels: int, config: VQGANConfig) -> nn.Sequential:
    blocks = [ResBlock(in_channels, out_channels, config.dropout, config.norm_groups)]
    blocks += [ResBlock(out_channels, out_channels, config.dropout, config.norm_groups)
               for _ in range(config.num_res_blocks - 1)]
    return nn.Sequential(*blocks)


def _mid(channels: int, config: VQGANConfig) -> nn.Sequential:
    blocks = (ResBlock(channels, channels, config.dropout, config.norm_groups) for _ in range(2))
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        top = widths[-1]
        self.stem = _conv3x3(config.in_channels, config.base_channels)
        self.levels = nn.ModuleList(_level(i, o, config) for i, o in _in_out(widths, config.base_channels))
        self.downsample = nn.AvgPool2d(2)
        self.mid = _mid(top, config)
        self.out_norm = _group_norm(top, config.norm_groups)
        self.out_conv = nn.Conv2d(top, config.code_dim, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.stem(images)
        for index, level in enumerate(self.levels):
            if index > 0:
                h = self.downsample(h)
            h = level(h)
        h = self.mid(h)
        return self.out_conv(F.silu(self.out_norm(h)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Mirror of the encoder; `levels` are in processing order, coarsest first."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in reversed(config.channel_mult)]
        top = widths[0]
        self.stem = _conv3x3(config.code_dim, top, bias=True)
        self.mid = _mid(top, config)
        self.levels = nn.ModuleList(_level(i, o, config) for i, o in _in_out(widths, top))
        self.upsamplers = nn.ModuleList(Upsample(w) for w in widths[:-1])
        self.out_norm = _group_norm(widths[-1], config.norm_groups)
        self.out_conv = _conv3x3(widths[-1], config.out_channels, bias=True)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.stem(z))
        for index, level in enumerate(self.levels):
            h = level(h)
            if index < len(self.upsamplers):
                h = self.upsamplers[index](h)
        return self.out_conv(F.silu(self.out_norm(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.l2_normalize = config.l2_normalize_codes
        self.codebook = nn.Embedding(config.codebook_size, config.code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)

    def codes(self) -> Tensor:
        weight = self.codebook.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def lookup(self, ids: Tensor) -> Tensor:
        """ids [B, h, w] -> code vectors [B, code_dim, h, w]."""
        return rearrange(self.codes()[ids], "b h w c -> b c h w")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z [B, C, h, w] -> (z_q straight-through, ids [B, h, w], codebook_loss, commitment_loss).

        codebook_loss = mse(z_q, sg(z)) trains the codes, commitment_loss = mse(z, sg(z_q))
        the encoder; the caller weights them (the reference's legacy sum is
        commitment_loss + 0.25 * codebook_loss).
        """
        batch, _, height, width = z.shape
        # Distances in float32 even under autocast: the argmin decides the token ids.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z, "b c h w -> (b h w) c").float()
            if self.l2_normalize:
                flat = F.normalize(flat, dim=-1)
            codes = self.codes().float()
            distances = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
            ids = distances.argmin(dim=1)
            quantized = codes[ids]
            codebook_loss = F.mse_loss(quantized, flat.detach())
            commitment_loss = F.mse_loss(flat, quantized.detach())
            quantized = flat + (quantized - flat).detach()
        quantized = rearrange(quantized, "(b h w) c -> b c h w", b=batch, h=height, w=width)
        return quantized.to(z.dtype), ids.view(batch, height, width), codebook_loss, commitment_loss


class FSQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al., 2023): each of the `len(levels)` latent
    channels is squashed into a bounded range and rounded to one of `levels[i]` values; the
    id is the mixed-radix number of those values. There is no codebook to learn, collapse
    or restart, and equal latents always give one id (a flat white patch is one token).
    Codes are the rounded values scaled into [-1, 1]."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        levels = torch.tensor(config.fsq_levels, dtype=torch.long)
        # Non-persistent: derived from the config, so state dicts hold no FSQ entries.
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("radix", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0),
                             persistent=False)

    def _bound(self, z: Tensor) -> Tensor:
        """Channel-wise squash so that rounding yields exactly `levels[i]` integer values,
        centred on 0 (even level counts take the half-integer grid, shifted by 0.5)."""
        levels = self.levels.to(z.dtype).view(1, -1, 1, 1)
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels.view(1, -1, 1, 1) % 2 == 0, 0.5, 0.0).to(z.dtype)
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def _scale(self) -> Tensor:
        return (self.levels // 2).view(1, -1, 1, 1).float()

    def lookup(self, ids: Tensor) -> Tensor:
        """ids [B, h, w] -> code vectors [B, len(levels), h, w] in [-1, 1]."""
        digits = (ids.unsqueeze(1) // self.radix.view(1, -1, 1, 1)) % self.levels.view(1, -1, 1, 1)
        return (digits - self.levels.view(1, -1, 1, 1) // 2).float() / self._scale()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Same contract as VectorQuantizer.forward; both auxiliary losses are zero."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self._bound(z.float())
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
            digits = rounded.detach().long() + self.levels.view(1, -1, 1, 1) // 2
            ids = (digits * self.radix.view(1, -1, 1, 1)).sum(dim=1)
            quantized = rounded / self._scale()
        zero = z.new_zeros((), dtype=torch.float32)
        return quantized.to(z.dtype), ids, zero, zero


class VQGAN(nn.Module):
    """encode(images [B, 3, H, W] in [0, 1]) -> ids [B, h, w]; decode(ids) -> images (unclamped)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = FSQuantizer(config) if config.quantizer == "fsq" else VectorQuantizer(config)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.quantizer(z)

    def encode(self, images: Tensor) -> Tensor:
        return self.quantizer(self.encoder(images))[1]

    def decode(self, ids: Tensor) -> Tensor:
        return self.decoder(self.quantizer.lookup(ids))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction, ids, codebook_loss, commitment_loss), for training."""
        quantized, ids, codebook_loss, commitment_loss = self.quantizer(self.encoder(images))
        return self.decoder(quantized), ids, codebook_loss, commitment_loss
