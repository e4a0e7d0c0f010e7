"""The LightningModule: a quantized LM with LoRA adapters trained by a partial policy gradient.

The loss is per token (``ppg.objective.token_pg_loss``): action token k of turn t contributes
``A_t · ρ_k`` with ``A_t`` the turn's partial advantage (whole-batch baselines) and
``ρ_k = π_θ(k) / μ(k)`` against the sampler's log-probs μ, its weight truncated at ``tis_cap``.
The policy may have moved since sampling on every update but the epoch's very first (later
batches of the epoch, later updates of a batch): there the ratio is PPO-clipped per token at
``clip_eps``. With ρ = 1 the gradient equals the turn-level ``partial_pg_loss`` exactly.
Without sampler log-probs (logged conversations, old checkpoints) μ is the trainer's own first
pass on the batch: ratio 1, no importance weights, the offline surrogate.
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy

from ppg.models import ModelSpec, as_spec, load_policy
from ppg.models.adapters import CHECKPOINT_KEY, adapter_payload
from ppg.models.loading import enable_gradient_checkpointing
from ppg.models.sharding import (
    check_shardable,
    full_tensors,
    gather,
    no_gradient_sync,
    release,
    shard_policy,
)
from ppg.objective import (
    BASELINES,
    TokenLoss,
    kl_penalty,
    masked_turn_means,
    partial_advantages,
    token_pg_loss,
)
from ppg.rollout import RolloutBatch, turn_logprobs
from ppg.rollout.batch import token_logprobs
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
        updates_per_batch: optimizer steps per rollout batch.
        clip_eps: per-token PPO clipping range of the ratio to the sampler, applied wherever the
            policy may have moved since sampling (all updates but the epoch's first).
        tis_cap: truncation of the per-token importance weight π_θ/μ (null = none).
        grad_clip: gradient norm clipping (0 = off).
        micro_batch_size: rollouts per forward/backward pass (gradients accumulate over the
            batch; baselines still use the whole batch); bounds activation memory. None = all.
        gradient_checkpointing: recompute decoder activations in the backward pass (training
            forwards only; sampling keeps its KV cache).
    """

    def __init__(self, model: ModelSpec | None = None, subset: RewardSubset | None = None,
                 baseline: str = "leave_one_out", lr: float = 1e-4, weight_decay: float = 0.0,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", updates_per_batch: int = 1,
                 clip_eps: float = 0.2, tis_cap: float | None = 2.0, grad_clip: float = 1.0,
                 micro_batch_size: int | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"model.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        for key, value in (("lr", lr), ("updates_per_batch", updates_per_batch)):
            if not value > 0:
                raise ValueError(f"model.{key} must be > 0, got {value}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1, got {micro_batch_size}")
        if kl_coef < 0:
            raise ValueError(f"model.kl_coef must be >= 0, got {kl_coef}")
        if not 0 < clip_eps < 1:
            raise ValueError(f"model.clip_eps must be in (0, 1), got {clip_eps}")
        if tis_cap is not None and not tis_cap >= 1:
            raise ValueError(f"model.tis_cap must be >= 1 or null, got {tis_cap}")
        self.spec = as_spec(model)
        self.subset = subset if subset is not None else FullPlanning()
        self.baseline, self.lr, self.weight_decay = baseline, lr, weight_decay
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.updates_per_batch, self.clip_eps, self.grad_clip = updates_per_batch, clip_eps, grad_clip
        self.tis_cap = tis_cap
        self.micro_batch_size = micro_batch_size
        self.gradient_checkpointing = gradient_checkpointing
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
            if self.device_mesh is not None:  # FSDP2Strategy
                check_shardable(self.spec)
            self.policy, self.tokenizer = load_policy(self.spec, device=self.device)
            if self.gradient_checkpointing:
                enable_gradient_checkpointing(self.policy)
            if self.device_mesh is not None:
                shard_policy(self.policy, self.device_mesh["data_parallel"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        release(self.policy)  # weights gathered for sampling go back to one shard per rank

    def _gradient_sync(self, last: bool):
        """Gradients are reduced across ranks on the batch's last micro-batch only."""
        strategy = self.trainer.strategy
        if last or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        if self.device_mesh is not None:
            return no_gradient_sync(self.policy)
        return strategy.block_backward_sync()

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def token_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, L]`` log-probabilities of each agent token under the current policy (0 elsewhere)."""
        return token_logprobs(self.policy, batch, temperature=batch.temperature)

    def turn_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, n]`` log-probabilities of each agent turn under the current policy."""
        return turn_logprobs(self.policy, batch, temperature=batch.temperature)

    def advantages(self, batch: RolloutBatch, subset: RewardSubset | None = None) -> torch.Tensor:
        """Detached per-turn advantages of ``subset`` (default: this module's) on ``batch``."""
        return partial_advantages(batch.rewards, subset or self.subset, self.baseline,
                                  batch.group_ids, batch.turn_mask)

    def _micro_batches(self, size: int) -> list[list[int]]:
        step = self.micro_batch_size or size
        return [list(range(start, min(start + step, size))) for start in range(0, size, step)]

    def policy_loss(self, batch: RolloutBatch, advantages: torch.Tensor,
                    behaviour: torch.Tensor | None = None, clip: bool = False) -> tuple[TokenLoss, torch.Tensor]:
        """The per-token surrogate on ``batch`` and its token log-probs ``[B, L]`` (with gradients).

        ``behaviour`` ``[B, L]`` holds log μ; None means the log-probs of this very pass (ratio 1).
        """
        logprobs = self.token_logprobs(batch)
        behaviour = logprobs.detach() if behaviour is None else behaviour
        out = token_pg_loss(logprobs, behaviour, advantages, batch.action_mask, batch.turn_mask,
                            self.clip_eps if clip else None, self.tis_cap)
        return out, logprobs

    def _backward_pass(self, batch: RolloutBatch, advantages: torch.Tensor, behaviour: torch.Tensor | None,
                       clip: bool) -> tuple[TokenLoss, torch.Tensor, torch.Tensor | None]:
        """Accumulate the batch's gradient micro-batch by micro-batch; returns the loss with the
        batch's ratio statistics, the token log-probs ``[B, L]`` (detached) and the KL."""
        size = batch.rewards.shape[0]
        total = torch.zeros((), device=self.device)
        kl_total = torch.zeros((), device=self.device) if self.kl_coef > 0 else None
        logprobs_all = torch.zeros(batch.input_ids.shape, device=self.device)
        tokens, clipped, log_ratio_max = 0, 0, torch.tensor(-math.inf, device=self.device)
        micro_batches = self._micro_batches(size)
        for index, rows in enumerate(micro_batches):
            part = batch.select(rows)
            share = len(rows) / size
            out, logprobs = self.policy_loss(part, advantages[rows],
                                             None if behaviour is None else behaviour[rows], clip)
            loss = out.loss
            if self.kl_coef > 0:
                with torch.no_grad(), self.policy.disable_adapter():
                    reference = self.token_logprobs(part)
                acted = (part.action_mask & part.turn_mask[:, :, None]).any(dim=1)
                kl = kl_penalty(logprobs, reference, acted, self.kl_estimator)
                loss = loss + self.kl_coef * kl
                kl_total += kl.detach() * share
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step}")
            with self._gradient_sync(last=index == len(micro_batches) - 1):
                self.manual_backward(loss * share)
            total += loss.detach() * share
            logprobs_all[rows] = logprobs.detach()
            tokens, clipped = tokens + out.tokens, clipped + out.clipped
            log_ratio_max = torch.maximum(log_ratio_max, out.log_ratio_max)
        return TokenLoss(total, tokens, clipped, log_ratio_max), logprobs_all, kl_total

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        optimizer = self.optimizers()
        advantages = self.advantages(batch)
        behaviour = batch.sampler_logprobs  # None (logged data): the first pass's own log-probs
        tokens, clipped, log_ratio_max = 0, 0, -math.inf
        for update in range(self.updates_per_batch):
            optimizer.zero_grad()
            # Only the epoch's very first update runs on the policy that sampled the batch.
            out, logprobs, kl = self._backward_pass(batch, advantages, behaviour,
                                                    clip=update > 0 or batch_idx > 0)
            if update == 0 and behaviour is None:
                behaviour = logprobs
            elif update == 0 and batch_idx == 0:
                self._log_sampler_gap(batch, logprobs)
            if self.grad_clip > 0:
                self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip,
                                    gradient_clip_algorithm="norm")
            optimizer.step()
            tokens, clipped = tokens + out.tokens, clipped + out.clipped
            log_ratio_max = max(log_ratio_max, float(out.log_ratio_max))
        size = batch.rewards.shape[0]
        loss = out.loss
        self.log(f"policy/{self.policy_name}/loss", loss, batch_size=size, sync_dist=True)
        self.log("train/loss", loss, batch_size=size, sync_dist=True, prog_bar=True)
        if kl is not None:
            self.log("train/kl", kl, batch_size=size, sync_dist=True)
        self.log("train/clip_fraction", float(clipped / max(float(tokens), 1.0)), batch_size=size,
                 sync_dist=True)
        self.log("train/ratio_max", math.exp(min(log_ratio_max, 700.0)), batch_size=size,
                 sync_dist=True, reduce_fx="max")
        gather(self.policy)  # FSDP2: callbacks and sampling until the next batch see whole weights
        return loss

    def _log_sampler_gap(self, batch: RolloutBatch, logprobs: torch.Tensor) -> None:
        """``rollout/sampler_logprob_gap``: mean |log μ - log π_θ| per action token, before any
        update of the epoch (pure sampler/trainer mismatch)."""
        acted = (batch.action_mask & batch.turn_mask[:, :, None]).any(dim=1)
        gap = (batch.sampler_logprobs - logprobs).abs()[acted]
        if gap.numel():
            self.log("rollout/sampler_logprob_gap", gap.mean(), batch_size=batch.rewards.shape[0],
                     on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch: RolloutBatch, batch_idx: int):
        self._log_rewards("val", batch)

    def test_step(self, batch: RolloutBatch, batch_idx: int):
        self._log_rewards("test", batch)

    def _log_rewards(self, stage: str, batch: RolloutBatch):
        size = batch.rewards.shape[0]
        mean, per_turn = masked_turn_means(batch.rewards, batch.turn_mask)
        # a turn no row of this batch reached counts as 0 with weight 0 in the epoch mean
        self.log(f"{stage}/reward_mean", mean.nan_to_num(0.0), batch_size=size, sync_dist=True,
                 prog_bar=True)
        for turn in range(batch.n_turns):
            self.log(f"{stage}/reward_turn{turn}", per_turn[turn].nan_to_num(0.0), batch_size=size,
                     sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        payload = adapter_payload(self.policy, self.spec)
        payload["state"] = full_tensors(payload["state"])  # sharded under FSDP2
        checkpoint[CHECKPOINT_KEY] = payload
