"""A KV cache that appends in place: a decode step writes one position instead of copying all.

transformers' ``DynamicLayer`` concatenates every new key/value onto the cached ones, so each
decode step copies the whole cache of every layer; on a CPU rollout of 64 conversations that
copying was about a tenth of the sampling time. ``GrowingKVLayer`` keeps spare room after the
cached positions and writes new ones into it; the keys and values it returns are views of the
filled part, so attention sees the same numbers.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingKVLayer(DynamicLayer):
    """``DynamicLayer`` with ``spare`` free positions kept after the cached ones.

    Anything that replaces ``keys``/``values`` with tensors of its own (``batch_select_indices``,
    ``reorder_cache``, ...) is noticed on the next update, which then copies them into new room.
    """

    spare = 64

    def __init__(self):
        super().__init__()
        self.key_room = self.value_room = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._in_room() or end > self.key_room.shape[-2]:
            self._move_to_new_room(length, key_states, end + self.spare)
        self.key_room[..., length:end, :] = key_states
        self.value_room[..., length:end, :] = value_states
        self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
        return self.keys, self.values

    def _in_room(self) -> bool:
        """Whether ``keys``/``values`` are still the views of the room this layer returned
        (views from its first position, so they start where the room starts)."""
        return (self.key_room is not None and self.keys.data_ptr() == self.key_room.data_ptr()
                and self.values.data_ptr() == self.value_room.data_ptr())

    def _move_to_new_room(self, length: int, like: torch.Tensor, capacity: int) -> None:
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        key_room, value_room = like.new_empty(shape), like.new_empty(shape)
        if length:
            key_room[..., :length, :] = self.keys
            value_room[..., :length, :] = self.values
        self.key_room, self.value_room = key_room, value_room


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers append in place (layers of
    other kinds, e.g. sliding windows, stay transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingKVLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
