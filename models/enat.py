"""ENAT: a non-autoregressive transformer that encodes visible tokens and decodes mask tokens.

One forward pass, given token ids where `mask_id` marks the tokens still to predict:

1. Visible tokens go through the encoder alone: they never attend to mask tokens.
2. Mask tokens go through a shallow decoder that attends to [encoded visible; mask]; the
   visible ("memory") tokens get their own key/value projection.
3. Temporal reuse: given the previous step's `ReuseState`, only the tokens revealed since
   that step are encoded. Tokens that were already visible skip the encoder; their
   previous features pass through `reuse_proj` (LayerNorm + MLP, residual) and serve as
   memory for the encoder and as their own output features for this step.

Conditioning is adaLN (DiT-style) from a class embedding. With text conditioning
(`config.context_dim > 0`) the adaLN vector is an MLP of the masked mean of the projected
context tokens instead, and the projected context tokens are also memory in every encoder
and decoder block (through the memory key/value projection, padding excluded by a mask).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enat.models.config import ENATConfig
from enat.models.layers import (
    MLP,
    Attention,
    Condition,
    MaskedTokenHead,
    TokenEmbedding,
    check_condition,
    drop_condition,
)


class ReuseState(NamedTuple):
    """What one step hands to the next: features [B, L, D] and its input's mask [B, L]."""

    feat: Tensor
    masking: Tensor


class ENATOutput(NamedTuple):
    """logits [B, L, codebook_size] for every position (with `masked_logits_only`: [B, M,
    codebook_size] for the M masked positions, in position order), feat [B, L, D] (token
    features before the final norm) and masking [B, L] (True where the input was the mask id).
    Having `feat` and `masking`, it can be passed as the next step's `prev` as it is."""

    logits: Tensor
    feat: Tensor
    masking: Tensor

    def reuse_state(self) -> ReuseState:
        return ReuseState(self.feat, self.masking)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class ENATBlock(nn.Module):
    """adaLN-Zero transformer block whose attention also reads memory tokens.

    Memory tokens are normalised and modulated with their own shift/scale; the adaLN
    output is split, in this order, into: shift, scale (own tokens), shift, scale
    (memory), attention gate, MLP shift, MLP scale, MLP gate.
    """

    def __init__(self, config: ENATConfig):
        super().__init__()
        width = config.width
        # One parameter-free norm serves the own tokens, the memory and the MLP input.
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, config.heads, qkv_bias=True, memory_kv=True)
        self.mlp = MLP(width, config.mlp_width, tanh_gelu=True)
        self.modulation = nn.Linear(width, 8 * width)

    def forward(
        self, x: Tensor, c: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None
    ) -> Tensor:
        (shift, scale, memory_shift, memory_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate) = (
            self.modulation(F.silu(c)).chunk(8, dim=-1)
        )
        key_mask = None
        if memory is not None:
            memory = modulate(self.norm(memory), memory_shift, memory_scale)
            if memory_mask is not None:
                key_mask = torch.cat([memory_mask, memory_mask.new_ones(x.shape[:2])], dim=1)
        attended = self.attn(modulate(self.norm(x), shift, scale), memory, key_mask)
        x = x + attn_gate[:, None] * attended
        return x + mlp_gate[:, None] * self.mlp(modulate(self.norm(x), mlp_shift, mlp_scale))


