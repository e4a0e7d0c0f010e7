"""A tabular multi-turn process where each policy class's gradient is known exactly.

``DelayedAsk``: ``n`` turns; at every turn the agent asks (``a_t = 1``) with probability
``p = sigmoid(θ)`` from one shared logit θ, independently of the history. Asking costs ``cost``
at that turn and pays ``payoff`` ``delay`` turns later, on turn ``t + delay``; a payoff that
would land at or after turn ``n`` is lost (the conversation is over). Every turn's reward gets
independent ``N(0, σ²)`` noise::

    r_i = -cost · a_i + payoff · a_{i-delay} · [i >= delay] + σ ε_i

Asking is worth it iff ``payoff · max(n - delay, 0) > cost · n``. Greedy (S_t = {t}) only sees
the cost and learns not to ask; ``k{delay+1}`` and ``full`` see the payoff, ``full`` with every
later turn's noise added to each credit.

Exact moments (``v = p(1-p)``, ``u_t = a_t - p = ∂θ log π(a_t)``, ``W`` the subset's ``[n, n]``
weights, ``R`` the ``[n, n]`` action→mean-reward matrix, ``M = W R``)::

    g_S        = v · tr(M) = v · Σ_t (payoff · W[t, t+delay] - cost · W[t, t])
    Var_oracle = (μ4 - v²) Σ_i M_ii² + 4 v² Σ_{i<j} A_ij² + σ² v ‖W‖_F²,   A = (M + Mᵀ)/2

``Var_oracle`` is the per-rollout variance with the ideal baseline E[credit]; the noise term
``σ² v ‖W‖_F²`` grows with the number of rewards in the subsets (n for greedy, n(n+1)/2 for
full). :func:`expected_gradient_and_variance` also gives the exact variance of the
leave-one-out estimator used in training (a U-statistic over the group).

:func:`train` runs hundreds of seeds as one batch through the real
:func:`ppg.objective.partial_pg_loss`. :func:`seeds_needed` and :func:`resolvable_effect` turn a
per-seed spread into a seed budget for a paired 95 % Student-t interval.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ppg.objective import partial_pg_loss
from ppg.subsets import RewardSubset, subset_from_name

__all__ = [
    "DelayedAsk",
    "TrainResult",
    "as_subset",
    "expected_gradient_and_variance",
    "resolvable_effect",
    "sample_gradients",
    "seeds_needed",
    "t_quantile",
    "train",
]


def as_subset(subset: RewardSubset | str) -> RewardSubset:
    """A RewardSubset from itself or a short name (``"greedy"``, ``"k2"``, ``"full"``, ...)."""
    return subset if isinstance(subset, RewardSubset) else subset_from_name(subset)


@dataclass(frozen=True)
class DelayedAsk:
    """The DelayedAsk process (see the module docstring); all turns 0-indexed."""

    n: int
    delay: int = 1
    cost: float = 0.25
    payoff: float = 1.0
    sigma: float = 1.0

    def __post_init__(self):
        if self.n < 1 or self.delay < 0 or self.sigma < 0:
            raise ValueError(f"DelayedAsk: need n >= 1, delay >= 0, sigma >= 0, got {self}")

    def reward_matrix(self, dtype=torch.float64) -> torch.Tensor:
        """``[n, n]`` R with ``E[r | a] = R a``: R[i, i] = -cost, R[i, i-delay] += payoff."""
        idx = torch.arange(self.n)
        r = torch.zeros(self.n, self.n, dtype=dtype)
        r[idx, idx] = -self.cost
        src = idx[: max(self.n - self.delay, 0)]
        r[src + self.delay, src] += self.payoff
        return r

    def rewards(self, actions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Rewards ``[..., n]`` from 0/1 actions ``[..., n]`` and N(0, 1) noise ``[..., n]``."""
        mean = actions.to(noise.dtype) @ self.reward_matrix(noise.dtype).T
        return mean + self.sigma * noise

    def expected_return(self, p: torch.Tensor | float) -> torch.Tensor:
        """Exact expected total reward of a conversation when asking with probability ``p``."""
        gain = self.payoff * max(self.n - self.delay, 0) - self.cost * self.n
        return torch.as_tensor(p, dtype=torch.float64) * gain


