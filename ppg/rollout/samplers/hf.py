"""Sampling with HF ``generate`` on the trainer's own policy: ragged token prompts (left padding),
each conversation's KV cache kept across turns, the sampled tokens' log-probs recorded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from ppg.models.cpu.bf16_head import bf16_output_head
from ppg.rollout.samplers.base import SampledTurn, Sampler, Sampling, left_pad, stop_token_ids


def _generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": 0, "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id}


class SampledLogprobs(LogitsProcessor):
    """The last logits processor of ``generate``: it sees the final scores (temperature and top_p
    applied), keeps their log-softmax for one step, and reads the sampled token's entry when the
    next step shows which token was drawn. Memory: one ``[B, V]`` row block, not one per step."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.pending.gather(1, tokens[:, None].to(self.pending.device))[:, 0])
        self.pending = None

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probs of ``new_tokens`` (the generated columns)."""
        if self.pending is not None:
            self._take(new_tokens[:, -1])
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1).cpu()


def _cut_after_stop(new_tokens: torch.Tensor, stops: list[int]) -> tuple[list[int], torch.Tensor]:
    """Each row's kept length (up to and including its first stop token) and the kept mask."""
    is_stop = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    keep = ~after_stop
    return keep.sum(-1).tolist(), keep.long()


class HFSampler(Sampler):
    """Samples with HF ``generate`` on the trainer's own policy (the default; the CPU path).

    With ``keys``, every conversation's KV cache stays from turn to turn: only the tokens added
    since its last turn are encoded, and conversations that finished leave the cache (and the
    batch) at once. Rows are padded into blocks, so a row's cached sequence can hold masked holes;
    positions come from the attention mask, so the model sees the same positions as for the
    unpadded conversation. Sampling shares the trainer's weights: ``update_adapters`` is free.
    """

    def __init__(self):
        self.policy = self.tokenizer = None
        self.reset()

    def reset(self) -> None:
        self.keys: list[int] = []
        self.seen: dict[int, list[int]] = {}  # per key: the conversation tokens in the cache
        self.ids = self.mask = self.cache = None

    def close(self) -> None:
        self.reset()

    @torch.no_grad()
    def sample(self, prompts: Sequence[list[int]], sampling: Sampling,
               keys: Sequence[int] | None = None) -> list[SampledTurn]:
        if not prompts:
            return []
        if keys is None:
            self.reset()
            try:
                return self.sample(prompts, sampling, keys=range(len(prompts)))
            finally:
                self.reset()
        keys = list(keys)
        if not self._continues(prompts, keys):
            self.reset()
        self._keep(keys)
        additions = [list(p[len(self.seen.get(k, ())):]) for p, k in zip(prompts, keys)]
        turns = self._generate(additions, sampling)
        self.keys = keys
        self.seen = {k: list(p) + t.token_ids for k, p, t in zip(keys, prompts, turns)}
        return turns

    def _continues(self, prompts, keys) -> bool:
        """Whether every prompt extends what the cache holds for its key."""
        if self.cache is None:
            return False
        return all(k in self.seen and list(p[:len(self.seen[k])]) == self.seen[k]
                   for p, k in zip(prompts, keys))

    def _keep(self, keys: list[int]) -> None:
        """Drop finished conversations from the cache and order its rows as ``keys``."""
        if self.cache is None or keys == self.keys:
            return
        index = torch.tensor([self.keys.index(k) for k in keys], device=self.ids.device)
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.cache.batch_select_indices(index)

    def _generate(self, additions: list[list[int]], sampling: Sampling) -> list[SampledTurn]:
        model, tokenizer = self.policy, self.tokenizer
        device = next(model.parameters()).device
        block, block_mask = left_pad(additions, tokenizer.pad_token_id)
        block, block_mask = block.to(device), block_mask.to(device)
        ids = block if self.ids is None else torch.cat([self.ids, block], dim=1)
        mask = block_mask if self.mask is None else torch.cat([self.mask, block_mask], dim=1)
        recorder = SampledLogprobs()
        # generate would warp after any processor passed in: warp here, so the recorder sees the
        # distribution that is sampled (the same draws as generate's own warpers).
        processors = LogitsProcessorList([recorder])
        if sampling.top_p < 1.0:
            processors.insert(0, TopPLogitsWarper(sampling.top_p))
        if sampling.temperature != 1.0:
            processors.insert(0, TemperatureLogitsWarper(sampling.temperature))
        kwargs = {**_generate_kwargs(tokenizer, sampling), "temperature": 1.0, "top_p": 1.0}
        with bf16_output_head(model, sampling.bf16_head):
            output = model.generate(input_ids=ids, attention_mask=mask, past_key_values=self.cache,
                                    return_dict_in_generate=True, logits_processor=processors,
                                    **kwargs)
        new_tokens = output.sequences[:, ids.shape[1]:]
        stops = stop_token_ids(tokenizer)
        lengths, new_mask = _cut_after_stop(new_tokens, stops)
        logprobs = recorder.result(new_tokens)
        self.ids, self.mask = output.sequences, torch.cat([mask, new_mask], dim=1)
        self.cache = output.past_key_values
        turns = []
        for row, length in enumerate(lengths):
            tokens = new_tokens[row, :length].tolist()
            reason = "stop" if tokens and tokens[-1] in stops else "length"
            turns.append(SampledTurn(tokens, logprobs[row, :length].tolist(), reason))
        return turns


def sample_continuations(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """Sample one continuation per prompt; each is cut after its first stop token."""
    sampler = HFSampler()
    sampler.bind(model, tokenizer)
    return [turn.token_ids for turn in sampler.sample(prompts, sampling)]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ready for the assistant to speak."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def generate_replies(model, tokenizer, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
    """One sampled assistant reply (text) per chat-message list."""
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in conversations]
    outputs = sample_continuations(model, tokenizer, prompts, sampling)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
