"""Tabular theory (ppg.theory) and the tabular study tool: exact moments against Monte Carlo."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ppg.objective import partial_pg_loss
from ppg.subsets import FullPlanning, Greedy, KStepLookahead
from ppg.theory import (
    DelayedAsk,
    expected_gradient_and_variance,
    resolvable_effect,
    sample_gradients,
    seeds_needed,
    t_quantile,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster and does not fight other jobs for the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _enumerate_gradient(subset, proc: DelayedAsk, p: float) -> float:
    """E[-∂ partial_pg_loss/∂θ] by exact enumeration over all 2^n action sequences.

    Noise has mean zero and enters the credit linearly, so it drops out of the expectation.
    """
    n = proc.n
    acts = torch.tensor([[(k >> t) & 1 for t in range(n)] for k in range(2**n)], dtype=torch.bool)
    pa = torch.tensor(p, dtype=torch.float64)
    prob = torch.where(acts, pa, 1 - pa).prod(1)
    theta = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)
    lp = torch.where(acts, torch.nn.functional.logsigmoid(theta),
                     torch.nn.functional.logsigmoid(-theta))
    rewards = proc.rewards(acts, torch.zeros(2**n, n, dtype=torch.float64))
    # One rollout per row, no baseline; weight each row by its probability (times B = 2^n).
    loss = partial_pg_loss(lp * prob[:, None] * 2**n, rewards, subset, baseline="none")
    (g,) = torch.autograd.grad(-loss, theta)
    return float(g)


@pytest.mark.parametrize("subset", [Greedy(), KStepLookahead(2), KStepLookahead(3), FullPlanning()])
@pytest.mark.parametrize("delay", [1, 2])
def test_expected_gradient_matches_enumeration(subset, delay):
    proc = DelayedAsk(5, delay, cost=0.25, payoff=1.0, sigma=0.0)
    for p in (0.5, 0.3):
        exact, _ = expected_gradient_and_variance(subset, 5, delay, 0.25, 1.0, 0.0, p)
        assert exact == pytest.approx(_enumerate_gradient(subset, proc, p), abs=1e-12)


def test_expected_gradient_closed_form_numbers():
    # n=6, delay=1, cost=0.25, payoff=1, p=0.5: v = 0.25.
    g = {s: expected_gradient_and_variance(s, 6, 1)[0] for s in ("greedy", "k2", "k3", "full")}
    assert g["greedy"] == pytest.approx(0.25 * (-0.25 * 6))  # -0.375: sees the cost only
    assert g["k2"] == pytest.approx(0.25 * (-0.25 * 6 + 5))  # 0.875: cost + 5 paid asks
    assert g["k3"] == pytest.approx(g["k2"])
    assert g["full"] == pytest.approx(g["k2"])
    # The last `delay` asks are never paid: true dJ/dθ = v (payoff (n - delay) - cost n).
    assert g["full"] == pytest.approx(
        0.25 * float(DelayedAsk(6, 1).expected_return(1.0)))


@pytest.mark.parametrize("delay", [1, 2])
def test_sign_of_expected_gradient(delay):
    for n in (4, 8, 16):
        greedy, _ = expected_gradient_and_variance("greedy", n, delay, 0.25, 1.0, 1.0)
        right, _ = expected_gradient_and_variance(f"k{delay + 1}", n, delay, 0.25, 1.0, 1.0)
        assert greedy < 0 < right
    if delay == 2:  # k2 does not reach the payoff two turns later: same as greedy
        assert expected_gradient_and_variance("k2", 8, 2)[0] == pytest.approx(
            expected_gradient_and_variance("greedy", 8, 2)[0])


@pytest.mark.parametrize("baseline", ["oracle", "leave_one_out", "none"])
def test_variance_ordering(baseline):
    for sigma in (0.5, 1.0, 4.0):
        v = [expected_gradient_and_variance(s, 12, 1, sigma=sigma, baseline=baseline)[1]
             for s in ("greedy", "k2", "k3", "full")]
        assert v[0] < v[1] < v[2] < v[3]


def test_noise_part_of_variance_counts_reward_terms():
    # Var_oracle(σ) - Var_oracle(0) = σ² v · (number of rewards in all subsets).
    n, sigma = 8, 2.0
    for name, terms in (("greedy", n), ("k2", 2 * n - 1), ("full", n * (n + 1) // 2)):
        v1 = expected_gradient_and_variance(name, n, 1, sigma=sigma)[1]
        v0 = expected_gradient_and_variance(name, n, 1, sigma=0.0)[1]
        assert v1 - v0 == pytest.approx(sigma**2 * 0.25 * terms)


@pytest.mark.parametrize("name", ["greedy", "k2", "full"])
@pytest.mark.parametrize("baseline", ["leave_one_out", "none"])
def test_monte_carlo_gradient_matches_exact(name, baseline):
    """Mean and variance of -∇partial_pg_loss over 40k batches of 8 equal the exact ones."""
    proc, p, batches, b = DelayedAsk(6, 1, sigma=1.0), 0.3, 40_000, 8
    g = sample_gradients(proc, name, theta=math.log(p / (1 - p)), batches=batches, rollouts=b,
                         group_size=4, seed=1, baseline=baseline)
    mean, var = expected_gradient_and_variance(name, 6, 1, sigma=1.0, p=p, baseline=baseline)
    se = math.sqrt(var / b / batches)
    assert float(g.mean()) == pytest.approx(mean, abs=4 * se)
    # Variance of a sample variance: relative s.e. about sqrt(2 / batches) (+ kurtosis): 5 %.
    assert float(g.var()) * b == pytest.approx(var, rel=0.05)


def test_train_is_deterministic_and_moves_the_right_way():
    proc = DelayedAsk(8, 1, sigma=1.0)
    a = train(proc, "k2", seeds=64, updates=4, rollouts=8, seed=3)
    b = train(proc, "k2", seeds=64, updates=4, rollouts=8, seed=3)
    c = train(proc, "k2", seeds=64, updates=4, rollouts=8, seed=4)
    assert a.p.shape == (5, 64) and a.reward.shape == (4, 64)
    assert torch.equal(a.p, b.p) and torch.equal(a.reward, b.reward)
    assert not torch.equal(a.p, c.p)
    assert torch.all(a.p[0] == 0.5)
    greedy = train(proc, "greedy", seeds=64, updates=4, rollouts=8, seed=3)
    assert float(a.final_p.mean()) > 0.6
    assert float(greedy.final_p.mean()) < 0.4


def test_train_reproduces_the_quick_check():
    """delay 1, n=12, σ=2, B=8 in groups of 4, 8 Adam updates: k2 > full > 0.5 > greedy."""
    proc = DelayedAsk(12, 1, sigma=2.0)
    p = {s: float(train(proc, s, seeds=400, updates=8, rollouts=8, seed=0).final_p.mean())
         for s in ("greedy", "k2", "full")}
    assert p["k2"] > p["full"] + 0.04
    assert p["full"] > 0.6
    assert p["greedy"] < 0.4


def test_power_analysis_numbers():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 1000) == pytest.approx(1.9623, abs=1e-4)
    # 5 seeds resolve a mean paired difference above 2.776 sd / sqrt(5) = 1.24 sd.
    assert resolvable_effect(1.0, 5) == pytest.approx(2.7764 / math.sqrt(5), abs=1e-4)
    k = seeds_needed(0.5, 1.0)
    assert resolvable_effect(1.0, k) < 0.5 <= resolvable_effect(1.0, k - 1)
    assert k == 18


def _load_tool():
    spec = importlib.util.spec_from_file_location("tabular_study",
                                                  ROOT / "tools" / "tabular_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tabular_study_tool_writes_csv_json_png(tmp_path):
    tool = _load_tool()
    argv = ["--n", "2,6", "--sigma", "0,2", "--delay", "1", "--rollouts", "8",
            "--policies", "greedy,k2,full", "--seeds", "50", "--updates", "3",
            "--out", str(tmp_path), "--quiet"]
    rows = tool.main(argv)
    assert len(rows) == 2 * 2 * 3
    with open(tmp_path / "tabular_study.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == tool.COLUMNS
    for col in ("delay", "rollouts", "n", "sigma", "policy", "p_ask", "p_ask_ci95",
                "grad_exact", "var_loo", "winner", "margin"):
        assert col in table[0]
    assert len(table) == 12
    row = next(r for r in table if (r["n"], r["sigma"], r["policy"]) == ("6", "2", "greedy"))
    assert float(row["grad_exact"]) == pytest.approx(0.25 * -0.25 * 6)
    assert {r["winner"] for r in table if r["n"] == "6"} == {"k2"}
    # n = 2: k2 and full are the same estimator, so the margin is taken against greedy.
    assert {r["runner_up"] for r in table if r["n"] == "2"} == {"greedy"}
    meta = json.loads((tmp_path / "tabular_study.json").read_text())
    assert meta["grid"]["n"] == [2, 6] and meta["config"]["seeds"] == 50
    assert meta["command"].startswith("python tools/tabular_study.py --n 2,6")
    assert "torch" in meta["versions"]
    assert (tmp_path / "tabular_heatmap.png").stat().st_size > 10_000
    assert (tmp_path / "tabular_profiles.png").stat().st_size > 10_000
    # A cell's numbers do not depend on the rest of the grid.
    rows2 = tool.main(["--n", "6", "--sigma", "2", "--delay", "1", "--rollouts", "8",
                       "--policies", "greedy,k2,full", "--seeds", "50", "--updates", "3",
                       "--out", str(tmp_path / "one"), "--quiet", "--no-plot"])
    same = [r for r in rows if r["n"] == 6 and r["sigma"] == 2.0]
    assert [r["p_ask"] for r in rows2] == [r["p_ask"] for r in same]
