"""``ppg compare``: train several policy classes with the same budget and seeds, then compare.
``ppg evaluate``: a trained policy against the base model on held-out contexts.

``compare`` runs one ``ppg fit`` per (policy class, seed), in this process, each into
``<out>/runs/<policy>_seed<seed>/``. Everything but the subset, the seed and the log folder comes
from the given configs, so all classes get the same rollouts per epoch, epochs, held-out contexts
(per seed) and model. When a run has finished, its summary is written last to
``<out>/runs/<policy>_seed<seed>/summary.json``: a rerun skips runs that have one and trains
the rest (an unfinished run is started again from scratch).

Scores, per run (all read from the run's ``metrics.csv``):

- final reward: ``val/reward_mean`` (and ``val/reward_turn<t>``) of the LAST epoch: the validation
  rollouts on the held-out contexts, run every ``trainer.check_val_every_n_epoch`` epochs (the
  schedule must validate the last epoch; checked before any training);
- reward AUC: mean over epochs of the training reward ``policy/<name>/reward_mean``;
- gradient SNR: mean of ``grad_noise/<name>/snr`` (the trained class's own estimator);
- generated tokens: agent tokens sampled in training rollouts (validation not counted);
- wall time: seconds of the whole fit, model loading included.

Across seeds each score is reported as the mean and the half-width of a 95% Student-t interval,
``t(0.975, n-1) * sd / sqrt(n)`` (empty for a single seed).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L

from ppg.commands.compare.plot import plot_comparison
from ppg.commands.compare.policies import parse_policies, subset_args
from ppg.commands.compare.stats import (
    SCORES,
    aggregate,
    format_paired,
    format_table,
    paired_differences,
    summarize_metrics,
    write_csv,
)
from ppg.subsets import RewardSubset

SUMMARY = "summary.json"


class GeneratedTokens(L.Callback):
    """Adds up the tokens generated for training rollouts (agent and simulated user), per epoch."""

    def __init__(self):
        self.agent_tokens = 0
        self.user_tokens = 0
        self._counted = None

    def on_train_epoch_start(self, trainer, pl_module):
        # The training dataloader (this epoch's rollouts) is rebuilt just before this hook.
        stats = getattr(trainer.datamodule, "last_stats", None)
        if stats is not None and stats is not self._counted:  # each epoch's rollouts once
            self.agent_tokens += stats.agent_tokens
            self.user_tokens += stats.user_tokens
            self._counted = stats


def csv_logger_arg(save_dir: Path, name: str) -> str:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(save_dir), "name": name, "version": 0}}
    return f"--trainer.logger={json.dumps(logger)}"


def _fingerprint(config: list[str], overrides: list[str]) -> str:
    """What the runs were trained with: the configs' parsed content (comments do not count)
    and the overrides."""
    import yaml

    digest = hashlib.sha256()
    for path in config:
        content = yaml.safe_load(Path(path).read_text())
        digest.update(json.dumps(content, sort_keys=True, default=str).encode() + b"\x00")
    for arg in overrides:
        digest.update(arg.encode() + b"\x00")
    return digest.hexdigest()[:16]


def run_cli(args: list[str], run: bool = True):
    """``PPGCLI(args)`` with ``sys.argv`` showing those arguments (run.json records them)."""
    from ppg.cli import PPGCLI

    saved = sys.argv
    sys.argv = ["ppg", *args]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return PPGCLI(args=args, run=run)
    finally:
        sys.argv = saved


def check_held_out_schedule(config: list[str], overrides: list[str]) -> None:
    """One-line ValueError, before any training, unless every run validates on held-out contexts
    after its last epoch (the comparison's final reward)."""
    args = [arg for path in config for arg in ("--config", str(path))] + list(overrides)
    cli = run_cli(args, run=False)
    if not getattr(cli.datamodule, "val_contexts", 0):
        raise ValueError("data.init_args.val_contexts must be > 0: the comparison scores held-out "
                         "contexts")
    epochs, every = cli.trainer.max_epochs, cli.trainer.check_val_every_n_epoch
    if every is None or epochs is None or epochs < 1 or epochs % every:
        raise ValueError(f"trainer.check_val_every_n_epoch={every} does not divide "
                         f"trainer.max_epochs={epochs}: the last epoch would not be validated")


def train_run(config: list[str], label: str, subset: RewardSubset, seed: int, save_dir: Path,
              overrides: list[str] | None = None) -> dict:
    """One ``ppg fit`` of ``subset`` with ``seed`` into ``save_dir/<label>_seed<seed>``; its summary."""
    name = f"{label}_seed{seed}"
    args = ["fit"]
    for path in config:
        args += ["--config", str(path)]
    args += list(overrides or [])
    args += [*subset_args(subset), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
             csv_logger_arg(save_dir, name),
             "--trainer.callbacks+=ppg.commands.compare.run.GeneratedTokens"]
    started = time.perf_counter()
    cli = run_cli(args)
    wall = time.perf_counter() - started
    counter = next(c for c in cli.trainer.callbacks if isinstance(c, GeneratedTokens))
    log_dir = Path(cli.trainer.logger.log_dir)
    summary = {"policy": label, "subset": subset.name, "seed": seed, "log_dir": str(log_dir),
               **summarize_metrics(log_dir / "metrics.csv", subset.name),
               "generated_tokens": counter.agent_tokens + counter.user_tokens,
               "agent_tokens": counter.agent_tokens, "wall_s": wall, "args": args}
    del cli, counter
    gc.collect()
    return summary


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)  # the marker appears complete or not at all




