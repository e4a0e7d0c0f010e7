"""Correct gradients and fast inference for nf4 weights on CPU.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight into a bf16 inference
layout on its first no-grad eval forward and keeps it that way. Every later forward, training
included, then runs ``gemv_4bit``, which has no backward: gradients through the frozen base
weights (and so the LoRA gradients of every layer but the last) come out silently wrong.

``keep_both_nf4_layouts`` stores both layouts per layer and picks one per call: the packed one
when no gradient has to flow through the layer's input, the plain one otherwise. Under a bf16
autocast (``bf16-mixed`` training) the plain layout dequantizes straight to bf16: autocast would
otherwise dequantize to fp32 and copy the result to bf16 in every forward and backward. The
products are bitwise the same (bitsandbytes' bf16 dequantization rounds the fp32 one).
"""
from __future__ import annotations

import copy

import torch


def keep_both_nf4_layouts(model: torch.nn.Module) -> int:
    """Give every CPU ``Linear4bit`` of ``model`` both layouts; returns how many layers.

    Does nothing (returns 0) off CPU and where bitsandbytes would not pack, e.g. CPUs without
    AVX512-BF16.
    """
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return 0
    import bitsandbytes as bnb

    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
    except ImportError:  # a bitsandbytes without the CPU inference layout
        return 0
    count = 0
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit) or layer.weight.device.type != "cpu":
            continue
        if not getattr(layer, "support_avx512bf16_for_cpu", False):
            continue
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("nf4 weights were already packed for inference; set up both layouts right after loading")
        packed = _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(state))
        state_bf16 = copy.copy(state)
        state_bf16.dtype = torch.bfloat16
        layer._ppg_layouts = {"plain": (layer.weight.data, state), "packed": packed,
                              "plain_bf16": (layer.weight.data, state_bf16)}
        layer._ppg_layout = "plain"
        layer.support_avx512bf16_for_cpu = False  # bitsandbytes must never repack in place again
        layer.register_forward_pre_hook(_pick_layout)
        # bitsandbytes unpacks a packed weight in place (mutating its state) when saving
        layer.register_state_dict_pre_hook(_use_plain_layout)
        count += 1
    return count


def _pick_layout(layer, args) -> None:
    if not layer.training and not args[0].requires_grad:
        _use_layout(layer, "packed")
    elif _bf16_autocast() and layer.compute_type_is_set and (
            layer._ppg_layout == "plain_bf16" or layer.compute_dtype == torch.float32):
        _use_layout(layer, "plain_bf16")
    else:
        _use_layout(layer, "plain")


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _use_plain_layout(layer, prefix, keep_vars) -> None:
    _use_layout(layer, "plain")


def _use_layout(layer, name: str) -> None:
    if layer._ppg_layout == name:
        return
    if layer._ppg_layout == "plain_bf16":
        layer.compute_dtype = torch.float32  # it was fp32 before the switch
    layer.weight.data, layer.weight.quant_state = layer._ppg_layouts[name]
    if name == "plain_bf16":
        layer.compute_dtype = torch.bfloat16  # bitsandbytes casts the input as autocast would
    layer._ppg_layout = name
