"""Typed model configurations: the VQGAN tokenizer, the U-ViT NAT baseline and ENAT.

A preset YAML is a flat mapping of one of these dataclasses' fields plus `kind:`
(`vqgan`, `nat` or `enat`); `build_config` turns such a mapping into the dataclass and
rejects unknown keys and bad values with a one-line error naming the key. The defaults are
tiny CPU-sized models; the paper sizes live in configs/models/*.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from enat.models.typed_config import check, convert, to_dict


@dataclass(frozen=True)
class VQGANConfig:
    """MaskGIT's VQGAN (no attention, average-pool down, nearest+conv up).

    The downsampling factor is 2 ** (len(channel_mult) - 1): the released tokenizer
    (channel_mult 1,1,2,2,4) maps 256x256 images to 16x16 ids.
    """

    kind: ClassVar[str] = "vqgan"  # a preset's `kind:` (typed_config's keyed unions)

    codebook_size: int = 256
    code_dim: int = 16  # also the encoder's output channels: there is no quant_conv
    base_channels: int = 32  # every width is a multiple of norm_groups
    channel_mult: tuple[int, ...] = (1, 2, 1)
    num_res_blocks: int = 1
    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 32  # nominal training resolution; any multiple of the factor works
    dropout: float = 0.0
    # Training-time option (ViT-VQGAN): match and look up codes on the unit sphere. The
    # released weights were trained without it, so it must stay off for them.
    l2_normalize_codes: bool = False
    # "vq": a learned codebook (the released weights); "fsq": finite scalar quantization
    # with `fsq_levels` values per latent channel, so code_dim = len(fsq_levels) and
    # codebook_size = their product.
    quantizer: Literal["vq", "fsq"] = "vq"
    fsq_levels: tuple[int, ...] = ()
    # GroupNorm groups; the released weights use 32. At 32 channels, 32 groups normalise
    # every channel alone, which makes absolute colour hard to carry for tiny models.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        check(self.codebook_size >= 2, "codebook_size", ">= 2", self.codebook_size)
        if self.quantizer == "fsq":
            check(len(self.fsq_levels) >= 1 and all(n >= 2 for n in self.fsq_levels), "fsq_levels",
                  "one or more level counts, each >= 2", self.fsq_levels)
            check(self.code_dim == len(self.fsq_levels), "code_dim",
                  f"len(fsq_levels) = {len(self.fsq_levels)} for quantizer fsq", self.code_dim)
            check(self.codebook_size == math.prod(self.fsq_levels), "codebook_size",
                  f"the product of fsq_levels ({math.prod(self.fsq_levels)}) for quantizer fsq",
                  self.codebook_size)
            check(not self.l2_normalize_codes, "l2_normalize_codes", "false for quantizer fsq",
                  self.l2_normalize_codes)
        else:
            check(not self.fsq_levels, "fsq_levels", "empty unless quantizer is fsq", self.fsq_levels)
        check(self.code_dim >= 1, "code_dim", ">= 1", self.code_dim)
        check(len(self.channel_mult) >= 1, "channel_mult", "non-empty", self.channel_mult)
        widths = [self.base_channels * m for m in self.channel_mult]
        check(self.norm_groups >= 1, "norm_groups", ">= 1", self.norm_groups)
        check(
            all(w % self.norm_groups == 0 and w > 0 for w in [self.base_channels, *widths]),
            "base_channels",
            f"a multiple of norm_groups ({self.norm_groups}) with positive channel_mult",
            self.base_channels,
        )
        check(self.num_res_blocks >= 1, "num_res_blocks", ">= 1", self.num_res_blocks)
        check(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        factor = self.downsample_factor
        check(self.image_size % factor == 0, "image_size", f"a multiple of {factor}", self.image_size)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Token grid (h, w) of an `image_size` square image."""
        side = self.image_size // self.downsample_factor
        return side, side


