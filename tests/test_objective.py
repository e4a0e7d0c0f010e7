import itertools
import math

import pytest
import torch

from ppg.objective import (
    kl_penalty,
    partial_advantages,
    partial_pg_loss,
    token_pg_loss,
)
from ppg.subsets import (
    CustomMask,
    Discounted,
    FullPlanning,
    Greedy,
    KStepLookahead,
    Segment,
)

DT = torch.float64


# ---- a small tabular multi-turn decision process ------------------------------------------


class TabularProcess:
    """n turns, A actions. π(a_t | a_{t-1}) = softmax(theta[t, a_{t-1}]) (a_{-1} := 0).

    r_t ~ Bernoulli(reward_mean(actions)[:, t]); the mean may depend on a_0..a_t.
    With ``end_action`` set, the conversation ends after the first turn that plays it: later
    turns are masked out (their actions are still drawn, then ignored).
    """

    def __init__(self, theta, reward_mean, end_action=None):
        self.theta = theta
        self.n, self.A = theta.shape[0], theta.shape[-1]
        self.reward_mean = reward_mean
        self.end_action = end_action

    def turn_logprobs(self, theta, actions, rows=None):
        """[N, n] log π(a_t | a_{t-1}); theta [n, A, A], or [M, n, A, A] with rows [N] in [0, M)."""
        if theta.dim() == 3:
            theta, rows = theta[None], torch.zeros(len(actions), dtype=torch.long)
        prev = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)
        logits = theta[rows[:, None], torch.arange(self.n)[None, :], prev]
        return logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)

    def turn_mask(self, actions):
        if self.end_action is None:
            return torch.ones(actions.shape, dtype=torch.bool)
        ended = (actions[:, :-1] == self.end_action).cummax(dim=1).values
        return torch.cat([torch.ones_like(ended[:, :1]), ~ended], dim=1)

    def sample(self, n_samples, gen):
        actions = torch.zeros(n_samples, self.n, dtype=torch.long)
        prev = torch.zeros(n_samples, dtype=torch.long)
        for t in range(self.n):
            probs = self.theta[t, prev].softmax(-1)
            actions[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            prev = actions[:, t]
        rewards = torch.bernoulli(self.reward_mean(actions), generator=gen)
        mask = self.turn_mask(actions)
        # Turns that did not happen carry garbage: the objective must ignore it.
        rewards = torch.where(mask, rewards, torch.tensor(float("nan"), dtype=DT))
        return actions, rewards, mask

    def exact_gradient(self, subset):
        """Σ_τ π(τ) Σ_t ∇log π(a_t) Σ_i w_ti E[r_i | τ] by enumeration of all A^n paths."""
        paths = torch.tensor(list(itertools.product(range(self.A), repeat=self.n)))
        theta = self.theta.clone().requires_grad_()
        lp = self.turn_logprobs(theta, paths)
        mask = self.turn_mask(paths)
        # Masked turns' actions are dummies: summing π over them marginalizes them out.
        prob = lp.sum(1).exp().detach()
        credit = subset.credit(self.reward_mean(paths) * mask) * mask
        surrogate = (prob[:, None] * lp * credit).sum()
        return torch.autograd.grad(surrogate, theta)[0]


def mc_gradient(proc, subset, baseline, actions, rewards, mask, group_size):
    """MC estimate -∇partial_pg_loss and its standard error from per-group estimates."""
    n_groups = len(actions) // group_size
    group = torch.arange(n_groups).repeat_interleave(group_size)
    # One copy of theta per group: the gradient w.r.t. copy g is group g's contribution alone.
    theta = proc.theta.expand(n_groups, *proc.theta.shape).clone().requires_grad_()
    lp = proc.turn_logprobs(theta, actions, group)
    loss = partial_pg_loss(lp, rewards, subset, baseline, group_ids=group, turn_mask=mask)
    per_group = torch.autograd.grad(-loss, theta)[0] * n_groups
    return per_group.mean(0), per_group.std(0) / math.sqrt(n_groups)


def history_process(seed=0, n=3, A=3, end_action=None):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, A, A, generator=gen, dtype=DT)
    # Bernoulli mean of r_t depends on the whole history a_0..a_t.
    tables = [torch.rand((A,) * (t + 1), generator=gen, dtype=DT) for t in range(n)]

    def reward_mean(actions):
        return torch.stack([tables[t][tuple(actions[:, : t + 1].T)] for t in range(n)], dim=1)

    return TabularProcess(theta, reward_mean, end_action)


