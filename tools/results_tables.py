#!/usr/bin/env python
"""Markdown tables for docs/results.md from the committed comparison files of one problem.

    python tools/results_tables.py docs/results/lagged_payoff

Prints three tables: per class (``comparison.csv``: means ± 95 % half-widths over seeds), paired
differences (final held-out reward from ``comparison_paired.csv``; training-reward AUC paired by
seed from ``comparison_runs.csv``), and per seed (final reward and each class's estimator SNR on
that run's batches). Every number in the results page comes from these files.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

from ppg.commands.compare.stats import paired_differences


def read_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def number(text: str | float | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def cell(mean: float, half: float = math.nan, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {half:.{digits}f}" if math.isfinite(half) else text


def mean_and_half(row: dict, key: str) -> tuple[float, float]:
    return number(row.get(key)), number(row.get(f"{key}_ci95"))


def class_table(rows: list[dict]) -> str:
    turns = sorted(int(m.group(1)) for key in rows[0] if (m := re.fullmatch(r"final_reward_turn(\d+)", key)))
    header = ["policy", "seeds", "final reward", *[f"turn {t}" for t in turns], "AUC", "own SNR", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["policy"], row["seeds"], cell(*mean_and_half(row, "final_reward")),
            *[cell(*mean_and_half(row, f"final_reward_turn{t}")) for t in turns],
            cell(*mean_and_half(row, "reward_auc")), cell(*mean_and_half(row, "grad_snr"), digits=2),
            cell(*mean_and_half(row, "wall_s"), digits=0),
        ]) + " |")
    return "\n".join(lines)


def paired_table(paired: list[dict], runs: list[dict]) -> str:
    labels = [row["policy"] for row in paired]
    summaries = [{"policy": r["policy"], "seed": int(r["seed"]), "reward_auc": number(r["reward_auc"])}
                 for r in runs]
    auc = {row["policy"]: row for row in paired_differences(summaries, labels, key="reward_auc")}
    lines = ["| difference | seeds | final reward | winner? | AUC |", "|---|---|---|---|---|"]
    for row in paired:
        policy = row["policy"]
        for other in labels:
            if other == policy or f"minus_{other}" not in row:
                continue
            best = other == row.get("best_other")
            final = cell(number(row[f"minus_{other}"]), number(row[f"minus_{other}_ci95"]))
            verdict = ("**yes**" if row.get("winner") == "True" else "no") if best else ""
            area = cell(auc[policy][f"minus_{other}"], auc[policy][f"minus_{other}_ci95"])
            name = f"{policy} − {other}" + (" (best other)" if best else "")
            lines.append(f"| {name} | {row['paired_seeds'] if best else ''} | {final} | {verdict} | {area} |")
    return "\n".join(lines)


def seed_table(runs: list[dict]) -> str:
    labels = list(dict.fromkeys(r["policy"] for r in runs))
    seeds = sorted({int(r["seed"]) for r in runs})
    snr_classes = sorted({key[4:] for r in runs for key in r if key.startswith("snr_") and r[key]})
    header = ["seed", *[f"{label} final" for label in labels], *[f"SNR {c}" for c in snr_classes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed in seeds:
        of_seed = {r["policy"]: r for r in runs if int(r["seed"]) == seed}
        # SNR on the first batch is the same for every class of a seed; the first class's run
        # that measured every class (a run measures its own class and its callback's list)
        # stands for the seed.
        ordered = [of_seed[label] for label in labels if label in of_seed]
        first = next((r for r in ordered if all(r.get(f"snr_{c}") for c in snr_classes)), ordered[0])
        lines.append("| " + " | ".join([
            str(seed), *[cell(number(of_seed[label]["final_reward"])) if label in of_seed else "–"
                         for label in labels],
            *[cell(number(first.get(f"snr_{c}")), digits=2) for c in snr_classes],
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="docs/results/<problem>")
    args = parser.parse_args(argv)
    files = {name: args.folder / f"{name}.csv" for name in ("comparison", "comparison_runs", "comparison_paired")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        parser.error(f"missing {', '.join(missing)}")
    runs = read_rows(files["comparison_runs"])
    print(class_table(read_rows(files["comparison"])), end="\n\n")
    print(paired_table(read_rows(files["comparison_paired"]), runs), end="\n\n")
    print(seed_table(runs))


if __name__ == "__main__":
    main()