def _quad_var(m: torch.Tensor, var: float, fourth: float) -> float:
    """Var(xᵀ M x) for x with iid, zero-mean, symmetric-or-not entries: var, 4th moment."""
    a = (m + m.T) / 2
    off = a.triu(1)
    return float(m.diagonal().pow(2).sum() * (fourth - var**2) + 4 * var**2 * off.pow(2).sum())


def expected_gradient_and_variance(
    subset: RewardSubset | str,
    n: int,
    delay: int = 1,
    cost: float = 0.25,
    payoff: float = 1.0,
    sigma: float = 1.0,
    p: float = 0.5,
    baseline: str = "oracle",
    group_size: int = 4,
) -> tuple[float, float]:
    """Exact ``(E[ĝ], per-rollout variance)`` of the subset's estimate of ∂J/∂θ in DelayedAsk.

    ``baseline``: ``"oracle"`` (credit minus its exact mean), ``"none"``, or ``"leave_one_out"``
    in groups of ``group_size``. The variance is per rollout: a batch of B rollouts (B a
    multiple of ``group_size``) has variance ``var / B``. The expected gradient is the same for
    every baseline.
    """
    proc = DelayedAsk(n, delay, cost, payoff, sigma)
    w = as_subset(subset).weights(n).to(torch.float64)
    m = w @ proc.reward_matrix()
    v = p * (1 - p)
    mu4 = v * (1 - 3 * v)  # E[(a - p)^4] for a ~ Bernoulli(p)
    grad = v * float(m.trace())
    noise = sigma**2 * float(w.pow(2).sum())
    oracle = _quad_var(m, v, mu4) + noise * v
    if baseline == "oracle":
        return grad, oracle
    if baseline == "none":
        mean_credit = p * m.sum(1)
        kappa3 = v * (1 - 2 * p)  # E[(a - p)^3]
        extra = v * mean_credit.pow(2).sum() + 2 * kappa3 * (m.diagonal() * mean_credit).sum()
        return grad, oracle + float(extra)
    if baseline == "leave_one_out":
        g = group_size
        if g < 2:
            raise ValueError(f"leave_one_out needs group_size >= 2, got {group_size}")
        # Group estimate = U-statistic with kernel h = ½ (u_j - u_k)·(C_j - C_k).
        zeta1 = oracle / 4
        d4 = 2 * mu4 + 6 * v**2  # E[(u_j - u_k)^4]
        zeta2 = (_quad_var(m, 2 * v, d4) + noise * 4 * v) / 4
        var_group = (2 * (g - 2) * zeta1 + zeta2) / math.comb(g, 2)
        return grad, g * var_group
    raise ValueError(f"baseline must be oracle, none or leave_one_out, got {baseline!r}")


