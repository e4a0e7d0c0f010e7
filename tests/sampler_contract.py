"""The contract every sampler meets, checked by tests/test_samplers.py (HF),
tests/test_vllm_sampler.py and tests/test_served_sampler.py on the same prompts."""

import torch

from ppg.rollout.samplers.base import SampledTurn, Sampling, stop_token_ids
from ppg.rollout.samplers.hf import chat_prompt_ids

QUESTIONS = ("Hi! What do you do for a living?", "Tell me about your dog.", "Where do you live?")


def prompts(tokenizer) -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def follow_up(tokenizer) -> list[int]:
    """The closing of an agent turn, a user line and the next generation prompt."""
    return tokenizer("<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"]


def trainer_logprobs(policy, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    """The trainer's log-probs of ``tokens`` after ``prompt`` (one unpadded forward, fp32)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def check_sampler_contract(sampler, policy, tokenizer, gap_bound: float = 0.08) -> float:
    """Two turns of three conversations (one leaves after the first turn): types, lengths, stop
    reasons, and log-probs equal to the trainer's within ``gap_bound`` (returns the mean gap)."""
    sampling = Sampling(temperature=0.9, top_p=1.0, max_new_tokens=6, bf16_head=False)
    stops = set(stop_token_ids(tokenizer))
    start, piece = prompts(tokenizer), follow_up(tokenizer)
    torch.manual_seed(0)
    first = sampler.sample(start, sampling, keys=[0, 1, 2])
    follow = [start[k] + first[k].token_ids + piece for k in (0, 2)]
    second = sampler.sample(follow, sampling, keys=[0, 2])
    alone = sampler.sample([start[1]], sampling)  # no keys: stands alone
    gaps = []
    for turn, prompt in zip(first + second + alone, start + follow + [start[1]]):
        assert isinstance(turn, SampledTurn)
        assert 1 <= len(turn.token_ids) <= sampling.max_new_tokens
        assert len(turn.logprobs) == len(turn.token_ids)
        assert all(isinstance(t, int) for t in turn.token_ids)
        assert all(x <= 0.0 for x in turn.logprobs)
        assert not stops & set(turn.token_ids[:-1])  # nothing after a stop token
        if turn.stop_reason == "stop":
            assert turn.token_ids[-1] in stops
        else:
            assert turn.stop_reason == "length" and len(turn.token_ids) == sampling.max_new_tokens
        expected = trainer_logprobs(policy, prompt, turn.token_ids, sampling.temperature)
        gaps += [abs(a - b) for a, b in zip(turn.logprobs, expected)]
    assert len(first) == 3 and len(second) == 2 and len(alone) == 1
    gap = sum(gaps) / len(gaps)
    assert gap <= gap_bound, f"mean |sampler - trainer| log-prob {gap:.4f} > {gap_bound}"
    sampler.reset()
    return gap
