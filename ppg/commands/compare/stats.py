"""Scores of one run from its metrics.csv, and their aggregation over seeds."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

import scipy.stats


def _floats(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of every row where ``key`` has a finite value."""
    values = []
    for row in rows:
        text = row.get(key)
        if text not in (None, ""):
            value = float(text)
            if math.isfinite(value):
                values.append((int(row["epoch"]), value))
    return values


def _per_epoch(pairs: list[tuple[int, float]]) -> list[float]:
    """The last value logged in each epoch, in epoch order."""
    last = {}
    for epoch, value in pairs:
        last[epoch] = value
    return [last[epoch] for epoch in sorted(last)]


def _measurements(rows: list[dict], key: str) -> list[float]:
    """Values of a step-level metric logged every few steps; Lightning repeats the last value on
    the rows of the steps in between, so a value equal to the previous row's is not counted."""
    values, previous = [], None
    for row in rows:
        text = row.get(key)
        if text in (None, ""):
            continue
        value = float(text)
        if value != previous and math.isfinite(value):
            values.append(value)
        previous = value
    return values


def summarize_metrics(metrics_csv: Path, name: str) -> dict:
    """Scores of one run from its metrics.csv (``name``: the subset's metric name)."""
    with Path(metrics_csv).open() as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    val = _floats(rows, "val/reward_mean")
    if not val:
        raise RuntimeError(f"{metrics_csv}: no val/reward_mean; the config must validate on held-out "
                           "contexts (data.init_args.val_contexts > 0)")
    last_epoch = val[-1][0]
    trained = _floats(rows, f"policy/{name}/reward_mean")
    if trained and trained[-1][0] > last_epoch:
        raise RuntimeError(f"{metrics_csv}: the last held-out reward is from epoch {last_epoch} but "
                           f"training ran to epoch {trained[-1][0]}: set "
                           "trainer.check_val_every_n_epoch to a divisor of trainer.max_epochs")
    turns = sorted(int(m.group(1)) for c in columns if (m := re.fullmatch(r"val/reward_turn(\d+)", c)))
    final_turns = []
    for turn in turns:
        values = [v for e, v in _floats(rows, f"val/reward_turn{turn}") if e == last_epoch]
        final_turns.append(values[-1] if values else math.nan)
    train_curve = _per_epoch(trained)
    snr = _measurements(rows, f"grad_noise/{name}/snr")
    snr_by_class = {}
    for column in sorted(columns):
        if m := re.fullmatch(r"grad_noise/(.+)/snr", column):
            values = _measurements(rows, column)
            snr_by_class[m.group(1)] = statistics.fmean(values) if values else math.nan
    return {
        "epochs": last_epoch + 1,
        "final_reward": val[-1][1],
        "final_reward_turns": final_turns,
        "val_curve": _per_epoch(val),
        "val_epochs": sorted({epoch + 1 for epoch, _ in val}),
        "train_curve": train_curve,
        "reward_auc": statistics.fmean(train_curve) if train_curve else math.nan,
        "grad_snr": statistics.fmean(snr) if snr else math.nan,
        "grad_snr_by_class": snr_by_class,
    }


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (NaN half-width for fewer than 2 values)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return mean, math.nan
    t = float(scipy.stats.t.ppf(0.975, n - 1))
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def paired_differences(summaries: list[dict], labels: list[str], key: str = "final_reward") -> list[dict]:
    """Per class, the seed-paired difference ``class - best other class`` with a 95% t-interval.

    Seeds pair runs: every class trained with seed s saw the same contexts and sampling seed.
    "Best other" is the other class with the highest mean ``key``. ``winner`` is True only for
    a class whose paired interval against that best other class lies wholly above 0; the
    differences to the remaining classes are reported but not part of the rule.
    Rows also hold each pairwise difference as ``minus_<other>`` with its ``_ci95``.
    """
    by_label = {label: {s["seed"]: s[key] for s in summaries if s["policy"] == label} for label in labels}
    means = {label: mean_ci(list(values.values()))[0] for label, values in by_label.items()}
    rows = []
    for label in labels:
        others = [other for other in labels if other != label]
        row: dict = {"policy": label}
        if not others:
            rows.append(row)
            continue
        best = max(others, key=lambda other: means[other])
        for other in [best, *[o for o in others if o != best]]:
            seeds = sorted(set(by_label[label]) & set(by_label[other]))
            diffs = [by_label[label][s] - by_label[other][s] for s in seeds]
            mean, half = mean_ci(diffs)
            if other == best:
                row.update({"best_other": best, "paired_seeds": len(seeds), "diff_vs_best_other": mean,
                            "diff_vs_best_other_ci95": half,
                            "winner": bool(math.isfinite(half) and mean - half > 0)})
            row[f"minus_{other}"], row[f"minus_{other}_ci95"] = mean, half
        rows.append(row)
    return rows


SCORES = ("final_reward", "reward_auc", "grad_snr", "generated_tokens", "wall_s")


def aggregate(summaries: list[dict], labels: list[str]) -> list[dict]:
    """One row per policy: mean and ``_ci95`` half-width of each score over its seeds."""
    n_turns = max((len(s["final_reward_turns"]) for s in summaries), default=0)
    rows = []
    for label in labels:
        runs = [s for s in summaries if s["policy"] == label]
        row = {"policy": label, "seeds": len(runs)}
        for key in SCORES:
            row[key], row[f"{key}_ci95"] = mean_ci([s[key] for s in runs])
            if key == "final_reward":
                for turn in range(n_turns):
                    values = [s["final_reward_turns"][turn] for s in runs if turn < len(s["final_reward_turns"])]
                    row[f"final_reward_turn{turn}"], row[f"final_reward_turn{turn}_ci95"] = mean_ci(values)
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV; columns are the union of the rows' keys in first-seen order, NaN as empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def format_paired(rows: list[dict]) -> str:
    """One line per class: paired difference to the best other class, and the winner mark."""
    lines = []
    for row in rows:
        if "best_other" not in row:
            continue
        mark = "  <- winner (interval excludes 0)" if row["winner"] else ""
        lines.append(f"{row['policy']} - {row['best_other']}: "
                     f"{_fmt(row['diff_vs_best_other'], row['diff_vs_best_other_ci95'])} "
                     f"({row['paired_seeds']} paired seeds){mark}")
    return "\n".join(lines)


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    return text if math.isnan(half) else f"{text} ± {half:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table: mean ± 95% half-width."""
    turns = sorted(int(m.group(1)) for k in rows[0] if (m := re.fullmatch(r"final_reward_turn(\d+)", k)))
    header = ["policy", "seeds", "final reward", *[f"turn {t}" for t in turns], "reward AUC",
              "grad SNR", "gen tokens", "wall s"]
    body = []
    for row in rows:
        body.append([row["policy"], str(row["seeds"]), _fmt(row["final_reward"], row["final_reward_ci95"]),
                     *[_fmt(row[f"final_reward_turn{t}"], row[f"final_reward_turn{t}_ci95"]) for t in turns],
                     _fmt(row["reward_auc"], row["reward_auc_ci95"]),
                     _fmt(row["grad_snr"], row["grad_snr_ci95"], 4),
                     _fmt(row["generated_tokens"], row["generated_tokens_ci95"], 0),
                     _fmt(row["wall_s"], row["wall_s_ci95"], 0)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
