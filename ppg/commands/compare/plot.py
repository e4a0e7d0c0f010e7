"""The comparison figure: learning curves and per-turn final held-out rewards."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ppg.commands.compare.stats import mean_ci


def plot_comparison(summaries: list[dict], rows: list[dict], path: Path) -> None:
    """Learning curves (training reward, mean ± 95% band; held-out dashed) and per-turn final bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [row["policy"] for row in rows]
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in labels:
        runs = [s for s in summaries if s["policy"] == label]
        for key, style, suffix in (("train_curve", "-", "train"), ("val_curve", "--", "held-out")):
            length = min((len(s[key]) for s in runs), default=0)
            if not length:
                continue
            stats = [mean_ci([s[key][e] for s in runs]) for e in range(length)]
            # Held-out points sit at the epochs that validated (e.g. only the last one).
            epochs = runs[0].get("val_epochs", []) if key == "val_curve" else []
            epochs = epochs[:length] if len(epochs) >= length else list(range(1, length + 1))
            means = [m for m, _ in stats]
            curves.plot(epochs, means, style, color=colors[label], marker="o", markersize=3,
                        label=f"{label} ({suffix})")
            if key == "train_curve" and len(runs) > 1:
                curves.fill_between(epochs, [m - (h if math.isfinite(h) else 0) for m, h in stats],
                                    [m + (h if math.isfinite(h) else 0) for m, h in stats],
                                    color=colors[label], alpha=0.2, linewidth=0)
    seeds = max(row["seeds"] for row in rows)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("epoch")
    curves.set_ylabel("mean reward per turn")
    curves.set_title("learning curves" + (f" (band: 95% interval, {seeds} seeds)" if seeds > 1 else " (1 seed)"))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)

    turns = sorted(int(m.group(1)) for k in rows[0] if (m := re.fullmatch(r"final_reward_turn(\d+)", k)))
    width = 0.8 / max(len(labels), 1)
    top = 0.0
    for i, row in enumerate(rows):
        xs = [t - 0.4 + width * (i + 0.5) for t in turns]
        heights = [row[f"final_reward_turn{t}"] for t in turns]
        errors = [row[f"final_reward_turn{t}_ci95"] for t in turns]
        errors = [e if math.isfinite(e) else 0.0 for e in errors] if row["seeds"] > 1 else None
        bars.bar(xs, heights, width, yerr=errors, capsize=3, color=colors[row["policy"]],
                 label=f"{row['policy']} (mean {row['final_reward']:.3f})")
        top = max([top, *(h + (e if errors else 0.0) for h, e in zip(heights, errors or heights))])
    bars.set_xticks(turns, [f"turn {t}" for t in turns])
    bars.set_ylabel("final held-out reward")
    bars.set_title("per-turn held-out reward, last epoch" + (" (95% intervals)" if seeds > 1 else ""))
    bars.grid(axis="y", alpha=0.3)
    bars.set_ylim(top=max(top, 1e-6) * 1.3)  # room for the legend above the bars
    bars.legend(fontsize=8, loc="upper center", ncol=len(labels))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
