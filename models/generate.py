"""Strategy-driven parallel decoding for ENAT and the NAT baseline.

Generation starts fully masked. At each step the model predicts every masked position,
one id is sampled per position (sampling temperature), and the least confident of the
new samples (log-probability plus Gumbel noise scaled by the mask temperature) are masked
again, so that exactly the strategy's count stays masked. Revealed tokens are never
masked again. Classifier-free guidance runs the conditional and null-conditional rows in
one batch and mixes `cond + s * (cond - uncond)`; for ENAT each row keeps its own reuse
state, so the two passes reuse their own previous features. All randomness comes from
the `generator` passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from enat.models.enat import ENAT
from enat.models.layers import Condition
from enat.models.strategy import Strategy


def null_condition(cond: Condition, null_class: int) -> Condition:
    """The unconditional counterpart of `cond` (null class, or an all-padding context)."""
    if isinstance(cond, tuple):
        context, context_mask = cond
        return torch.zeros_like(context), torch.zeros_like(context_mask)
    return torch.full_like(cond, null_class)


def concat_conditions(first: Condition, second: Condition) -> Condition:
    if isinstance(first, tuple):
        return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    return torch.cat([first, second])


def _gumbel(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    uniform = torch.rand(shape, generator=generator, device=generator.device).clamp_(min=1e-20)
    return (-torch.log(-torch.log(uniform))).to(device)  # torch.rand < 1, so finite


def condition_batch_size(cond: Condition) -> int:
    return cond[0].shape[0] if isinstance(cond, tuple) else cond.shape[0]


@torch.no_grad()
def generate(model: nn.Module, cond: Condition, strategy: Strategy, generator: torch.Generator,
             reuse: bool = True) -> Tensor:
    """Token ids [B, h, w] for the conditions `cond` (class ids [B] or a context tuple).

    `reuse=False` makes ENAT encode every visible token at every step (the ablation).
    """
    config = model.config
    batch, length, mask_id = condition_batch_size(cond), config.seq_len, config.mask_id
    device = next(model.parameters()).device
    guided = strategy.uses_guidance
    model_cond = concat_conditions(cond, null_condition(cond, config.null_class)) if guided else cond
    is_enat = isinstance(model, ENAT)
    ids = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    previous = None
    for step, masked_after in enumerate(strategy.masked_counts(length)):
        # The masked positions of each row (every row masks the same count), ascending: the
        # sampling below runs on these only, and ENAT's head too.
        positions = (ids == mask_id).nonzero()[:, 1].view(batch, -1)
        inputs = torch.cat([ids, ids]) if guided else ids
        if is_enat:
            output = model(inputs, model_cond, previous if reuse else None, masked_logits_only=True)
            logits, previous = output.logits, output.reuse_state()
        else:
            logits = model(inputs, model_cond)
            rows = torch.cat([positions, positions]) if guided else positions
            logits = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))
        logits = logits.float()  # [B (x2 with CFG), M, V]
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = cond_logits + strategy.cfg_scales[step] * (cond_logits - uncond_logits)

        # Gumbel-max sampling == Categorical(logits / temperature).
        temperature = max(strategy.sample_temperatures[step], 1e-4)
        sampled = (logits / temperature + _gumbel(logits.shape, generator, device)).argmax(dim=-1)
        ids = ids.scatter(1, positions, sampled)
        if masked_after == 0:
            break

        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)
        noise = strategy.mask_temperatures[step] * _gumbel(log_probs.shape, generator, device)
        remask = (log_probs + noise).topk(masked_after, dim=-1, largest=False).indices
        ids = ids.scatter(1, positions.gather(1, remask), mask_id)
    height, width = config.grid_shape
    return ids.view(batch, height, width)
