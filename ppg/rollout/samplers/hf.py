"""Sampling with HF ``generate``: ragged token prompts (left padding), KV cache kept across turns."""

from __future__ import annotations

import torch

from ppg.models.cpu.bf16_head import bf16_output_head
from ppg.rollout.samplers.base import Sampling, left_pad, stop_token_ids


def _generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": 0, "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id}


def _cut_after_stop(new_tokens: torch.Tensor, stops: list[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's tokens up to and including its first stop token, and the mask of those tokens."""
    is_stop = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    keep = ~after_stop
    rows = [row[: int(k.sum())] for row, k in zip(new_tokens.tolist(), keep)]
    return rows, keep.long()


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """Sample one continuation per prompt; each is cut after its first stop token."""
    if not prompts:
        return []
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with bf16_output_head(model, sampling.bf16_head):
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                **_generate_kwargs(tokenizer, sampling))
    return _cut_after_stop(output[:, input_ids.shape[1]:], stop_token_ids(tokenizer))[0]


class TurnByTurnSampler:
    """Samples turn after turn for a fixed batch of conversations, keeping the KV cache.

    Each call appends every row's new tokens (what was said since its last turn; empty for rows
    that are done) and samples the next turn. Only the new tokens are encoded: the history's keys
    and values stay in the cache. Rows are padded into blocks, so a row's sequence can hold
    masked holes; positions come from the attention mask, so the model sees the same positions
    as for the unpadded conversation.
    """

    def __init__(self, model, tokenizer, sampling: Sampling):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.stops = stop_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        self.ids = self.mask = self.cache = None

    @torch.no_grad()
    def sample(self, additions: list[list[int]]) -> list[list[int]]:
        block, block_mask = left_pad(additions, self.tokenizer.pad_token_id)
        block, block_mask = block.to(self.device), block_mask.to(self.device)
        ids = block if self.ids is None else torch.cat([self.ids, block], dim=1)
        mask = block_mask if self.mask is None else torch.cat([self.mask, block_mask], dim=1)
        with bf16_output_head(self.model, self.sampling.bf16_head):
            output = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=self.cache,
                                         return_dict_in_generate=True,
                                         **_generate_kwargs(self.tokenizer, self.sampling))
        rows, new_mask = _cut_after_stop(output.sequences[:, ids.shape[1]:], self.stops)
        self.ids, self.mask = output.sequences, torch.cat([mask, new_mask], dim=1)
        self.cache = output.past_key_values
        return rows


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ready for the assistant to speak."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def generate_replies(model, tokenizer, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
    """One sampled assistant reply (text) per chat-message list."""
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in conversations]
    outputs = sample_continuations(model, tokenizer, prompts, sampling)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
