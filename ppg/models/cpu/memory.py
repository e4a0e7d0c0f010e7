"""Keeping resident memory down: drop file mappings after loading, hand freed heap back."""
from __future__ import annotations

import ctypes
import gc

import torch


def trim_heap(collect: bool = True) -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), after a garbage
    collection unless ``collect`` is False (a full collection costs about 0.3 s in a process
    holding a model, and frees nothing where no tensor sits in a reference cycle)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def detach_from_checkpoint_file(model: torch.nn.Module) -> int:
    """Copy CPU parameters and buffers still backed by the memory-mapped checkpoint into RAM;
    returns how many tensors were copied. Tensors on other devices are left alone (loading
    already copied them off the file).

    transformers leaves unquantized tensors (embeddings, norms) as views of the safetensors
    mmap, which keeps the whole file's pages resident; quantized weights are copies already
    (recognised by their bitsandbytes class, without importing bitsandbytes).
    """
    copied = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # tied weights once
            if tensor.device.type != "cpu" or type(tensor).__module__.startswith("bitsandbytes"):
                continue
            tensor.data = tensor.data.clone()
            copied += 1
    if copied:
        trim_heap()
    return copied
