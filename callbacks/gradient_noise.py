"""Gradient signal-to-noise of each policy class's estimator on the same rollouts."""

from __future__ import annotations

import lightning as L
import torch

from ppg.subsets import RewardSubset, subset_from_name


def per_turn_gradients(pl_module, batch) -> torch.Tensor:
    """``[B, n, P]`` gradients of each rollout's turn log-probability w.r.t. the LoRA parameters.

    One rollout at a time, so memory stays that of batch size 1.
    """
    params = [p for p in pl_module.policy.parameters() if p.requires_grad]
    size, n_turns = batch.rewards.shape
    grads = torch.zeros(size, n_turns, sum(p.numel() for p in params), device=pl_module.device)
    for b in range(size):
        single = batch.select([b])
        logprobs = pl_module.turn_logprobs(single)[0]
        for t in range(n_turns):
            if not batch.turn_mask[b, t]:
                continue
            parts = torch.autograd.grad(logprobs[t], params, retain_graph=t < n_turns - 1, allow_unused=True)
            grads[b, t] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                     for g, p in zip(parts, params)])
    return grads


def gradient_snr(per_sample: torch.Tensor) -> float:
    """‖mean gradient‖² / (trace of the per-sample covariance / B), for ``[B, P]`` samples."""
    size = per_sample.shape[0]
    mean = per_sample.mean(0)
    trace = ((per_sample - mean) ** 2).sum() / max(size - 1, 1)
    return float(mean.pow(2).sum() / (trace / size).clamp(min=1e-30))


class GradientNoise(L.Callback):
    """Every ``every_n_steps`` training steps, logs ``grad_noise/<name>/snr`` for the trained class
    and each class in ``compare``: per-sample estimator gradients Σ_t A_S[b, t] ∇log π(a_t),
    all from the same per-turn gradients, so the classes differ only in their credit."""

    def __init__(self, every_n_steps: int = 10, compare: list[str] | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.compare = [subset_from_name(name) for name in (compare or ["greedy", "k2", "full"])]

    def _subsets(self, pl_module) -> list[RewardSubset]:
        own = pl_module.subset
        return [own] + [s for s in self.compare if s.name != own.name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps != 1 % self.every_n_steps:
            return
        if batch.rewards.shape[0] < 2:
            return
        with torch.enable_grad():
            grads = per_turn_gradients(pl_module, batch)
        for subset in self._subsets(pl_module):
            advantages = pl_module.advantages(batch, subset).to(grads.dtype)
            per_sample = torch.einsum("bt,btp->bp", advantages, grads)
            pl_module.log(f"grad_noise/{subset.name}/snr", gradient_snr(per_sample),
                          on_step=True, on_epoch=False, batch_size=batch.rewards.shape[0])
