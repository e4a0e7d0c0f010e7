#!/usr/bin/env python
"""Tabular study: which policy class learns DelayedAsk fastest, over horizon, delay, noise, batch.

No LLM: one shared "ask" logit per seed, hundreds of seeds as a batch, updates through the real
``ppg.objective.partial_pg_loss`` (see ``ppg/theory.py``). For every grid cell (delay, rollouts
per update B, horizon n, reward noise σ) and class, it trains ``--seeds`` seeds for
``--updates`` updates from P(ask) = 0.5 and records P(ask), P(optimal action) (P(ask) when
asking pays, 1 - P(ask) when it does not) and the exact gradient moments at θ = 0.

    python tools/tabular_study.py                      # the committed docs/results/tabular/
    python tools/tabular_study.py --n 4,8 --sigma 0,2 --delay 1 --rollouts 8 --out runs/tab

Writes ``tabular_study.csv`` (one row per cell and class), ``tabular_study.json`` (command,
config, grid, package versions, wall time), ``tabular_heatmap.png`` (winner per cell) and
``tabular_profiles.png`` (P(ask) against σ per class) into ``--out``.

All classes of a cell get the same random numbers (common random numbers), so differences
between classes are paired per seed. A cell's random stream depends only on ``--seed`` and the
cell itself, so a smaller grid reproduces the same cells.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import shlex
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ppg.theory import (
    DelayedAsk,
    as_subset,
    expected_gradient_and_variance,
    resolvable_effect,
    seeds_needed,
    t_quantile,
    train,
)

DEFAULT_OUT = "docs/results/tabular"
COLORS = {"greedy": "#4C72B0", "k2": "#DD8452", "k3": "#55A868", "full": "#8172B3"}
FALLBACK_COLORS = ["#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]

COLUMNS = [
    "delay", "rollouts", "n", "sigma", "policy", "optimum", "seeds", "updates", "lr",
    "optimizer", "group_size", "cost", "payoff",
    "p_ask", "p_ask_ci95", "p_correct", "p_correct_ci95", "p_correct_sd", "return_mean",
    "grad_exact", "var_oracle", "var_loo", "snr_batch",
    "d_vs_greedy", "d_vs_greedy_sd", "seeds_needed_vs_greedy", "resolvable5_vs_greedy",
    "d_vs_full", "d_vs_full_sd", "seeds_needed_vs_full", "resolvable5_vs_full",
    "winner", "runner_up", "margin", "margin_ci95",
]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=_ints, default=[2, 4, 8, 12, 16], help="horizons (turns)")
    ap.add_argument("--sigma", type=_floats, default=[0.0, 0.5, 1.0, 2.0, 4.0],
                    help="per-turn reward noise std")
    ap.add_argument("--delay", type=_ints, default=[1, 2], help="turns from ask to payoff")
    ap.add_argument("--rollouts", type=_ints, default=[4, 8, 16], help="rollouts per update B")
    ap.add_argument("--policies", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    default=["greedy", "k2", "k3", "full"], help="subset names (ppg.subsets)")
    ap.add_argument("--seeds", type=int, default=400, help="independent runs per cell and class")
    ap.add_argument("--updates", type=int, default=8, help="updates per run")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--group-size", type=int, default=4, help="leave-one-out group size G")
    ap.add_argument("--cost", type=float, default=0.25, help="reward lost on the turn of an ask")
    ap.add_argument("--payoff", type=float, default=1.0, help="reward `delay` turns later")
    ap.add_argument("--seed", type=int, default=0, help="base seed of every cell's stream")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--no-plot", action="store_true", help="skip the heatmap PNG")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    return ap.parse_args(argv)


def cell_seed(seed: int, delay: int, rollouts: int, n: int, sigma: float) -> int:
    """Seed of one cell's random stream: depends on the cell only, not on the grid."""
    return zlib.crc32(f"{seed}:{delay}:{rollouts}:{n}:{sigma:g}".encode())