SUBSETS = [
    FullPlanning(),
    Greedy(),
    KStepLookahead(2),
    Segment(boundaries=[0, 2]),
    Discounted(0.7),
    CustomMask([[1.0, 0.0, 0.5], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]),
]
N_SAMPLES, GROUP = 40_000, 4


@pytest.fixture(scope="module")
def history_samples():
    proc = history_process(seed=0)
    return proc, proc.sample(N_SAMPLES, torch.Generator().manual_seed(1))


def _z_max(est, se, exact):
    z = (est - exact).abs() / se.clamp(min=1e-12)
    return z[se > 0].max().item()


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: s.name)
def test_unbiased_against_exact_enumeration(history_samples, subset, baseline):
    proc, (actions, rewards, mask) = history_samples
    exact = proc.exact_gradient(subset)
    est, se = mc_gradient(proc, subset, baseline, actions, rewards, mask, GROUP)
    assert exact.abs().max() > 0.05  # a real signal, not a vacuous match
    assert torch.all((est - exact).abs() <= 4 * se + 1e-10), (
        f"{subset.name}/{baseline}: max |z| = {_z_max(est, se, exact):.2f}"
    )


def test_leave_one_out_reduces_standard_error(history_samples):
    proc, (actions, rewards, mask) = history_samples
    ratios = {}
    for subset in [FullPlanning(), Greedy()]:
        _, se_none = mc_gradient(proc, subset, "none", actions, rewards, mask, GROUP)
        _, se_loo = mc_gradient(proc, subset, "leave_one_out", actions, rewards, mask, GROUP)
        ratios[subset.name] = (se_loo.norm() / se_none.norm()).item()
    assert all(r < 0.9 for r in ratios.values()), f"SE(loo)/SE(none): {ratios}"


def test_enumeration_test_has_power(history_samples):
    """The 4-SE check above rejects the estimate of a neighbouring class."""
    proc, (actions, rewards, mask) = history_samples
    est, se = mc_gradient(proc, FullPlanning(), "leave_one_out", actions, rewards, mask, GROUP)
    for other in [Greedy(), KStepLookahead(2), Discounted(0.7)]:
        z = _z_max(est, se, proc.exact_gradient(other))
        assert z > 8, f"full vs exact {other.name}: max |z| = {z:.2f}"


def test_mean_baseline_is_biased_by_group_factor(history_samples):
    """Including self in the baseline shrinks the gradient by (G-1)/G; the test can see it."""
    proc, (actions, rewards, mask) = history_samples
    exact = proc.exact_gradient(FullPlanning())
    est, se = mc_gradient(proc, FullPlanning(), "mean", actions, rewards, mask, GROUP)
    shrunk = exact * (GROUP - 1) / GROUP
    assert torch.all((est - shrunk).abs() <= 4 * se + 1e-10)
    assert _z_max(est, se, exact) > 6, "bias of the mean baseline should be detectable"


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
@pytest.mark.parametrize("subset", [FullPlanning(), Greedy(), KStepLookahead(2)], ids=str)
def test_unbiased_with_early_ending_conversations(subset, baseline):
    """Action 2 ends the conversation: later turns are masked out (NaN rewards there)."""
    proc = history_process(seed=3, end_action=2)
    actions, rewards, mask = proc.sample(N_SAMPLES, torch.Generator().manual_seed(4))
    assert 0.2 < (~mask).float().mean() < 0.5
    exact = proc.exact_gradient(subset)
    est, se = mc_gradient(proc, subset, baseline, actions, rewards, mask, GROUP)
    assert torch.all((est - exact).abs() <= 4 * se + 1e-10), (
        f"{subset.name}/{baseline}: max |z| = {_z_max(est, se, exact):.2f}"
    )


