"""Partial policy-gradient surrogate losses (pure torch).

Shapes: ``B`` rollouts, ``n`` agent turns. ``turn_logprobs[b, t]`` is log π(a_t | history), the
sum of the token log-probs of turn ``t``'s action; ``rewards[b, t]`` is that turn's reward.

The surrogate ``loss = -(1/B) Σ_b Σ_t A[b, t] · turn_logprobs[b, t]`` with detached advantages
``A = credit - baseline`` has ``-∇loss`` equal to the Monte-Carlo estimate of the partial policy
gradient ``g_S = E[Σ_t ∇log π(a_t) Σ_{i∈S_t} w_ti r_i]``.

Training uses :func:`token_pg_loss`, the same advantages spread over each turn's tokens with a
per-token importance ratio to the sampler (truncated, PPO-clipped once the policy has moved);
at ratio 1 its gradient is that of :func:`partial_pg_loss`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ppg.subsets import RewardSubset

__all__ = [
    "BASELINES",
    "KL_ESTIMATORS",
    "TokenLoss",
    "advantage_weighted_loss",
    "kl_penalty",
    "masked_turn_means",
    "partial_advantages",
    "partial_pg_loss",
    "token_pg_loss",
]

BASELINES = ("none", "mean", "leave_one_out")
KL_ESTIMATORS = ("k1", "k3")


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor [B, n_turns], got {shape}")


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )


def _as_mask(mask, ref: torch.Tensor, ref_name: str, name: str = "turn_mask") -> torch.Tensor:
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    mask = torch.as_tensor(mask)
    _check_same_shape(name, mask, ref_name, ref)
    return mask.to(device=ref.device, dtype=torch.bool)


def _group_index(group_ids, batch: int, device) -> torch.Tensor:
    """Dense group index in [0, G) per row; None means one group."""
    if group_ids is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    ids = torch.as_tensor(group_ids, device=device)
    if ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape ({batch},), got {tuple(ids.shape)}")
    return torch.unique(ids, return_inverse=True)[1]


def partial_advantages(
    rewards: torch.Tensor,
    subset: RewardSubset,
    baseline: str = "leave_one_out",
    group_ids: torch.Tensor | None = None,
    turn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached advantages ``credit - baseline`` ``[B, n]``; zero on masked turns.

    Baselines, computed per turn over the rollouts of a group (``group_ids`` ``[B]``, None = one
    group) whose turn is valid under ``turn_mask``:

    - ``"none"``: 0.
    - ``"leave_one_out"``: mean credit of the *other* valid rollouts of the group at that turn
      (0 when there is none). Independent of the rollout's own actions, so unbiased.
    - ``"mean"``: mean credit of the valid rollouts of the group *including* itself. Biased: the
      advantage is exactly (G-1)/G times the leave-one-out one for a group of G, so the gradient
      shrinks by that factor.

    Masked turns (``turn_mask`` False) are treated as having no reward and no credit; their
    reward entries may hold anything (even NaN).
    """
    _check_2d("rewards", rewards)
    if not isinstance(subset, RewardSubset):
        raise TypeError(f"subset must be a RewardSubset, got subset={subset!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got baseline={baseline!r}")
    mask = _as_mask(turn_mask, rewards, "rewards")
    group = _group_index(group_ids, rewards.shape[0], rewards.device)

    if not rewards.is_floating_point():
        rewards = rewards.float()
    with torch.no_grad():
        rewards = torch.where(mask, rewards, rewards.new_zeros(()))
        bad = (~torch.isfinite(rewards)).nonzero()
        if len(bad):
            b, t = bad[0].tolist()
            raise ValueError(
                f"rewards must be finite on valid turns, got rewards[{b}, {t}]="
                f"{rewards[b, t].item()}"
            )
        credit = torch.where(mask, subset.credit(rewards), 0.0)
        if baseline == "none":
            return credit

        n_groups = int(group.max()) + 1
        valid = mask.to(credit.dtype)
        sums = credit.new_zeros(n_groups, credit.shape[1]).index_add_(0, group, credit)
        counts = credit.new_zeros(n_groups, credit.shape[1]).index_add_(0, group, valid)
        sums, counts = sums[group], counts[group]
        if baseline == "leave_one_out":
            sums, counts = sums - credit, counts - valid
        base = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        return torch.where(mask, credit - base, 0.0)


