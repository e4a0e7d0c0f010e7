"""Gradient signal-to-noise of each policy class's estimator on the same rollouts."""

from __future__ import annotations

import lightning as L
import torch

from ppg.subsets import RewardSubset, subset_from_name


def rollout_turn_gradients(pl_module, batch, row: int, params) -> torch.Tensor:
    """``[n, P]`` gradients of rollout ``row``'s turn log-probabilities w.r.t. ``params``
    (zero rows for turns past the conversation's end)."""
    n_turns = batch.rewards.shape[1]
    grads = torch.zeros(n_turns, sum(p.numel() for p in params), device=pl_module.device)
    logprobs = pl_module.turn_logprobs(batch.select([row]))[0]
    live = [t for t in range(n_turns) if batch.turn_mask[row, t]]
    for t in live:
        parts = torch.autograd.grad(logprobs[t], params, retain_graph=t != live[-1], allow_unused=True)
        grads[t] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(parts, params)])
    return grads


class SNRAccumulator:
    """Gradient signal-to-noise ‖mean‖² / (trace of the per-sample covariance / B), from
    per-sample gradients added one at a time (memory: one gradient, not B)."""

    def __init__(self):
        self.total, self.squares, self.count = None, 0.0, 0

    def add(self, gradient: torch.Tensor) -> None:
        gradient = gradient.double()
        self.total = gradient.clone() if self.total is None else self.total + gradient
        self.squares += float(gradient.pow(2).sum())
        self.count += 1

    def snr(self) -> float:
        size = self.count
        mean_sq = float((self.total / size).pow(2).sum())
        trace = (self.squares - size * mean_sq) / max(size - 1, 1)
        return mean_sq / max(trace / size, 1e-30)


class GradientNoise(L.Callback):
    """Every ``every_n_steps`` training steps, logs ``grad_noise/<name>/snr`` for the trained class
    and each class in ``compare``: per-sample estimator gradients Σ_t A_S[b, t] ∇log π(a_t),
    all from the same per-turn gradients, so the classes differ only in their credit.

    The per-turn gradients are computed in the training precision (bf16 autocast under
    ``bf16-mixed``; log-probs still normalised in fp32): one firing costs a forward and a backward
    per turn of every rollout, and fp32 made it the largest single cost of a short run.
    """

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
        params = [p for p in pl_module.policy.parameters() if p.requires_grad]
        subsets = self._subsets(pl_module)
        advantages = [pl_module.advantages(batch, subset).float() for subset in subsets]
        accumulators = [SNRAccumulator() for _ in subsets]
        with trainer.precision_plugin.forward_context(), torch.enable_grad():
            for row in range(batch.rewards.shape[0]):
                turn_grads = rollout_turn_gradients(pl_module, batch, row, params)
                for accumulator, advantage in zip(accumulators, advantages):
                    accumulator.add(advantage[row] @ turn_grads)
        for subset, accumulator in zip(subsets, accumulators):
            pl_module.log(f"grad_noise/{subset.name}/snr", accumulator.snr(),
                          on_step=True, on_epoch=False, batch_size=batch.rewards.shape[0])