def _mean_ci(x: torch.Tensor) -> tuple[float, float, float]:
    """(mean, 95 % t half-width, sd) of a 1-D sample."""
    k = x.numel()
    sd = float(x.std()) if k > 1 else 0.0
    half = t_quantile(0.975, k - 1) * sd / math.sqrt(k) if k > 1 else float("nan")
    return float(x.mean()), half, sd


def _fmt(x) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return str(x)


def run_cell(args, delay: int, rollouts: int, n: int, sigma: float) -> list[dict]:
    """Train every class on one cell; returns one row per class."""
    proc = DelayedAsk(n, delay, args.cost, args.payoff, sigma)
    gain = float(proc.expected_return(1.0))
    optimum = "ask" if gain > 0 else "skip" if gain < 0 else "either"
    stream = cell_seed(args.seed, delay, rollouts, n, sigma)
    finals, correct, weights = {}, {}, {}
    for name in args.policies:
        res = train(proc, name, seeds=args.seeds, updates=args.updates, rollouts=rollouts,
                    group_size=args.group_size, lr=args.lr, optimizer=args.optimizer,
                    seed=stream)
        finals[name] = res.final_p
        correct[name] = res.final_p if gain >= 0 else 1 - res.final_p
        weights[name] = as_subset(name).weights(n)

    # Winner and margin over the best class whose estimator differs (same weights = same runs).
    means = {k: float(v.mean()) for k, v in correct.items()}
    winner = max(args.policies, key=lambda k: (means[k], -args.policies.index(k)))
    others = [k for k in args.policies if not torch.equal(weights[k], weights[winner])]
    margin = margin_ci = float("nan")
    runner = ""
    if others and optimum != "either":
        runner = max(others, key=lambda k: means[k])
        margin, margin_ci, _ = _mean_ci(correct[winner] - correct[runner])
    if optimum == "either":
        winner = ""

    rows = []
    for name in args.policies:
        g, var_oracle = expected_gradient_and_variance(
            name, n, delay, args.cost, args.payoff, sigma, 0.5, "oracle")
        _, var_loo = expected_gradient_and_variance(
            name, n, delay, args.cost, args.payoff, sigma, 0.5, "leave_one_out", args.group_size)
        p_ask, p_ask_ci, _ = _mean_ci(finals[name])
        p_c, p_c_ci, p_c_sd = _mean_ci(correct[name])
        row = {
            "delay": delay, "rollouts": rollouts, "n": n, "sigma": sigma, "policy": name,
            "optimum": optimum, "seeds": args.seeds, "updates": args.updates, "lr": args.lr,
            "optimizer": args.optimizer, "group_size": args.group_size, "cost": args.cost,
            "payoff": args.payoff, "p_ask": p_ask, "p_ask_ci95": p_ask_ci, "p_correct": p_c,
            "p_correct_ci95": p_c_ci, "p_correct_sd": p_c_sd,
            "return_mean": float(proc.expected_return(finals[name]).mean()),
            "grad_exact": g, "var_oracle": var_oracle, "var_loo": var_loo,
            "snr_batch": g * g / (var_loo / rollouts) if var_loo > 0 else float("inf"),
            "winner": winner, "runner_up": runner, "margin": margin, "margin_ci95": margin_ci,
        }
        for ref in ("greedy", "full"):
            d = sd = need = res5 = float("nan")
            if ref in correct and ref != name:
                d, _, sd = _mean_ci(correct[name] - correct[ref])
                if sd > 0:
                    need = float(seeds_needed(d, sd))
                    res5 = resolvable_effect(sd, 5)
            row.update({f"d_vs_{ref}": d, f"d_vs_{ref}_sd": sd,
                        f"seeds_needed_vs_{ref}": need, f"resolvable5_vs_{ref}": res5})
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in COLUMNS])


def _color(name: str, policies: list[str]) -> str:
    if name in COLORS:
        return COLORS[name]
    extra = [p for p in policies if p not in COLORS]
    return FALLBACK_COLORS[extra.index(name) % len(FALLBACK_COLORS)]