def partial_pg_loss(
    turn_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    subset: RewardSubset,
    baseline: str = "leave_one_out",
    group_ids: torch.Tensor | None = None,
    turn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar surrogate ``-(1/B) Σ_b Σ_t A[b, t] · turn_logprobs[b, t]``, A = advantages.

    ``-∇loss`` is the Monte-Carlo estimate of the partial policy gradient for ``subset``. See
    :func:`partial_advantages` for the baselines and ``turn_mask``.
    """
    _check_2d("turn_logprobs", turn_logprobs)
    _check_2d("rewards", rewards)
    _check_same_shape("rewards", rewards, "turn_logprobs", turn_logprobs)
    adv = partial_advantages(rewards, subset, baseline, group_ids, turn_mask)
    return _weighted_logprob_loss(turn_logprobs, adv, _as_mask(turn_mask, rewards, "rewards"))


def advantage_weighted_loss(
    turn_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    turn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-(1/B) Σ_b Σ_t A[b, t] · turn_logprobs[b, t]`` for precomputed ``advantages``.

    Equals :func:`partial_pg_loss` when ``advantages`` come from :func:`partial_advantages` on
    the same batch; lets a large batch be split into micro-batches after the baselines were
    computed over all of it (scale each part by its share of the rows).
    """
    _check_2d("turn_logprobs", turn_logprobs)
    _check_2d("advantages", advantages)
    _check_same_shape("advantages", advantages, "turn_logprobs", turn_logprobs)
    return _weighted_logprob_loss(turn_logprobs, advantages.detach(), _as_mask(turn_mask, turn_logprobs, "turn_logprobs"))


def _weighted_logprob_loss(logprobs, adv, mask) -> torch.Tensor:
    # where() rather than multiply: log-probs of turns that did not happen may be garbage/NaN.
    lp = torch.where(mask, logprobs, logprobs.new_zeros(()))
    return -(adv.to(lp.dtype) * lp).sum() / logprobs.shape[0]


class TokenLoss(NamedTuple):
    """The per-token surrogate (with gradients) and its detached ratio statistics."""

    loss: torch.Tensor  # scalar
    tokens: torch.Tensor  # action tokens of valid turns
    clipped: torch.Tensor  # how many of them the PPO clip zeroed
    log_ratio_max: torch.Tensor  # max log ρ over them (-inf when there is none)


def token_pg_loss(
    token_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    turn_mask: torch.Tensor | None = None,
    clip_eps: float | None = None,
    tis_cap: float | None = None,
) -> TokenLoss:
    """Per-token importance-weighted partial PG surrogate against the sampler's log-probs.

    ``token_logprobs`` ``[B, L]``: log π_θ of each token (with gradients); ``sampler_logprobs``
    ``[B, L]``: log μ under the sampler; ``advantages`` ``[B, n]`` from
    :func:`partial_advantages`; ``action_mask`` ``[B, n, L]`` marks turn t's action tokens.
    Per action token k of turn t, ``log ρ_k = log π_θ(k) - log μ(k)`` and

        loss = -(1/B) Σ_b Σ_t Σ_k A[b, t] · sg(w_k) · log π_θ(k),   w_k = min(ρ_k, tis_cap) · keep_k

    so ``-∇loss`` is Σ A·w·∇log π: the PPO gradient (∇ρ = ρ ∇log π) with the importance weight
    truncated at ``tis_cap`` (None: not truncated). With ``clip_eps``, keep_k = 0 where the clip
    binds — ρ > 1+ε with A > 0, or ρ < 1-ε with A < 0 — else 1. Everything is per token in log
    space, so long turns cannot overflow. With ρ = 1 the gradient is exactly that of
    :func:`partial_pg_loss`.
    """
    for name, x in (("token_logprobs", token_logprobs), ("sampler_logprobs", sampler_logprobs),
                    ("advantages", advantages)):
        _check_2d(name, x)
    _check_same_shape("sampler_logprobs", sampler_logprobs, "token_logprobs", token_logprobs)
    batch, n_turns = advantages.shape
    if action_mask.shape != (batch, n_turns, token_logprobs.shape[1]):
        raise ValueError(f"action_mask must have shape {(batch, n_turns, token_logprobs.shape[1])}, "
                         f"got {tuple(action_mask.shape)}")
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got clip_eps={clip_eps!r}")
    if tis_cap is not None and not tis_cap >= 1:
        raise ValueError(f"tis_cap must be >= 1, got tis_cap={tis_cap!r}")
    turns = _as_mask(turn_mask, advantages, "advantages")
    acted = action_mask.to(torch.bool) & turns[:, :, None]  # [B, n, L]
    valid = acted.any(dim=1)  # [B, L]
    zero = torch.zeros((), dtype=token_logprobs.dtype, device=token_logprobs.device)
    # each token belongs to at most one turn: its turn's advantage, 0 off actions
    adv = torch.einsum("bt,btl->bl", torch.where(turns, advantages.detach(), 0.0).to(zero.dtype),
                       acted.to(zero.dtype))
    # where() rather than multiply: positions off actions may hold garbage/NaN
    logp = torch.where(valid, token_logprobs, zero)
    with torch.no_grad():
        log_ratio = torch.where(valid, logp - sampler_logprobs.to(zero.dtype), zero)
        capped = log_ratio if tis_cap is None else log_ratio.clamp(max=math.log(tis_cap))
        weight = capped.exp()
        clipped = torch.zeros_like(valid)
        if clip_eps is not None:
            clipped = valid & (((adv > 0) & (log_ratio > math.log1p(clip_eps)))
                               | ((adv < 0) & (log_ratio < math.log1p(-clip_eps))))
            weight = torch.where(clipped, zero, weight)
        stats = (valid.sum(), clipped.sum(),
                 torch.where(valid, log_ratio, -math.inf).max() if valid.numel() else zero - math.inf)
    loss = -(adv * weight * logp).sum() / batch
    return TokenLoss(loss, *stats)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3",
) -> torch.Tensor:
    """Sample estimate of KL(π || π_ref) per rollout, averaged over rollouts.

    ``logprobs``/``ref_logprobs`` are log-probs of the sampled tokens (``[B, T]``) or turns
    (``[B, n]``) under the policy and the reference; ``mask`` marks real positions. Per
    position, with ``d = ref - logp``: ``k1 = -d`` (unbiased, can be negative), ``k3 = e^d - d - 1``
    (unbiased for the same KL, always >= 0, usually lower variance). Positions are summed per row (the KL
    of the whole sequence) and rows averaged.

    As a loss term, k3's gradient is in expectation ∇KL(π_ref || π); k1's is zero in expectation,
    so use k1 for logging or as a per-turn reward penalty (rewards - β·(logp - ref)) instead.
    """
    _check_2d("logprobs", logprobs)
    _check_2d("ref_logprobs", ref_logprobs)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got estimator={estimator!r}")
    mask = _as_mask(mask, logprobs, "logprobs", name="mask")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    d = torch.where(mask, ref_logprobs.detach() - logprobs, zero)
    kl = -d if estimator == "k1" else d.exp() - d - 1
    return torch.where(mask, kl, zero).sum() / logprobs.shape[0]


def masked_turn_means(rewards: torch.Tensor, turn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean reward over the turns that happened (scalar) and per turn (``[n]``).

    ``rewards`` and ``turn_mask`` are ``[B, n]``; a turn no row reached has mean NaN, and so
    does the overall mean of a batch where no turn happened.
    """
    _check_2d("rewards", rewards)
    mask = _as_mask(turn_mask, rewards, "rewards").to(rewards.dtype)
    kept = torch.where(mask.bool(), rewards, rewards.new_zeros(()))
    per_turn = kept.sum(0) / mask.sum(0)
    return kept.sum() / mask.sum(), per_turn
