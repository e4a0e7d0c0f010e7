"""Commands beside training: a persona chat, logging rollouts, evaluating a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ppg.generation import Sampling, generate_replies
from ppg.judges.base import Judge
from ppg.models import ModelSpec, as_spec, load_policy
from ppg.problems.base import Problem
from ppg.users import UserSimulator

DEFAULT_PERSONA = ("You are Maya, a 34-year-old marine biologist from Lisbon who keeps two cats "
                   "and surfs every weekend. Stay in character and answer in one or two sentences.")


def chat(message: str = "Hi! What do you do for a living?", persona: str = DEFAULT_PERSONA,
         model: ModelSpec | None = None, seed: int = 0, max_new_tokens: int = 48,
         temperature: float = 0.7) -> str:
    """Print one reply of the (quantized) model playing ``persona``.

    Args:
        message: what the user says.
        persona: the agent's system prompt.
        model: model spec (default: embedded SmolLM2-135M-Instruct, nf4, LoRA).
        seed: sampling seed (same seed, same reply).
        max_new_tokens: reply length cap.
        temperature: sampling temperature.
    """
    started = time.perf_counter()
    policy, tokenizer = load_policy(model)
    loaded = time.perf_counter()
    torch.manual_seed(seed)
    conversation = [{"role": "system", "content": persona}, {"role": "user", "content": message}]
    reply = generate_replies(policy, tokenizer, [conversation],
                             Sampling(temperature=temperature, max_new_tokens=max_new_tokens))[0]
    spec = as_spec(model)
    print(f"[{spec.name_or_path}, {spec.quantization}; load {loaded - started:.1f}s, "
          f"reply {time.perf_counter() - loaded:.1f}s]")
    print(f"user:  {message}\nagent: {reply}")
    return reply


def _load_adapters(policy, ckpt: str) -> None:
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    adapters = {k.removeprefix("policy."): v for k, v in state.items()}
    missing = policy.load_state_dict(adapters, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"checkpoint {ckpt!r} does not match the model: unexpected {missing.unexpected_keys[0]}")


def rollout(problem: Problem, out: str, model: ModelSpec | None = None, ckpt: str | None = None,
            judge: Judge | None = None, user: UserSimulator | None = None, split: str = "train", contexts: int = 8,
            group_size: int = 1, n_turns: int | None = None, sampling: Sampling | None = None,
            seed: int = 0) -> None:
    """Roll out a policy on a problem and write logged conversations (JSONL) with rewards.

    Args:
        problem: the problem (class_path/init_args).
        out: output JSONL path (the LoggedConversationDataModule format).
        model: model spec of the policy.
        ckpt: optional ppg checkpoint whose LoRA adapters are loaded.
        judge: judge (default: the problem's).
        user: user simulator (default: scripted).
        split: ``train`` or ``test`` contexts.
        contexts: how many contexts.
        group_size: rollouts per context.
        n_turns: agent turns (default: the problem's).
        sampling: sampling settings.
        seed: seed of context choice and sampling.
    """
    from ppg.rollout import RolloutEngine

    policy, tokenizer = load_policy(model)
    if ckpt:
        _load_adapters(policy, ckpt)
    engine = RolloutEngine(policy, tokenizer, judge or problem.default_judge(), user,
                           n_turns or problem.n_turns, sampling, group_size)
    rollouts = engine.run(problem.contexts(split, contexts, seed=seed), seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r.to_json()) + "\n" for r in rollouts))
    rates = engine.stats.tokens_per_s()
    print(f"wrote {len(rollouts)} conversations to {out} (agent {rates['agent']:.1f} tok/s, "
          f"user {rates['user']:.1f} tok/s)")
