"""Keeping resident memory down: drop file mappings after loading, hand freed heap back."""
from __future__ import annotations

import ctypes
import gc

import torch


def trim_heap() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def detach_from_checkpoint_file(model: torch.nn.Module) -> None:
    """Copy parameters and buffers still backed by the memory-mapped checkpoint into RAM.

    transformers leaves unquantized tensors (embeddings, norms) as views of the safetensors
    mmap, which keeps the whole file's pages resident; quantized weights are copies already.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for module in model.modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for _, tensor in tensors:
                if tensor is not None and not isinstance(tensor, quantized):
                    tensor.data = tensor.data.clone()
    trim_heap()