def _batch_gradient(
    proc: DelayedAsk,
    subset: RewardSubset,
    theta: torch.Tensor,
    rollouts: int,
    group_size: int,
    generator: torch.Generator,
    baseline: str = "leave_one_out",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch per seed; returns ``(-loss·S, rewards [S, B, n])`` with ∂(-loss·S)/∂θ_s = ĝ_s.

    ``theta`` ``[S]`` (requires grad). Draws (uniforms, noise) depend only on the generator
    state and shapes, so every subset sees the same random numbers (common random numbers).
    """
    s, b, n = theta.shape[0], rollouts, proc.n
    uni = torch.rand(s, b, n, generator=generator, dtype=torch.float64)
    eps = torch.randn(s, b, n, generator=generator, dtype=torch.float64)
    p = torch.sigmoid(theta.detach())
    ask = uni < p[:, None, None]
    rewards = proc.rewards(ask, eps)
    lp = torch.where(ask, torch.nn.functional.logsigmoid(theta)[:, None, None],
                     torch.nn.functional.logsigmoid(-theta)[:, None, None])
    groups = torch.arange(s * b) // group_size
    loss = partial_pg_loss(lp.reshape(s * b, n), rewards.reshape(s * b, n), subset,
                           baseline=baseline, group_ids=groups)
    return -loss * s, rewards


def sample_gradients(
    proc: DelayedAsk,
    subset: RewardSubset | str,
    theta: float = 0.0,
    batches: int = 1000,
    rollouts: int = 8,
    group_size: int = 4,
    seed: int = 0,
    baseline: str = "leave_one_out",
) -> torch.Tensor:
    """``[batches]`` Monte-Carlo gradients ``-∂ partial_pg_loss / ∂θ`` at a fixed θ.

    Each entry is the estimate from one batch of ``rollouts`` rollouts.
    """
    gen = torch.Generator().manual_seed(seed)
    th = torch.full((batches,), float(theta), dtype=torch.float64, requires_grad=True)
    obj, _ = _batch_gradient(proc, as_subset(subset), th, rollouts, group_size, gen, baseline)
    (grad,) = torch.autograd.grad(obj, th)
    return grad


@dataclass
class TrainResult:
    """Per-seed trajectories. ``p``: ``[updates + 1, seeds]`` P(ask) before each update and
    after the last; ``reward``: ``[updates, seeds]`` mean total reward of each update's batch."""

    p: torch.Tensor
    reward: torch.Tensor

    @property
    def final_p(self) -> torch.Tensor:
        """``[seeds]`` P(ask) after the last update."""
        return self.p[-1]


def train(
    proc: DelayedAsk,
    subset: RewardSubset | str,
    seeds: int = 400,
    updates: int = 8,
    rollouts: int = 8,
    group_size: int = 4,
    lr: float = 0.2,
    optimizer: str = "adam",
    theta0: float = 0.0,
    seed: int = 0,
    baseline: str = "leave_one_out",
) -> TrainResult:
    """Train one logit per seed, all seeds as a batch, with ``partial_pg_loss`` updates.

    Each update draws ``rollouts`` rollouts per seed (groups of ``group_size`` share the
    leave-one-out baseline) and takes one ``optimizer`` step (``"adam"`` or ``"sgd"``) of
    size ``lr``. Seeds are independent (Adam and SGD act per coordinate). The same ``seed``
    gives every subset the same random numbers.
    """
    if rollouts % group_size:
        raise ValueError(f"rollouts={rollouts} must be a multiple of group_size={group_size}")
    sub = as_subset(subset)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.full((seeds,), float(theta0), dtype=torch.float64, requires_grad=True)
    if optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD([theta], lr=lr)
    else:
        raise ValueError(f"optimizer must be adam or sgd, got {optimizer!r}")
    ps, rewards = [torch.sigmoid(theta.detach()).clone()], []
    for _ in range(updates):
        obj, r = _batch_gradient(proc, sub, theta, rollouts, group_size, gen, baseline)
        opt.zero_grad(set_to_none=True)
        (-obj).backward()
        opt.step()
        ps.append(torch.sigmoid(theta.detach()).clone())
        rewards.append(r.sum(-1).mean(-1))
    return TrainResult(p=torch.stack(ps), reward=torch.stack(rewards))


# ---- power analysis (stdlib only) -----------------------------------------------------------


def _t_cdf_upper_half(x: float, df: int, steps: int = 2000) -> float:
    """P(0 <= T <= x) for Student t with ``df`` degrees of freedom (Simpson's rule)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = x / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t (``q`` in (0.5, 1)), e.g. ``t_quantile(0.975, 4) = 2.776``."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf_upper_half(hi, df) < q - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_upper_half(mid, df) < q - 0.5 else (lo, mid)
    return (lo + hi) / 2


def resolvable_effect(sd: float, seeds: int, level: float = 0.95) -> float:
    """Half-width ``t · sd / sqrt(seeds)`` of the paired interval: smaller mean differences
    are not resolved (the interval holds 0) with ``seeds`` seeds of per-seed spread ``sd``."""
    return t_quantile(0.5 + level / 2, seeds - 1) * sd / math.sqrt(seeds)


def seeds_needed(effect: float, sd: float, level: float = 0.95, max_seeds: int = 100_000) -> int:
    """Fewest seeds (>= 2) whose paired interval half-width is below ``|effect|``."""
    if sd <= 0:
        return 2
    if effect == 0:
        return max_seeds
    z = t_quantile(0.5 + level / 2, 10_000)
    k = max(2, math.ceil((z * sd / abs(effect)) ** 2))  # normal approximation, then walk up
    while k < max_seeds and resolvable_effect(sd, k, level) >= abs(effect):
        k += 1
    return k
