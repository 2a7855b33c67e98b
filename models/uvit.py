"""AutoNAT's NAT backbone: a U-ViT over VQ token ids with long skip connections.

The condition enters as extra tokens prepended to the image tokens and dropped from the
output: one class token, or (text conditioning) a learned null token followed by the
projected context tokens, whose padding is excluded from attention by a key mask. The null
token is always present, so an unconditional row (context mask all False) still has a
well-defined, learned condition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from enat.models.config import NATConfig
from enat.models.layers import (
    MLP,
    Attention,
    Condition,
    MaskedTokenHead,
    TokenEmbedding,
    check_condition,
    drop_condition,
)


class UViTBlock(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip: Linear(cat[x, skip])."""

    def __init__(self, config: NATConfig, long_skip: bool):
        super().__init__()
        width = config.width
        self.skip_proj = nn.Linear(2 * width, width) if long_skip else None
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, config.heads, qkv_bias=config.qkv_bias)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = MLP(width, config.mlp_width, tanh_gelu=False)

    def forward(self, x: Tensor, skip: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        if self.skip_proj is not None:
            x = self.skip_proj(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.attn_norm(x), key_mask=key_mask)
        return x + self.mlp(self.mlp_norm(x))


class UViT(nn.Module):
    """forward(ids [B, L] long, cond) -> logits [B, L, codebook_size]."""

    def __init__(self, config: NATConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.token_embed = TokenEmbedding(config.vocab_size, width, config.seq_len, config.embed_dropout)
        if config.text_conditioned:
            self.context_proj = nn.Linear(config.context_dim, width)
            self.null_context = nn.Parameter(torch.zeros(width))
        else:
            # A one-token embedding (with its own position and LayerNorm), as in AutoNAT.
            self.class_embed = TokenEmbedding(config.num_classes + 1, width, 1, dropout=0.0)
        half = config.depth // 2
        self.in_blocks = nn.ModuleList(UViTBlock(config, long_skip=False) for _ in range(half))
        self.mid_block = UViTBlock(config, long_skip=False)
        self.out_blocks = nn.ModuleList(UViTBlock(config, long_skip=True) for _ in range(half))
        self.final_norm = nn.LayerNorm(width)
        self.head = MaskedTokenHead(width, config.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init_linear)
        if self.config.text_conditioned:
            nn.init.normal_(self.null_context, std=0.02)

    def embed_condition(self, cond: Condition) -> tuple[Tensor, Tensor | None]:
        """Condition tokens [B, C, D] and, for text, their key mask [B, C]."""
        if not self.config.text_conditioned:
            return self.class_embed(cond[:, None]), None
        context, context_mask = cond
        tokens = self.context_proj(context)
        null = self.null_context.expand(tokens.shape[0], 1, -1)
        null_mask = context_mask.new_ones(context_mask.shape[0], 1)
        return torch.cat([null, tokens], dim=1), torch.cat([null_mask, context_mask], dim=1)

    def forward(self, ids: Tensor, cond: Condition) -> Tensor:
        config = self.config
        cond = check_condition(cond, ids.shape[0], config.context_dim, config.context_len)
        if self.training and config.cond_dropout > 0:
            cond = drop_condition(cond, config.cond_dropout, config.null_class)
        cond_tokens, cond_mask = self.embed_condition(cond)
        x = torch.cat([cond_tokens, self.token_embed(ids)], dim=1)
        key_mask = None
        if cond_mask is not None:
            key_mask = torch.cat([cond_mask, cond_mask.new_ones(ids.shape)], dim=1)

        skips = []
        for block in self.in_blocks:
            x = block(x, key_mask=key_mask)
            skips.append(x)
        x = self.mid_block(x, key_mask=key_mask)
        for block in self.out_blocks:
            x = block(x, skips.pop(), key_mask=key_mask)

        x = self.final_norm(x[:, cond_tokens.shape[1] :])
        return self.head(x, self.token_embed.table.weight)