@dataclass(frozen=True)
class TransformerConfig:
    """Fields shared by the two token transformers (NAT and ENAT)."""

    codebook_size: int = 256
    grid_size: int | tuple[int, int] = 8  # token grid, an int for a square (h, w) grid
    width: int = 192
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # real classes; the null ("no label") class is index num_classes
    embed_dropout: float = 0.1  # dropout after the token embedding (train mode only)
    # Probability, in train mode, of replacing a row's condition by the null condition
    # (classifier-free guidance training). Applied here only: the data loader must not
    # drop labels a second time.
    cond_dropout: float = 0.1
    # Text conditioning: 0 means class-conditional; otherwise the condition is a tuple
    # (context [B, Lc, context_dim] float, context_mask [B, Lc] bool) with Lc <= context_len.
    context_dim: int = 0
    context_len: int = 0

    def __post_init__(self) -> None:
        h, w = self.grid_shape
        check(h >= 1 and w >= 1, "grid_size", "positive", self.grid_size)
        check(self.codebook_size >= 2, "codebook_size", ">= 2", self.codebook_size)
        check(self.heads >= 1, "heads", ">= 1", self.heads)
        check(self.width % self.heads == 0, "width", f"divisible by heads={self.heads}", self.width)
        check(self.mlp_ratio > 0, "mlp_ratio", "> 0", self.mlp_ratio)
        check(self.num_classes >= 1, "num_classes", ">= 1", self.num_classes)
        check(0.0 <= self.embed_dropout < 1.0, "embed_dropout", "in [0, 1)", self.embed_dropout)
        check(0.0 <= self.cond_dropout <= 1.0, "cond_dropout", "in [0, 1]", self.cond_dropout)
        check(self.context_dim >= 0, "context_dim", ">= 0", self.context_dim)
        check(
            self.context_dim == 0 or self.context_len >= 1,
            "context_len",
            ">= 1 when context_dim > 0",
            self.context_len,
        )

    @property
    def grid_shape(self) -> tuple[int, int]:
        if isinstance(self.grid_size, int):
            return self.grid_size, self.grid_size
        h, w = self.grid_size
        return h, w

    @property
    def seq_len(self) -> int:
        h, w = self.grid_shape
        return h * w

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        """Codebook ids plus the mask id."""
        return self.codebook_size + 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def text_conditioned(self) -> bool:
        return self.context_dim > 0

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class NATConfig(TransformerConfig):
    """AutoNAT's U-ViT: depth // 2 in-blocks, one mid-block, depth // 2 out-blocks with
    long skips (U-ViT's convention: depth 24 builds 12 + 1 + 12 blocks)."""

    kind: ClassVar[str] = "nat"

    depth: int = 8
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.depth >= 2 and self.depth % 2 == 0, "depth", "even and >= 2", self.depth)


@dataclass(frozen=True)
class ENATConfig(TransformerConfig):
    """ENAT: an encoder over visible tokens and a decoder over mask tokens."""

    kind: ClassVar[str] = "enat"

    encoder_depth: int = 6
    decoder_depth: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.encoder_depth >= 1, "encoder_depth", ">= 1", self.encoder_depth)
        check(self.decoder_depth >= 1, "decoder_depth", ">= 1", self.decoder_depth)


ModelConfig = VQGANConfig | NATConfig | ENATConfig

def build_config(data: Mapping[str, Any]) -> ModelConfig:
    """A preset mapping (fields plus `kind:`) -> its validated config dataclass."""
    return convert(data, ModelConfig)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The preset form of a config (the inverse of `build_config`)."""
    return to_dict(config)


@dataclass
class MaskingConfig:
    beta_a: float = 12.0  # AutoNAT's searched training strategy: ratio ~ Beta(12, 3)
    beta_b: float = 3.0
    label_smoothing: float = 0.1
    reuse_prob: float = 0.5  # ENAT: share of steps trained with a previous-step reuse state

    def __post_init__(self) -> None:
        check(self.beta_a > 0, "beta_a", "> 0", self.beta_a)
        check(self.beta_b > 0, "beta_b", "> 0", self.beta_b)
        check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)", self.label_smoothing)
        check(0 <= self.reuse_prob <= 1, "reuse_prob", "in [0, 1]", self.reuse_prob)
