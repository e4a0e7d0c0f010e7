"""``ppg rollout``: roll out a policy on a problem and log the conversations (JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

from ppg.judges.base import Judge
from ppg.models import ModelSpec, load_policy
from ppg.models.adapters import load_adapters_from_checkpoint
from ppg.models.spec import resolve_device
from ppg.problems.base import Problem
from ppg.rollout import RolloutEngine, Sampling
from ppg.rollout.users import UserSimulator


def rollout(problem: Problem, out: str, model: ModelSpec | None = None, ckpt: str | None = None,
            judge: Judge | None = None, user: UserSimulator | None = None, split: str = "train", contexts: int = 8,
            group_size: int = 1, n_turns: int | None = None, sampling: Sampling | None = None,
            seed: int = 0, device: str = "auto") -> None:
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
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    """
    policy, tokenizer = load_policy(model, device=resolve_device(device))
    if ckpt:
        load_adapters_from_checkpoint(policy, ckpt)
    engine = RolloutEngine(policy, tokenizer, judge or problem.default_judge(), user,
                           n_turns or problem.n_turns, sampling, group_size)
    rollouts = engine.run(problem.contexts(split, contexts, seed=seed), seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r.to_json()) + "\n" for r in rollouts))
    rates = engine.stats.tokens_per_s()
    print(f"wrote {len(rollouts)} conversations to {out} (agent {rates['agent']:.1f} tok/s, "
          f"user {rates['user']:.1f} tok/s)")
