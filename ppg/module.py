"""The LightningModule: a quantized LM with LoRA adapters trained by a partial policy gradient."""

from __future__ import annotations

import lightning as L
import torch

from ppg.models import ModelSpec, as_spec, load_policy
from ppg.objective import (
    BASELINES,
    clipped_partial_pg_loss,
    kl_penalty,
    partial_advantages,
    partial_pg_loss,
)
from ppg.rollout import RolloutBatch, turn_logprobs
from ppg.subsets import FullPlanning, RewardSubset


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


class PartialPolicyGradientModule(L.LightningModule):
    """Partial policy gradient training of a (quantized) causal LM through LoRA adapters.

    Args:
        model: which base model, quantization and LoRA adapters to train.
        subset: the policy class: which future rewards each turn's gradient sees.
        baseline: ``leave_one_out`` (default), ``mean`` or ``none``.
        lr: AdamW learning rate of the adapters.
        weight_decay: AdamW weight decay.
        kl_coef: weight of the KL penalty to the base model (adapters disabled); 0 = off.
        kl_estimator: ``k3`` (default) or ``k1``.
        updates_per_batch: optimizer steps per rollout batch; above 1 the ratio is clipped.
        clip_eps: ratio clipping range when ``updates_per_batch > 1``.
        grad_clip: gradient norm clipping (0 = off).
    """

    def __init__(self, model: ModelSpec | None = None, subset: RewardSubset | None = None,
                 baseline: str = "leave_one_out", lr: float = 1e-4, weight_decay: float = 0.0,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", updates_per_batch: int = 1,
                 clip_eps: float = 0.2, grad_clip: float = 1.0):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"model.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        for key, value in (("lr", lr), ("updates_per_batch", updates_per_batch)):
            if not value > 0:
                raise ValueError(f"model.{key} must be > 0, got {value}")
        if kl_coef < 0:
            raise ValueError(f"model.kl_coef must be >= 0, got {kl_coef}")
        self.spec = as_spec(model)
        self.subset = subset if subset is not None else FullPlanning()
        self.baseline, self.lr, self.weight_decay = baseline, lr, weight_decay
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.updates_per_batch, self.clip_eps, self.grad_clip = updates_per_batch, clip_eps, grad_clip
        self.policy = None
        self.tokenizer = None
        self.automatic_optimization = False
        # Checkpoints carry only the adapters; the frozen base is rebuilt from the spec.
        self.strict_loading = False

    @property
    def policy_name(self) -> str:
        return self.subset.name

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy, self.tokenizer = load_policy(self.spec, device=self.device)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def turn_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, n]`` log-probabilities of each agent turn under the current policy."""
        return turn_logprobs(self.policy, batch, temperature=batch.temperature)

    def advantages(self, batch: RolloutBatch, subset: RewardSubset | None = None) -> torch.Tensor:
        """Detached per-turn advantages of ``subset`` (default: this module's) on ``batch``."""
        return partial_advantages(batch.rewards, subset or self.subset, self.baseline,
                                  batch.group_ids, batch.turn_mask)

    def _loss(self, batch: RolloutBatch, old_logprobs: torch.Tensor | None):
        logprobs = self.turn_logprobs(batch)
        if old_logprobs is None:
            loss = partial_pg_loss(logprobs, batch.rewards, self.subset, self.baseline,
                                   batch.group_ids, batch.turn_mask)
        else:
            loss = clipped_partial_pg_loss(logprobs, old_logprobs, self.advantages(batch),
                                           self.clip_eps, batch.turn_mask)
        kl = None
        if self.kl_coef > 0:
            with torch.no_grad(), self.policy.disable_adapter():
                reference = self.turn_logprobs(batch)
            kl = kl_penalty(logprobs, reference, batch.turn_mask, self.kl_estimator)
            loss = loss + self.kl_coef * kl
        return loss, logprobs, kl

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        optimizer = self.optimizers()
        old_logprobs = None
        for update in range(self.updates_per_batch):
            loss, logprobs, kl = self._loss(batch, old_logprobs)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step}")
            optimizer.zero_grad()
            self.manual_backward(loss)
            if self.grad_clip > 0:
                self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip,
                                    gradient_clip_algorithm="norm")
            optimizer.step()
            if self.updates_per_batch > 1 and old_logprobs is None:
                old_logprobs = logprobs.detach()
        size = batch.rewards.shape[0]
        self.log(f"policy/{self.policy_name}/loss", loss.detach(), batch_size=size, sync_dist=True)
        self.log("train/loss", loss.detach(), batch_size=size, sync_dist=True, prog_bar=True)
        if kl is not None:
            self.log("train/kl", kl.detach(), batch_size=size, sync_dist=True)
        return loss.detach()

    def validation_step(self, batch: RolloutBatch, batch_idx: int):
        self._log_rewards("val", batch)

    def test_step(self, batch: RolloutBatch, batch_idx: int):
        self._log_rewards("test", batch)

    def _log_rewards(self, stage: str, batch: RolloutBatch):
        mask = batch.turn_mask.float()
        size = batch.rewards.shape[0]
        valid = mask.sum().clamp(min=1)
        self.log(f"{stage}/reward_mean", (batch.rewards * mask).sum() / valid, batch_size=size,
                 sync_dist=True, prog_bar=True)
        for turn in range(batch.n_turns):
            count = mask[:, turn].sum().clamp(min=1)
            self.log(f"{stage}/reward_turn{turn}", (batch.rewards[:, turn] * mask[:, turn]).sum() / count,
                     batch_size=size, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        checkpoint["ppg_model_spec"] = {"name_or_path": self.spec.name_or_path,
                                        "quantization": self.spec.quantization}
