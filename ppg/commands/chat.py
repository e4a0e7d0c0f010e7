"""``ppg chat``: one persona reply from a (quantized) model."""

from __future__ import annotations

import time

import torch

from ppg.models import ModelSpec, as_spec, load_policy
from ppg.models.spec import resolve_device
from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.hf import generate_replies

DEFAULT_PERSONA = ("You are Maya, a 34-year-old marine biologist from Lisbon who keeps two cats "
                   "and surfs every weekend. Stay in character and answer in one or two sentences.")


def chat(message: str = "Hi! What do you do for a living?", persona: str = DEFAULT_PERSONA,
         model: ModelSpec | None = None, seed: int = 0, max_new_tokens: int = 48,
         temperature: float = 0.7, device: str = "auto") -> str:
    """Print one reply of the (quantized) model playing ``persona``.

    Args:
        message: what the user says.
        persona: the agent's system prompt.
        model: model spec (default: embedded SmolLM2-135M-Instruct, nf4, LoRA).
        seed: sampling seed (same seed, same reply).
        max_new_tokens: reply length cap.
        temperature: sampling temperature.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    """
    started = time.perf_counter()
    policy, tokenizer = load_policy(model, device=resolve_device(device))
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
