"""Grouped-query attention on CPU without copying the KV cache to every query head.

transformers' ``sdpa`` attention lets ``scaled_dot_product_attention`` share key/value heads
(``enable_gqa``) only when there is no attention mask; with a mask (every left-padded batch, so
every batched rollout) it first repeats each key/value head once per query head. For
SmolLM2-135M (9 query heads on 3 key/value heads) that copies the whole KV cache of every layer
three times over at every decode step. On CPU, torch's SDPA takes the mask and ``enable_gqa``
together and gives bitwise the same output, so ``cpu_gqa_sdpa`` does that where no gradient is
taken (rollouts, scoring) and hands every other case back to transformers: the backward pass of
shared heads adds up their gradients in another order (last-bit differences), and training keeps
transformers' numerics exactly.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ppg_cpu_gqa_sdpa"


def cpu_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, except masked grouped-query attention on CPU without
    gradients."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("cache") is None
    inference = not torch.is_grad_enabled()
    if not (inference and grouped and plain and attention_mask is not None and query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def use_cpu_gqa_attention(model) -> bool:
    """Switch a CPU model that uses ``sdpa`` attention to ``cpu_gqa_sdpa``; True if switched."""
    config = getattr(model, "config", None)
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if not on_cpu or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, cpu_gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers makes for sdpa
    model.set_attn_implementation(NAME)
    return True
