#!/usr/bin/env python
"""The results study: ``ppg compare`` on every problem of docs/results.md, seed round by round.

    python tools/study.py                      # every problem, 5 seeds
    python tools/study.py --problems lagged_payoff,delayed_payoff --seeds 8
    python tools/study.py --dry-run            # print the commands, run nothing

Round k (k = 1 .. --seeds) runs ``ppg compare ... --seeds k --out <runs>/<problem>`` for every
problem, then copies its ``comparison.csv``, ``comparison_runs.csv``, ``comparison_paired.csv``
and ``comparison.png`` into ``<results>/<problem>/``. ``ppg compare`` skips finished runs, so a
round only trains seed k - 1 of each class, and after every round each problem's files hold the
same seeds for every class: stop at any time, commit what landed, and rerun the same command to
go on. The script commits nothing. On a CPU shared with other jobs, prefix OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/experiment/demo.yaml"
FILES = ("comparison.csv", "comparison_runs.csv", "comparison_paired.csv", "comparison.png")


@dataclass(frozen=True)
class Study:
    """One problem of docs/results.md: configs stacked on the demo, and the classes compared."""

    configs: tuple[str, ...]
    policies: str = "greedy,k2,full"


STUDIES = {
    "delayed_payoff": Study((DEMO,)),
    "lagged_payoff": Study((DEMO, "configs/experiment/study/lagged_payoff.yaml")),
    "block_structured": Study((DEMO, "configs/experiment/study/block_structured.yaml"),
                              "greedy,segment,full"),
    "noisy_independent": Study((DEMO, "configs/experiment/study/noisy_independent.yaml")),
    "persona_chat": Study((DEMO, "configs/experiment/study/persona_chat.yaml")),
}


def compare_command(problem: str, seeds: int, runs: str) -> list[str]:
    """The ``ppg compare`` argument list for one problem with seeds 0 .. seeds-1."""
    study = STUDIES[problem]
    args = ["ppg", "compare"]
    for config in study.configs:
        args += ["--config", config]
    return [*args, "--policies", study.policies, "--seeds", str(seeds),
            "--out", f"{runs}/{problem}"]


def plan(problems: list[str], seeds: int, runs: str) -> list[tuple[str, int, list[str]]]:
    """(problem, round, command) in the order they run: seed rounds outermost."""
    return [(problem, k, compare_command(problem, k, runs))
            for k in range(1, seeds + 1) for problem in problems]


def copy_results(source: Path, target: Path) -> list[Path]:
    """Copy the comparison files of one ``ppg compare --out`` folder; the copied paths."""
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)}: did ppg compare finish?")
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(source / name, target / name)) for name in FILES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(STUDIES),
                        help=f"comma-separated, from: {', '.join(STUDIES)} (default: all)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per class (default 5)")
    parser.add_argument("--runs", default="runs/study", help="ppg compare --out parent folder")
    parser.add_argument("--results", default="docs/results", help="where the files are copied")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = [p for p in args.problems if p not in STUDIES]
    if unknown or not args.problems:
        parser.error(f"--problems: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(STUDIES)}")
    if len(set(args.problems)) != len(args.problems):
        parser.error("--problems: a problem is named twice")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for problem, k, command in plan(args.problems, args.seeds, args.runs):
        target = f"{args.results}/{problem}"
        print(f"[round {k}/{args.seeds}] {shlex.join(command)}", flush=True)
        print(f"[round {k}/{args.seeds}] copy {', '.join(FILES)} -> {target}/", flush=True)
        if args.dry_run:
            continue
        ppg = shutil.which("ppg") or sys.exit("tools/study.py: the ppg command is not installed")
        subprocess.run([ppg, *command[1:]], cwd=ROOT, env=os.environ, check=True)
        copy_results(ROOT / args.runs / problem, ROOT / target)


if __name__ == "__main__":
    main()