class ReuseProjection(nn.Module):
    """Adapts the previous step's features before they are reused: x + MLP(LayerNorm(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, hidden, tanh_gelu=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, D] rows at `index` [B, N] (per batch row) -> [B, N, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _check_same_count(masking: Tensor, name: str) -> None:
    counts = masking.sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError(
            f"every row of {name} must mask the same number of tokens (visible and masked "
            f"tokens are packed densely); got counts {counts.tolist()}"
        )


class ENAT(nn.Module):
    """forward(ids [B, L] long, cond, prev=None) -> ENATOutput."""

    def __init__(self, config: ENATConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.token_embed = TokenEmbedding(config.vocab_size, width, config.seq_len, config.embed_dropout)
        if config.text_conditioned:
            self.context_proj = nn.Linear(config.context_dim, width)
            self.context_pool = MLP(width, width, tanh_gelu=True)
        else:
            self.class_embed = nn.Embedding(config.num_classes + 1, width)
        self.reuse_proj = ReuseProjection(width, config.mlp_width)
        self.encoder_blocks = nn.ModuleList(ENATBlock(config) for _ in range(config.encoder_depth))
        self.decoder_blocks = nn.ModuleList(ENATBlock(config) for _ in range(config.decoder_depth))
        self.final_norm = nn.LayerNorm(width)
        self.head = MaskedTokenHead(width, config.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init_linear)
        if not self.config.text_conditioned:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)

    def embed_condition(self, cond: Condition) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The adaLN vector [B, D] and, for text, the context memory (tokens, mask)."""
        if not self.config.text_conditioned:
            return self.class_embed(cond), None
        context, context_mask = cond
        tokens = self.context_proj(context)
        weights = context_mask[..., None].to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return self.context_pool(pooled), (tokens, context_mask)

    @staticmethod
    def _with_context(
        tokens: Tensor | None, context: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Memory = [context tokens; tokens] and its key mask (None without text)."""
        if context is None:
            return tokens, None
        context_tokens, context_mask = context
        if tokens is None:
            return context_tokens, context_mask
        memory = torch.cat([context_tokens, tokens], dim=1)
        return memory, torch.cat([context_mask, context_mask.new_ones(tokens.shape[:2])], dim=1)

    def forward(
        self, ids: Tensor, cond: Condition, prev: ReuseState | ENATOutput | None = None,
        masked_logits_only: bool = False,
    ) -> ENATOutput:
        """`masked_logits_only`: the head runs on the masked positions only (what a sampler
        needs: a visible token's logits are never used there)."""
        config = self.config
        masking = ids == config.mask_id
        _check_same_count(masking, "ids")
        reuse = None
        if prev is not None:
            if prev.masking.shape != masking.shape:
                raise ValueError(f"prev.masking is {tuple(prev.masking.shape)}, ids are {tuple(ids.shape)}")
            if (masking & ~prev.masking).any():
                raise ValueError("the masked tokens must be a subset of the previous step's masked tokens")
            _check_same_count(prev.masking, "prev.masking")
            reuse = ~prev.masking  # the rest of the visible tokens was revealed since then

        cond = check_condition(cond, ids.shape[0], config.context_dim, config.context_len)
        if self.training and config.cond_dropout > 0:
            cond = drop_condition(cond, config.cond_dropout, config.null_class)
        c, context = self.embed_condition(cond)
        x = self.token_embed(ids)

        # Positions sorted into groups, each in position order: reused (visible at the previous
        # step), encoded (visible now, not reused), decoded (masked). One gather packs the
        # groups and one gather restores position order at the end: four bool-mask index and
        # scatter ops in the forward (and their backwards) cost more on CPUs.
        group = torch.where(masking, 2, 1)
        if reuse is not None:
            group = torch.where(reuse, 0, group)
        order = group.argsort(dim=1, stable=True)
        num_masked = int(masking[0].sum())
        num_reused = 0 if reuse is None else int(reuse[0].sum())
        num_encoded = ids.shape[1] - num_masked - num_reused
        encoded, decoded = _gather_rows(x, order[:, num_reused:]).split([num_encoded, num_masked], dim=1)
        reused = None
        if reuse is not None:  # even on no rows: its parameters then get zero gradients, not None,
            # which optimizers and ZeRO stages would treat differently
            reused = self.reuse_proj(_gather_rows(prev.feat.detach(), order[:, :num_reused])).to(x.dtype)
        if num_encoded > 0:
            memory, memory_mask = self._with_context(reused, context)
            for block in self.encoder_blocks:
                encoded = block(encoded, c, memory, memory_mask)
        # The decoder's memory is every visible token, reused ones first (attention does not
        # depend on the order of its keys); parts without rows stay, as above.
        visible = [part.to(x.dtype) for part in (reused, encoded) if part is not None]
        if num_masked > 0:
            memory = torch.cat(visible, dim=1) if len(visible) > 1 else visible[0]
            memory, memory_mask = self._with_context(memory, context)
            for block in self.decoder_blocks:
                decoded = block(decoded, c, memory, memory_mask)
        feat = _gather_rows(torch.cat([*visible, decoded.to(x.dtype)], dim=1), order.argsort(dim=1))

        head_input = decoded.to(x.dtype) if masked_logits_only else feat
        logits = self.head(self.final_norm(head_input), self.token_embed.table.weight)
        return ENATOutput(logits, feat, masking)