# ---- variance ordering --------------------------------------------------------------------


def test_variance_greedy_below_kstep_below_full():
    """Independent noisy per-turn rewards, n=8: fewer reward terms, lower variance."""
    n, n_samples = 8, 20_000
    gen = torch.Generator().manual_seed(0)
    theta = 0.5 * torch.randn(n, 2, generator=gen, dtype=DT)
    mu = torch.rand(n, 2, generator=gen, dtype=DT)
    actions = torch.multinomial(theta.softmax(-1), n_samples, True, generator=gen).T
    rewards = mu[torch.arange(n), actions] + torch.randn(n_samples, n, generator=gen, dtype=DT)

    variances = {}
    for subset in [Greedy(), KStepLookahead(3), FullPlanning()]:
        # One theta copy per sample gives per-sample gradient estimates.
        theta_rep = theta.expand(n_samples, n, 2).clone().requires_grad_()
        logits = theta_rep[torch.arange(n_samples)[:, None], torch.arange(n)[None, :]]
        lp = logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)
        loss = partial_pg_loss(lp, rewards, subset, baseline="none")
        per_sample = torch.autograd.grad(-loss, theta_rep)[0] * n_samples
        variances[subset.name] = per_sample.var(0).sum().item()  # trace of the covariance

    msg = ", ".join(f"{k}={v:.3f}" for k, v in variances.items())
    assert variances["greedy"] < variances["k3"] < variances["full"], msg
    assert variances["full"] > 2 * variances["greedy"], msg


# ---- greedy is not full planning ----------------------------------------------------------


def test_greedy_ignores_delayed_payoff():
    """a_0 = 1 only pays off at the last turn; turn 0's own reward is a constant."""
    gen = torch.Generator().manual_seed(0)
    theta = 0.5 * torch.randn(3, 2, 2, generator=gen, dtype=DT)

    def reward_mean(actions):
        r = torch.full(actions.shape, 0.5, dtype=DT)
        r[:, 2] = (actions[:, 0] == 1).to(DT)
        return r

    proc = TabularProcess(theta, reward_mean)
    p1 = theta[0, 0].softmax(-1)[1].item()
    grads = {
        s.name: proc.exact_gradient(s)[0, 0, 1].item()
        for s in [Greedy(), KStepLookahead(2), KStepLookahead(3), FullPlanning()]
    }
    assert grads["greedy"] == pytest.approx(0.0, abs=1e-7)
    assert grads["k2"] == pytest.approx(0.0, abs=1e-7)
    assert grads["full"] == pytest.approx(p1 * (1 - p1), abs=1e-12)  # d/dθ P(a_0 = 1)
    assert grads["full"] > 0.1
    assert grads["k3"] == pytest.approx(grads["full"], abs=1e-12)


# ---- baselines on hand examples -----------------------------------------------------------

R = torch.tensor([[1.0, 0.0], [2.0, 4.0], [6.0, 8.0], [3.0, 5.0]])
GROUPS = torch.tensor([7, 7, 7, 2])  # any ids; row 3 is alone in its group


def test_leave_one_out_excludes_self():
    adv = partial_advantages(R, Greedy(), "leave_one_out", GROUPS)
    # turn 0, group {1, 2, 6}: row 0 vs mean(2, 6) = 4, row 1 vs 3.5, row 2 vs 1.5; row 3 alone
    expected = torch.tensor([[-3.0, -6.0], [-1.5, 0.0], [4.5, 6.0], [3.0, 5.0]])
    assert torch.equal(adv, expected)


