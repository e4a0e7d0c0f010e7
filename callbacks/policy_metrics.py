"""Per-policy-class reward and credit metrics, side by side on the same rollouts."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric

from ppg.subsets import RewardSubset, subset_from_name


class PolicyClassMetrics(L.Callback):
    """Logs ``policy/<name>/reward_mean``, ``policy/<name>/reward_turn<t>`` for the trained class,
    and ``policy/<name>/credit_mean`` for it and for every class in ``compare``.

    Credit of other classes is computed on the same batch, so their curves are directly comparable.
    """

    def __init__(self, compare: list[str] | None = None):
        self.compare = [subset_from_name(name) for name in (compare or ["greedy", "k2", "full"])]
        self.metrics: dict[str, MeanMetric] = {}

    def _metric(self, name: str, device) -> MeanMetric:
        if name not in self.metrics:
            self.metrics[name] = MeanMetric(sync_on_compute=True).to(device)
        return self.metrics[name]

    def _subsets(self, pl_module) -> list[RewardSubset]:
        own = pl_module.subset
        return [own] + [s for s in self.compare if s.name != own.name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch.turn_mask.float()
        rewards = batch.rewards * mask
        own = pl_module.subset.name
        values = {f"policy/{own}/reward_mean": (rewards.sum(1) / mask.sum(1).clamp(min=1), None)}
        for turn in range(batch.n_turns):
            values[f"policy/{own}/reward_turn{turn}"] = (rewards[:, turn], mask[:, turn])
        for subset in self._subsets(pl_module):
            credit = subset.credit(rewards) * mask
            values[f"policy/{subset.name}/credit_mean"] = (credit.sum(1) / mask.sum(1).clamp(min=1), None)
        for name, (value, weight) in values.items():
            metric = self._metric(name, pl_module.device)
            metric.update(value, weight if weight is not None else torch.ones_like(value))

    def on_train_epoch_end(self, trainer, pl_module):
        # compute() averages over all ranks (sync_on_compute), so every rank logs the same value.
        for name, metric in self.metrics.items():
            pl_module.log(name, metric.compute(), on_epoch=True, rank_zero_only=True)
            metric.reset()
