"""Tokens per second for rollout generation and for training updates."""

from __future__ import annotations

import time

import lightning as L


class RolloutThroughput(L.Callback):
    """Logs ``rollout/tokens_per_s`` (generated agent + user tokens over generation time, per
    epoch), ``train/tokens_per_s`` (tokens through forward+backward per second of updates) and
    ``sampler/sync_s`` (seconds the sampler took to load the epoch's adapters), and
    ``judge/parse_failures`` (unreadable judge replies so far) for judges that count them.

    Not Lightning's ``ThroughputMonitor``: it times from the start of training, so an epoch's
    rollouts (made when its dataloader is built) would count as training time, and its rates
    appear only once a window of batches is full (two updates per epoch in the demo).
    """

    def on_train_epoch_start(self, trainer, pl_module):
        stats = getattr(trainer.datamodule, "last_stats", None)
        if stats is not None:
            rates = stats.tokens_per_s()
            pl_module.log("rollout/tokens_per_s", rates["total"], on_epoch=True, sync_dist=True)
            pl_module.log("rollout/agent_tokens_per_s", rates["agent"], on_epoch=True, sync_dist=True)
        sync_s = getattr(trainer.datamodule, "last_sync_s", None)
        if sync_s is not None:  # seconds the sampler took to load the latest adapters
            pl_module.log("sampler/sync_s", float(sync_s), on_epoch=True, sync_dist=True)
        failures = getattr(getattr(trainer.datamodule, "judge", None), "parse_failures", None)
        if isinstance(failures, int):
            pl_module.log("judge/parse_failures", float(failures), on_epoch=True, reduce_fx="max",
                          sync_dist=True)
        self._tokens, self._seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seconds += time.perf_counter() - self._started
        self._tokens += int(batch.attention_mask.sum()) * pl_module.updates_per_batch
        pl_module.log("train/tokens_per_s", self._tokens / max(self._seconds, 1e-9),
                      on_step=False, on_epoch=True, batch_size=batch.rewards.shape[0])
