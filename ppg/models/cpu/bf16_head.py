"""Sampling with a bf16 copy of the output projection on CPUs with native bf16 matmuls.

At decode time the vocabulary projection of a small model is a large share of the work
(SmolLM2-135M: 56 of ~270 MFLOP per token) and, unlike the nf4 body, runs in fp32. A bf16 copy
of its weight makes it several times faster; logits come back in fp32. Training is unaffected:
``turn_logprobs`` uses the model's own head.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class Bf16Head(torch.nn.Module):
    """``x @ W.T`` with ``W`` held in bf16, returning fp32 logits."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(torch.bfloat16), self.weight, self.bias).float()


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def bf16_output_head(model, enabled: bool = True):
    """Inside the block, ``model`` projects to the vocabulary with a bf16 copy of its head.

    A no-op unless enabled, on CPU, with an fp32 ``nn.Linear`` head and a CPU with native bf16.
    The copy is made once per head and refreshed if the head's weight changes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    usable = (enabled and isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
              and head.weight.dtype == torch.float32 and cpu_has_fast_bf16())
    if not usable:
        yield
        return
    key = (head.weight.data_ptr(), head.weight._version)
    cached = getattr(head, "_ppg_bf16_copy", None)
    if cached is None or cached[0] != key:
        cached = (key, Bf16Head(head.weight, head.bias))
        head._ppg_bf16_copy = cached
    base.set_output_embeddings(cached[1])
    try:
        yield
    finally:
        base.set_output_embeddings(head)
