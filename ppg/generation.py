"""Batched sampling from a causal LM on ragged token prompts (left padding, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """How turns are sampled: temperature, nucleus top_p, and a length cap per turn."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged token lists into left-padded ``input_ids`` and ``attention_mask``."""
    width = max(len(s) for s in sequences)
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


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """Sample one continuation per prompt; each is cut after its first stop token."""
    if not prompts:
        return []
    stops = stop_token_ids(tokenizer)
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    continuations = []
    for tokens in new_tokens:
        cut = next((i + 1 for i, tok in enumerate(tokens) if tok in stops), len(tokens))
        continuations.append(tokens[:cut])
    return continuations


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ready for the assistant to speak."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def generate_replies(model, tokenizer, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
    """One sampled assistant reply (text) per chat-message list."""
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in conversations]
    outputs = sample_continuations(model, tokenizer, prompts, sampling)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