def test_mean_includes_self():
    adv = partial_advantages(R, Greedy(), "mean", GROUPS)
    expected = torch.tensor([[-2.0, -4.0], [-1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert torch.equal(adv, expected)
    # within a full group of G, mean = (G-1)/G * leave_one_out
    loo = partial_advantages(R, Greedy(), "leave_one_out", GROUPS)
    assert torch.equal(adv[:3], loo[:3] * 2 / 3)


def test_no_baseline_and_single_group_default():
    assert torch.equal(partial_advantages(R, FullPlanning(), "none"), FullPlanning().credit(R))
    adv = partial_advantages(R, Greedy(), "leave_one_out")  # group_ids None: one group of 4
    assert adv[0, 0].item() == pytest.approx(1.0 - (2 + 6 + 3) / 3)


def test_turn_mask_zeroes_and_excludes():
    r = R.clone()
    r[1, 1] = float("nan")  # turn 1 of row 1 did not happen
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[1, 1] = False
    loo = partial_advantages(r, Greedy(), "leave_one_out", GROUPS, mask)
    # turn 1, group: valid rows 0 and 2 only -> each one's baseline is the other's reward
    assert torch.equal(loo[:, 1], torch.tensor([-8.0, 0.0, 8.0, 5.0]))
    assert torch.equal(loo[:, 0], torch.tensor([-3.0, -1.5, 4.5, 3.0]))
    mean = partial_advantages(r, Greedy(), "mean", GROUPS, mask)
    assert torch.equal(mean[:, 1], torch.tensor([-4.0, 0.0, 4.0, 0.0]))
    # full planning: row 1's turn-0 credit only holds its turn-0 reward
    full = partial_advantages(r, FullPlanning(), "none", GROUPS, mask)
    assert torch.equal(full[1], torch.tensor([2.0, 0.0]))

    lp = torch.randn(4, 2, dtype=torch.float32)
    lp[1, 1] = float("nan")
    lp.requires_grad_()
    loss = partial_pg_loss(lp, r, Greedy(), "leave_one_out", GROUPS, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(lp.grad, -loo / 4)


def test_loss_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(6, 3, generator=gen).requires_grad_()
    r = torch.rand(6, 3, generator=gen).requires_grad_()
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    subset = Discounted(0.5)
    loss = partial_pg_loss(lp, r, subset, "leave_one_out", groups)
    adv = partial_advantages(r, subset, "leave_one_out", groups)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(-(adv * lp).sum().item() / 6, rel=1e-6)
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 6)
    assert r.grad is None  # advantages are detached
    assert not adv.requires_grad


# ---- validation ---------------------------------------------------------------------------


def test_validation_messages():
    lp, r = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"rewards must have the shape of turn_logprobs"):
        partial_pg_loss(lp, torch.zeros(4, 2), Greedy())
    with pytest.raises(ValueError, match=r"turn_logprobs must be a 2-D tensor"):
        partial_pg_loss(torch.zeros(4), r, Greedy())
    with pytest.raises(ValueError, match=r"turn_mask must have the shape"):
        partial_pg_loss(lp, r, Greedy(), turn_mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(4,\), got \(3,\)"):
        partial_pg_loss(lp, r, Greedy(), group_ids=torch.zeros(3))
    with pytest.raises(ValueError, match=r"baseline must be one of .*got baseline='median'"):
        partial_pg_loss(lp, r, Greedy(), baseline="median")
    for bad in [float("nan"), float("inf")]:
        r_bad = r.clone()
        r_bad[2, 1] = bad
        with pytest.raises(ValueError, match=rf"rewards must be finite.*rewards\[2, 1\]={bad}"):
            partial_pg_loss(lp, r_bad, Greedy())
    with pytest.raises(TypeError, match=r"subset must be a RewardSubset"):
        partial_pg_loss(lp, r, "greedy")
    tok, actions = torch.zeros(4, 5), torch.zeros(4, 3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"clip_eps must be in \(0, 1\), got clip_eps=0"):
        token_pg_loss(tok, tok, r, actions, clip_eps=0)
    with pytest.raises(ValueError, match=r"tis_cap must be >= 1, got tis_cap=0.5"):
        token_pg_loss(tok, tok, r, actions, tis_cap=0.5)
    with pytest.raises(ValueError, match=r"sampler_logprobs must have the shape of token_logprobs"):
        token_pg_loss(tok, torch.zeros(4, 4), r, actions)
    with pytest.raises(ValueError, match=r"action_mask must have shape \(4, 3, 5\), got \(4, 2, 5\)"):
        token_pg_loss(tok, tok, r, actions[:, :2])
    with pytest.raises(ValueError, match=r"estimator must be one of .*got estimator='k2'"):
        kl_penalty(lp, lp, estimator="k2")
    with pytest.raises(ValueError, match=r"mask must have the shape of logprobs"):
        kl_penalty(lp, lp, mask=torch.ones(4, 2, dtype=torch.bool))


# ---- PPO-style clipping (per token) ------------------------------------------------------


def test_clipping_stops_gradient_outside_trust_region():
    # one turn per token; log-ratios to the sampler 0.5 (ρ > 1.2), 0.5, -0.5 (ρ < 0.8), -0.5
    lp = torch.tensor([[0.5, 0.5, -0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    actions = torch.eye(4, dtype=torch.bool)[None]
    out = token_pg_loss(lp, torch.zeros(1, 4), adv, actions, clip_eps=0.2)
    out.loss.backward()
    e = math.exp(0.5)
    # clipped where pushing further would help: (ratio>1+eps, A>0) and (ratio<1-eps, A<0);
    # elsewhere the gradient is A·ρ, PPO's
    assert torch.allclose(lp.grad, torch.tensor([[0.0, e, -1 / e, 0.0]]))
    assert (out.tokens.item(), out.clipped.item(), out.log_ratio_max.item()) == (4, 2, 0.5)


# ---- KL penalty ---------------------------------------------------------------------------


def test_kl_estimators_hand_values_and_mask():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 9.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    d = torch.tensor([-0.5, 1.0])
    assert kl_penalty(lp, ref, mask, "k1").item() == pytest.approx((0.5 - 1.0) / 2)
    k3 = (d.exp() - d - 1).sum() / 2
    assert kl_penalty(lp, ref, mask, "k3").item() == pytest.approx(k3.item())
    assert kl_penalty(lp, lp, estimator="k3").item() == 0.0


def test_kl_estimators_unbiased_and_k3_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=gen, dtype=DT).requires_grad_()
    ref = torch.randn(5, generator=gen, dtype=DT).log_softmax(-1)
    logp = logits.log_softmax(-1)
    p = logp.exp().detach()
    exact_kl = (p * (logp.detach() - ref)).sum().item()

    x = torch.multinomial(p, 200_000, replacement=True, generator=gen).view(100, 2000)
    lp_s, ref_s = logp.detach()[x][..., None], ref[x][..., None]
    for est in ["k1", "k3"]:
        # 100 chunks of 2000 rows: each chunk's value is one estimate of the KL
        chunks = torch.stack([kl_penalty(a, b, estimator=est) for a, b in zip(lp_s, ref_s)])
        mc, se = chunks.mean().item(), chunks.std().item() / 10
        assert abs(mc - exact_kl) < 4 * se, f"{est}: {mc:.4f} vs exact {exact_kl:.4f} (se {se:.4f})"

    # E_π[∇ k3] = ∇ KL(π_ref || π), exactly, by enumeration over the 5 outcomes
    per_outcome = logp[:, None]
    k3 = torch.stack([kl_penalty(per_outcome[i : i + 1], ref[i : i + 1, None]) for i in range(5)])
    g_k3 = torch.autograd.grad((p * k3).sum(), logits, retain_graph=True)[0]
    reverse = (ref.exp() * (ref - logp)).sum()
    g_rev = torch.autograd.grad(reverse, logits)[0]
    assert torch.allclose(g_k3, g_rev, atol=1e-12)


def test_masked_turn_means_skip_turns_that_did_not_happen():
    from ppg.objective import masked_turn_means

    rewards = torch.tensor([[1.0, 0.5, float("nan")], [0.0, 0.25, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    mean, per_turn = masked_turn_means(rewards, mask)
    assert mean.item() == pytest.approx(1.75 / 4)
    assert per_turn[:2].tolist() == [0.5, 0.375] and math.isnan(per_turn[2].item())
