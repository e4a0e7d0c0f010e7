"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a peft policy.

Each decoder layer (``model._no_split_modules``) is one shard group: its frozen base weights
and its LoRA adapters are split over the data-parallel ranks and gathered layer by layer in
every forward. Parameters outside the layers (embeddings, final norm, output head: frozen and
small next to the layers) stay whole on every rank, so code that calls the decoder or the head
directly (``token_logprobs``) needs no root wrapper.

Forward passes of a sharded layer are collective: every rank must make the same calls. Sampling
makes a different number of calls per rank (conversations end at different times), so
``gathered`` holds every layer's full weights while sampling: forwards are then local.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` (a peft or plain HF model), by ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"cannot shard {type(base).__name__}: no decoder layer class "
                         "(transformers' _no_split_modules) found")
    return layers


def check_shardable(spec) -> None:
    """One-line ValueError if ``spec``'s model cannot be sharded (checked before loading it)."""
    if spec.quantization != "none":
        raise ValueError(f"model.model.quantization={spec.quantization} cannot be sharded with FSDP: "
                         "bitsandbytes weights do not support FSDP2 (fully_shard); use "
                         "quantization none with FSDP, or DDP for quantized models")


def shard_policy(policy: torch.nn.Module, mesh) -> int:
    """Shard every decoder layer of ``policy`` over ``mesh``; returns how many layers.

    Raises a one-line ValueError if a trainable parameter lies outside the layers (its
    gradient would not be synchronized).
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(policy)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in policy.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ValueError(f"FSDP shards the decoder layers only; trainable parameter {outside[0]!r} "
                         "lies outside them (restrict lora.target_modules to the layers)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    policy._ppg_shard_groups = layers
    # Runs before FSDP's own pre-forward hook: an eval-mode no-grad forward (sampling, judging
    # with the policy) first gathers every layer, so the forwards that follow are local.
    layers[0].register_forward_pre_hook(lambda module, args: _gather_for_sampling(policy, module),
                                        prepend=True)
    return len(layers)


def _gather_for_sampling(policy, layer) -> None:
    if not layer.training and not torch.is_grad_enabled():
        gather(policy)


def sharded_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The shard groups of ``model`` (cached: the pre-forward hook asks on every forward)."""
    groups = getattr(model, "_ppg_shard_groups", None)
    if groups is None:
        from torch.distributed.fsdp import FSDPModule

        groups = [module for module in model.modules() if isinstance(module, FSDPModule)]
    return groups


def gather(model: torch.nn.Module) -> None:
    """All-gather every shard group's full weights and keep them until ``release`` (collective
    on first call; a no-op for groups already gathered)."""
    for module in sharded_modules(model):
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
        module.set_reshard_after_backward(False, recurse=False)


def release(model: torch.nn.Module) -> None:
    """Drop gathered full weights: back to one shard per rank (local, no communication)."""
    for module in sharded_modules(model):
        module.reshard()
        module.set_reshard_after_forward(True, recurse=False)
        module.set_reshard_after_backward(True, recurse=False)


@contextmanager
def gathered(model: torch.nn.Module):
    """Inside the block every forward of ``model`` is local (full weights on every rank)."""
    gather(model)
    try:
        yield
    finally:
        release(model)


@contextmanager
def no_gradient_sync(model: torch.nn.Module, enabled: bool = True):
    """Backward passes inside the block accumulate unreduced gradients (FSDP2 groups only)."""
    modules = sharded_modules(model) if enabled else []
    for module in modules:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)


def full_tensors(state: dict) -> dict:
    """``state`` with every sharded tensor (DTensor) gathered whole (collective if any is)."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor() if isinstance(value, DTensor) else value
            for key, value in state.items()}
