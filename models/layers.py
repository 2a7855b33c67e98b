"""Building blocks shared by the NAT (U-ViT) and ENAT token transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# A condition is either class ids [B] (the null class is num_classes) or, for a
# text-conditioned model, (context [B, Lc, context_dim] float, context_mask [B, Lc] bool)
# where True marks a real token; the null condition is a mask that is all False.
Condition = Tensor | tuple[Tensor, Tensor]


class MLP(nn.Module):
    """Linear -> GELU -> Linear. The reference models use the tanh GELU in the ENAT blocks and
    the exact one in U-ViT, so the approximation is a constructor argument."""

    def __init__(self, width: int, hidden: int, tanh_gelu: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if tanh_gelu else "none")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention over the block's own tokens plus optional "memory" tokens.

    Queries come from the own tokens only. Memory tokens (ENAT's reused features, encoded
    visible tokens and text context) are only attended to, and get their own key/value
    projection `memory_kv`, because they come from a different distribution than the own
    tokens (the reference's multiway `kv.A`; `kv` is its `kv.B`).
    """

    def __init__(self, width: int, heads: int, qkv_bias: bool, memory_kv: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=qkv_bias)
        self.kv = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.memory_kv = nn.Linear(width, 2 * width, bias=qkv_bias) if memory_kv else None
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, memory: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x [B, N, D]; memory [B, M, D]; key_mask [B, M + N] bool (True = attend), or None."""
        kv = self.kv(x)
        if memory is not None:
            kv = torch.cat([self.memory_kv(memory), kv], dim=1)
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=self.heads)
        if key_mask is not None:
            key_mask = key_mask[:, None, None, :]
        out = attend(q, k, v, key_mask)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, N, d]; key_mask [B, 1, 1, M] bool (True = attend).

    On GPUs, torch's SDPA picks a fused (flash or memory-efficient) kernel. On CPUs it has
    none that pays off at these shapes: under bf16 autocast its kernel made a tiny-NAT
    training step 2.3x slower than plain matmul + softmax, which is never slower in fp32
    (bench/attention.py measures both)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


class TokenEmbedding(nn.Module):
    """Id embedding + learned absolute position embedding, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, width: int, max_len: int, dropout: float):
        super().__init__()
        self.table = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(max_len, width))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.table(ids) + self.positions[: ids.shape[1]]
        return self.dropout(self.norm(x))


class MaskedTokenHead(nn.Module):
    """BERT-style prediction head whose output matrix is the token embedding table.

    The table is read detached, as in MAGE and both reference models: the head's loss does
    not train the embedding through this path. The mask id's column is dropped.
    """

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, token_table: Tensor) -> Tensor:
        hidden = self.norm(self.act(self.dense(x)))
        logits = hidden @ token_table.detach().t() + self.bias
        return logits[..., :-1]


def drop_condition(cond: Condition, prob: float, null_class: int) -> Condition:
    """Classifier-free guidance training: replace each row's condition by the null one
    with probability `prob`."""
    if isinstance(cond, tuple):
        context, context_mask = cond
        keep = torch.rand(context_mask.shape[0], device=context_mask.device) >= prob
        return context, context_mask & keep[:, None]
    drop = torch.rand(cond.shape[0], device=cond.device) < prob
    return torch.where(drop, torch.full_like(cond, null_class), cond)


def check_condition(cond: Condition, batch: int, context_dim: int, context_len: int) -> Condition:
    """Validate a condition against the model's conditioning mode; class ids come back as [B]."""
    if context_dim == 0:
        if not isinstance(cond, Tensor) or cond.dtype != torch.long or cond.numel() != batch:
            raise ValueError(f"expected class ids as a LongTensor of {batch} elements, got {_describe(cond)}")
        return cond.reshape(batch)
    if not isinstance(cond, tuple) or len(cond) != 2:
        raise ValueError(f"expected a (context, context_mask) tuple, got {_describe(cond)}")
    context, context_mask = cond
    if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise ValueError(f"context must be [{batch}, Lc, {context_dim}], got {tuple(context.shape)}")
    if context.shape[1] > context_len:
        raise ValueError(f"context has {context.shape[1]} tokens, more than context_len={context_len}")
    if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
        raise ValueError(
            f"context_mask must be bool {tuple(context.shape[:2])}, got {_describe(context_mask)}"
        )
    return cond


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__
