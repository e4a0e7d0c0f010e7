"""What every sampler shares: sampling settings, padding, and the tokens that end a turn."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """How turns are sampled: temperature, nucleus top_p, a length cap per turn, and whether the
    vocabulary projection may run in bf16 while sampling (CPUs with native bf16 only)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    bf16_head: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged token lists into left-padded ``input_ids`` and ``attention_mask``."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a chat turn: eos plus the chat template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