def compare(config: list[str], policies: str = "greedy,k2,full", seeds: int = 3,
            out: str = "runs/compare", overrides: list[str] | None = None) -> list[dict]:
    """Train each policy class with the same budget and seeds; write and print the comparison.

    Writes ``<out>/comparison.csv`` (one row per class: mean and 95% half-width of each score
    over seeds), ``<out>/comparison_runs.csv`` (one row per run), ``<out>/comparison_paired.csv``
    (per class, the seed-paired difference to the best other class with a 95% interval; the
    winner is marked only where that interval excludes 0), ``<out>/comparison.png``
    (learning curves and per-turn final held-out rewards). Finished runs are not trained again.

    Args:
        config: experiment config(s), stacked in order as in ``ppg fit --config``.
        policies: comma-separated policy classes: greedy, full, k<K>, segment<L>, segment,
            discounted<gamma>.
        seeds: seeds 0 .. seeds-1 for every class (model init, sampling, contexts).
        out: output folder; runs go under ``<out>/runs``.
        overrides: extra ``ppg fit`` arguments for every run; repeat ``--overrides`` for several,
            e.g. ``--overrides --trainer.max_epochs=2``.
    """
    config = [str(c) for c in ([config] if isinstance(config, str) else config or [])]
    overrides = [str(o) for o in (overrides or [])]
    if not config:
        raise ValueError("give at least one --config (an experiment YAML)")
    for path in config:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config {path!r} does not exist")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an int >= 1, got {seeds!r}")
    parsed = parse_policies(policies, config, overrides)  # before any training
    check_held_out_schedule(config, overrides)
    out_dir = Path(out)
    save_dir = out_dir / "runs"
    save_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config, overrides)

    summaries = []
    for label, subset in parsed:
        for seed in range(seeds):
            run_dir = save_dir / f"{label}_seed{seed}"
            marker = run_dir / SUMMARY
            if marker.is_file():
                summary = json.loads(marker.read_text())
                if summary.get("fingerprint") != fingerprint:
                    raise ValueError(f"{run_dir} was trained with other configs or overrides; "
                                     "use a new --out folder (or delete that run)")
                print(f"ppg compare: {label} seed {seed} already done ({marker})")
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run starts again from scratch
                print(f"ppg compare: training {label} seed {seed}")
                summary = train_run(config, label, subset, seed, save_dir, overrides)
                summary["fingerprint"] = fingerprint
                write_json(marker, summary)
            summaries.append(summary)

    rows = aggregate(summaries, [label for label, _ in parsed])
    write_csv(rows, out_dir / "comparison.csv")
    run_rows = [{"policy": s["policy"], "seed": s["seed"], "final_reward": s["final_reward"],
                 **{f"final_reward_turn{t}": v for t, v in enumerate(s["final_reward_turns"])},
                 **{key: s[key] for key in SCORES[1:]},
                 # every class's estimator SNR on this run's batches (the same first batch for
                 # every class of a seed): a paired measurement of the variance argument
                 **{f"snr_{name}": v for name, v in sorted(s.get("grad_snr_by_class", {}).items())},
                 "log_dir": s["log_dir"]} for s in summaries]
    write_csv(run_rows, out_dir / "comparison_runs.csv")
    paired = paired_differences(summaries, [label for label, _ in parsed])
    write_csv(paired, out_dir / "comparison_paired.csv")
    plot_comparison(summaries, rows, out_dir / "comparison.png")
    print(format_table(rows))
    print(format_paired(paired))
    print(f"wrote {out_dir / 'comparison.csv'}, comparison_runs.csv, comparison_paired.csv and "
          f"{out_dir / 'comparison.png'}")
    return rows
