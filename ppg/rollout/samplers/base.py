"""What every sampler shares: settings, the one return type, the base class, padding, stop tokens.

A sampler produces the agent's tokens. ``Sampler.sample`` takes the full token ids of each live
conversation and returns one ``SampledTurn`` per conversation: the exact sampled token ids, their
log-probs under the sampling distribution, and why the turn stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass
class SampledTurn:
    """One sampled agent turn.

    ``logprobs[k]`` is the log-prob of ``token_ids[k]`` under the distribution it was drawn from:
    logits / temperature, restricted to the top_p nucleus and renormalised (with ``top_p=1``
    exactly the trainer's tempered policy). ``stop_reason`` is ``"stop"`` when the turn ends with
    a stop token (kept in ``token_ids``), ``"length"`` when it hit ``max_new_tokens``.
    """

    token_ids: list[int]
    logprobs: list[float]
    stop_reason: str


class SamplerError(RuntimeError):
    """A sampler cannot produce tokens (its server is down, its engine failed)."""


class Sampler:
    """Base class of the samplers (``HFSampler``, ``VLLMSampler``, ``ServedSampler``).

    ``bind`` hands over the trainer's policy and tokenizer (and the model spec, for samplers that
    load their own copy of the base weights). ``sample(prompts, sampling, keys)`` samples one turn
    per prompt. ``keys`` name the conversations across calls since the last ``reset()``: a sampler
    may keep state per key (the HF sampler keeps each conversation's KV cache and encodes only
    the tokens added since its last turn); a key missing from a call has finished and its state
    is dropped. Without ``keys`` every call stands alone. ``update_adapters(policy)`` makes the
    policy's current LoRA adapters the ones the sampler samples with and returns the seconds spent
    (0 for samplers that share the trainer's weights).
    """

    def bind(self, policy, tokenizer, spec=None) -> None:
        self.policy, self.tokenizer = policy, tokenizer
        if spec is not None:
            self.spec = spec

    def sample(self, prompts: Sequence[list[int]], sampling: Sampling,
               keys: Sequence[int] | None = None) -> list[SampledTurn]:
        raise NotImplementedError

    def update_adapters(self, policy) -> float:
        return 0.0

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def request_seeds(self, count: int) -> list[int]:
        """Per-request seeds drawn from torch's generator, so ``torch.manual_seed`` makes a run
        repeatable for samplers with their own random streams (vLLM, servers)."""
        return torch.randint(0, 2**31 - 1, (count,)).tolist() if count else []


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


def cut_at_stop(token_ids: list[int], logprobs: list[float], stops, limit: int) -> SampledTurn:
    """A ``SampledTurn`` of the tokens up to and including the first stop token."""
    stops = set(stops)
    for k, token in enumerate(token_ids):
        if token in stops:
            return SampledTurn(list(token_ids[:k + 1]), list(logprobs[:k + 1]), "stop")
    reason = "length" if len(token_ids) >= limit else "stop"
    return SampledTurn(list(token_ids), list(logprobs), reason)
