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
from ppg.rollout.samplers.growing_cache import growing_cache


def _generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    """``generate`` arguments around ``DrawAndRecord``: it draws, so ``generate`` takes argmax."""
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id}


class DrawAndRecord(LogitsProcessor):
    """The last logits processor of ``generate``: it draws the next token from the final scores
    (temperature and top_p applied) and records that token's log-prob, then leaves only the drawn
    token finite, so ``generate`` (with ``do_sample=False``) takes it by argmax.

    The draw is an inverse-CDF one (one uniform per row against the cumulative probabilities):
    the same distribution as ``torch.multinomial``, which draws one exponential per vocabulary
    entry and cost about 40x more per step at [32, 49152] on a 2-core CPU (docs/benchmark.md).
    It uses the global torch generator, so a seeded run repeats its draws.
    """

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        cdf = logprobs.exp().cumsum(dim=-1)
        uniform = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, uniform, right=True).clamp_max(cdf.shape[1] - 1)
        self.steps.append(logprobs.gather(1, tokens)[:, 0])
        only_drawn = torch.full_like(scores, float("-inf"))
        return only_drawn.scatter_(1, tokens, 0.0)

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probs of ``new_tokens`` (the generated columns)."""
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1)[:, :new_tokens.shape[1]].cpu()


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
        recorder = DrawAndRecord()
        processors = LogitsProcessorList([recorder])
        if sampling.top_p < 1.0:
            processors.insert(0, TopPLogitsWarper(sampling.top_p))
        if sampling.temperature != 1.0:
            processors.insert(0, TemperatureLogitsWarper(sampling.temperature))
        kwargs = _generate_kwargs(tokenizer, sampling)
        if self.cache is None:
            self.cache = growing_cache(model.config)
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