def plot_heatmap(rows: list[dict], args, path: Path) -> None:
    """Panels delay × B; axes n × σ; cell color = winning class, shade = margin; annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    cells = {(r["delay"], r["rollouts"], r["n"], r["sigma"]): r for r in rows}
    nd, nb = len(args.delay), len(args.rollouts)
    fig, axes = plt.subplots(nd, nb, figsize=(3.3 * nb + 0.6, 3.1 * nd + 1.3), squeeze=False)
    for i, delay in enumerate(args.delay):
        for j, b in enumerate(args.rollouts):
            ax = axes[i][j]
            img = torch.ones(len(args.sigma), len(args.n), 3)
            for y, sigma in enumerate(args.sigma):
                for x, n in enumerate(args.n):
                    r = cells[(delay, b, n, sigma)]
                    win, m, ci = r["winner"], r["margin"], r["margin_ci95"]
                    if not win:
                        ax.text(x, y, "tie", ha="center", va="center", fontsize=7)
                        continue
                    sig = not math.isnan(m) and m - ci > 0
                    shade = 0.12 if not sig else 0.3 + 0.7 * min(m / 0.3, 1.0)
                    rgb = torch.tensor(to_rgb(_color(r["winner"], args.policies)))
                    img[y, x] = 1 - shade * (1 - rgb)
                    same = [q for q in args.policies if q != win and torch.equal(
                        as_subset(q).weights(n), as_subset(win).weights(n))]
                    if same:
                        win = f"{win}≡{same[-1]}"
                    label = win if math.isnan(m) else (
                        f"{win}\n{'+' if sig else '≈'}{m:.3f}\nvs {r['runner_up']}")
                    ax.text(x, y, label, ha="center", va="center", fontsize=6.5,
                            linespacing=1.1, color="white" if shade > 0.75 else "black")
            ax.imshow(img.numpy(), origin="lower", aspect="auto")
            ax.set_xticks(range(len(args.n)), [str(n) for n in args.n])
            ax.set_yticks(range(len(args.sigma)), [f"{s:g}" for s in args.sigma])
            ax.set_title(f"delay {delay}, B = {b}", fontsize=9)
            if i == nd - 1:
                ax.set_xlabel("horizon n (turns)")
            if j == 0:
                ax.set_ylabel("reward noise σ")
    handles = [Patch(color=_color(p, args.policies), label=p) for p in args.policies]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(
        f"DelayedAsk: class with the highest P(optimal action) after {args.updates} "
        f"{args.optimizer} updates ({args.seeds} seeds)\nlabel: winner, + margin over the best "
        "other class (paired 95% CI > 0; ≈: not resolved), vs: that class; darker = larger margin;"
        " a≡b: the same estimator at that n",
        fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_profiles(rows: list[dict], args, path: Path) -> None:
    """P(ask) after the last update against σ, one line per class; panels delay × n (largest B
    and two horizons: the smallest above every delay, and the largest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = 8 if 8 in args.rollouts else args.rollouts[-1]
    ns = sorted({min([n for n in args.n if n > max(args.delay)] or args.n), max(args.n)})
    fig, axes = plt.subplots(len(args.delay), len(ns), figsize=(3.6 * len(ns), 2.8 * len(
        args.delay) + 0.8), squeeze=False, sharey=True)
    by = {(r["delay"], r["rollouts"], r["n"], r["sigma"], r["policy"]): r for r in rows}
    for i, delay in enumerate(args.delay):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            for pol in args.policies:
                pts = [by[(delay, b, n, s, pol)] for s in args.sigma]
                y = [p["p_ask"] for p in pts]
                ci = [p["p_ask_ci95"] for p in pts]
                ax.errorbar(args.sigma, y, yerr=ci, marker="o", ms=3, capsize=2,
                            color=_color(pol, args.policies), label=pol)
            ax.axhline(0.5, color="0.7", lw=0.8, ls="--")
            ax.set_title(f"delay {delay}, n = {n}, B = {b}", fontsize=9)
            ax.set_xlabel("reward noise σ")
            if j == 0:
                ax.set_ylabel(f"P(ask) after {args.updates} updates")
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"DelayedAsk: P(ask) against noise (mean ± 95% CI, {args.seeds} seeds; "
                 "dashed: the start, P = 0.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def print_tables(rows: list[dict], args) -> None:
    """Winner grids per (delay, B), then P(ask) per class for one B."""
    cells = {(r["delay"], r["rollouts"], r["n"], r["sigma"]): r for r in rows}
    by_policy = {(r["delay"], r["rollouts"], r["n"], r["sigma"], r["policy"]): r for r in rows}
    for delay in args.delay:
        for b in args.rollouts:
            print(f"\nwinner (margin in P(optimal action)), delay {delay}, B {b}")
            print("sigma\\n " + "".join(f"{n:>13}" for n in args.n))
            for sigma in args.sigma:
                parts = []
                for n in args.n:
                    r = cells[(delay, b, n, sigma)]
                    m = r["margin"]
                    tail = "" if math.isnan(m) else f" {m:+.2f}"
                    parts.append(f"{r['winner'] or 'tie'}{tail}")
                print(f"{sigma:>7g} " + "".join(f"{p:>13}" for p in parts))
    b = 8 if 8 in args.rollouts else args.rollouts[0]
    print(f"\nP(ask) after {args.updates} updates, B {b} (± 95 % CI over {args.seeds} seeds)")
    print("delay  n  sigma  " + "  ".join(f"{p:>13}" for p in args.policies))
    for delay in args.delay:
        for n in args.n:
            for sigma in args.sigma:
                vals = [by_policy[(delay, b, n, sigma, p)] for p in args.policies]
                print(f"{delay:>5} {n:>2} {sigma:>6g}  " + "  ".join(
                    f"{v['p_ask']:.3f} ± {v['p_ask_ci95']:.3f}" for v in vals))


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("matplotlib", "numpy", "tqdm"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(d, b, n, s) for d in args.delay for b in args.rollouts for n in args.n
            for s in args.sigma]
    t0 = time.time()
    rows = []
    try:
        from tqdm import tqdm

        it = tqdm(grid, desc="cells", unit="cell", disable=args.quiet)
    except ImportError:
        it = grid
    for cell in it:
        rows.extend(run_cell(args, *cell))
    wall = time.time() - t0

    write_csv(rows, out / "tabular_study.csv")
    if not args.no_plot:
        plot_heatmap(rows, args, out / "tabular_heatmap.png")
        plot_profiles(rows, args, out / "tabular_profiles.png")
    cmd = "python tools/tabular_study.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:]) if (
            argv if argv is not None else sys.argv[1:]) else "")
    meta = {
        "command": cmd,
        "config": {k: v for k, v in vars(args).items() if k not in (
            "out", "quiet", "no_plot", "n", "sigma", "delay", "rollouts", "policies")},
        "grid": {"delay": args.delay, "rollouts": args.rollouts, "n": args.n,
                 "sigma": args.sigma, "policies": args.policies},
        "cell_seed": "zlib.crc32(f'{seed}:{delay}:{rollouts}:{n}:{sigma:g}'), same for every class",
        "process": "DelayedAsk (ppg.theory): ask costs `cost` now, pays `payoff` `delay` turns "
                   "later (lost if past the last turn), N(0, sigma^2) noise on every turn",
        "metric": "P(optimal action) after `updates` updates from theta=0; optimal = ask iff "
                  "payoff*(n-delay) > cost*n",
        "versions": _versions(),
        "wall_s": round(wall, 2),
    }
    text = json.dumps(meta, indent=1)
    text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text)  # one line per list
    (out / "tabular_study.json").write_text(text + "\n")
    if not args.quiet:
        print_tables(rows, args)
        print(f"\n{len(rows)} rows in {wall:.1f} s -> {out}/tabular_study.csv")
    return rows


if __name__ == "__main__":
    main()
