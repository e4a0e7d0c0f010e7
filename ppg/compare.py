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
  rollouts on the held-out contexts that fit runs after every epoch;
- reward AUC: mean over epochs of the training reward ``policy/<name>/reward_mean``;
- gradient SNR: mean of ``grad_noise/<name>/snr`` (the trained class's own estimator);
- generated tokens: agent tokens sampled in training rollouts (validation not counted);
- wall time: seconds of the whole fit, model loading included.

Across seeds each score is reported as the mean and the half-width of a 95% Student-t interval,
``t(0.975, n-1) * sd / sqrt(n)`` (empty for a single seed).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L

from ppg.subsets import RewardSubset, Segment, subset_from_name

POLICY_FORMS = ("greedy, full, k<K> (e.g. k2), segment<L> (e.g. segment3), segment (the problem's "
                "block_length), discounted<gamma> (e.g. discounted0.9)")
SUMMARY = "summary.json"
# t(0.975, df) for df = 1..30; above 30 the normal 1.96 is within 4%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# --------------------------------------------------------------------------- policies


def _merged_yaml(config: list[str]) -> dict:
    """The configs merged key by key (no interpolation), for a few look-ups before training."""
    import yaml

    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    merged: dict = {}
    for path in config:
        merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def _problem_block_length(config: list[str], overrides: list[str]) -> int | None:
    """``block_length`` of the configured problem (explicit, or its class default), if it has one."""
    for arg in reversed(overrides):
        if m := re.fullmatch(r"--(?:data\.init_args\.)?problem\.init_args\.block_length=(\d+)", arg):
            return int(m.group(1))
    problem = _merged_yaml(config).get("data", {}).get("init_args", {}).get("problem")
    if isinstance(problem, str):
        problem = {"class_path": problem}
    if not isinstance(problem, dict):
        return None
    if "block_length" in (problem.get("init_args") or {}):
        return int(problem["init_args"]["block_length"])
    class_path = problem.get("class_path", "")
    if "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get("block_length")
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if parameter is None or not isinstance(parameter.default, int):
        return None
    return parameter.default


def parse_policies(policies: str, config: list[str] | None = None,
                   overrides: list[str] | None = None) -> list[tuple[str, RewardSubset]]:
    """``"greedy,k2,full"`` -> ``[(label, subset), ...]``; a bad name is a one-line ValueError.

    A bare ``segment`` takes the configured problem's ``block_length`` (``segment<L>`` otherwise).
    """
    names = [name.strip().lower() for name in str(policies).split(",") if name.strip()]
    if not names:
        raise ValueError(f"--policies is empty; give a comma-separated list of: {POLICY_FORMS}")
    parsed = []
    for name in names:
        if name == "segment":
            length = _problem_block_length(config or [], overrides or [])
            if length is None:
                raise ValueError("policy 'segment' needs a segment length and the problem has no "
                                 "block_length; use segment<L> (e.g. segment2)")
            subset, label = Segment(length=length), f"segment{length}"
        else:
            try:
                subset = subset_from_name(name)
            except ValueError:
                raise ValueError(f"unknown policy {name!r}; valid forms: {POLICY_FORMS}") from None
            label = name
        if any(label == seen for seen, _ in parsed):
            raise ValueError(f"policy {label!r} is listed twice in --policies")
        parsed.append((label, subset))
    return parsed


def subset_args(subset: RewardSubset) -> list[str]:
    """``--model.subset=...`` command-line arguments that rebuild ``subset``."""
    cls = type(subset)
    args = [f"--model.subset={cls.__module__}.{cls.__qualname__}"]
    for key, value in vars(subset).items():
        if not key.startswith("_") and value is not None:
            args.append(f"--model.subset.init_args.{key}={json.dumps(value)}")
    return args


# --------------------------------------------------------------------------- one run


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


def _logger_arg(save_dir: Path, name: str) -> str:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(save_dir), "name": name, "version": 0}}
    return f"--trainer.logger={json.dumps(logger)}"


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
        raise RuntimeError(f"{metrics_csv}: no val/reward_mean; the config must validate every epoch "
                           "on held-out contexts (data.init_args.val_contexts > 0)")
    last_epoch = val[-1][0]
    turns = sorted(int(m.group(1)) for c in columns if (m := re.fullmatch(r"val/reward_turn(\d+)", c)))
    final_turns = []
    for turn in turns:
        values = [v for e, v in _floats(rows, f"val/reward_turn{turn}") if e == last_epoch]
        final_turns.append(values[-1] if values else math.nan)
    train_curve = _per_epoch(_floats(rows, f"policy/{name}/reward_mean"))
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
        "train_curve": train_curve,
        "reward_auc": statistics.fmean(train_curve) if train_curve else math.nan,
        "grad_snr": statistics.fmean(snr) if snr else math.nan,
        "grad_snr_by_class": snr_by_class,
    }


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


def _run_cli(args: list[str]):
    """``PPGCLI(args)`` with ``sys.argv`` showing those arguments (run.json records them)."""
    from ppg.cli import PPGCLI

    saved = sys.argv
    sys.argv = ["ppg", *args]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return PPGCLI(args=args)
    finally:
        sys.argv = saved


def train_run(config: list[str], label: str, subset: RewardSubset, seed: int, save_dir: Path,
              overrides: list[str] | None = None) -> dict:
    """One ``ppg fit`` of ``subset`` with ``seed`` into ``save_dir/<label>_seed<seed>``; its summary."""
    name = f"{label}_seed{seed}"
    args = ["fit"]
    for path in config:
        args += ["--config", str(path)]
    args += list(overrides or [])
    args += [*subset_args(subset), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
             "--trainer.check_val_every_n_epoch=1", _logger_arg(save_dir, name),
             "--trainer.callbacks+=ppg.compare.GeneratedTokens"]
    started = time.perf_counter()
    cli = _run_cli(args)
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


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)  # the marker appears complete or not at all


# --------------------------------------------------------------------------- aggregation


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (NaN half-width for fewer than 2 values)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return mean, math.nan
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


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
    columns = list(rows[0])
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


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
            epochs = list(range(1, length + 1))
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


# --------------------------------------------------------------------------- the commands


def compare(config: list[str], policies: str = "greedy,k2,full", seeds: int = 3,
            out: str = "runs/compare", overrides: list[str] | None = None) -> list[dict]:
    """Train each policy class with the same budget and seeds; write and print the comparison.

    Writes ``<out>/comparison.csv`` (one row per class: mean and 95% half-width of each score
    over seeds), ``<out>/comparison_runs.csv`` (one row per run), ``<out>/comparison.png``
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
                _write_json(marker, summary)
            summaries.append(summary)

    rows = aggregate(summaries, [label for label, _ in parsed])
    write_csv(rows, out_dir / "comparison.csv")
    run_rows = [{"policy": s["policy"], "seed": s["seed"], "final_reward": s["final_reward"],
                 **{f"final_reward_turn{t}": v for t, v in enumerate(s["final_reward_turns"])},
                 **{key: s[key] for key in SCORES[1:]}, "log_dir": s["log_dir"]} for s in summaries]
    write_csv(run_rows, out_dir / "comparison_runs.csv")
    plot_comparison(summaries, rows, out_dir / "comparison.png")
    print(format_table(rows))
    print(f"wrote {out_dir / 'comparison.csv'} and {out_dir / 'comparison.png'}")
    return rows


def _resolve_ckpt(ckpt: str) -> Path:
    path = Path(ckpt)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no checkpoints/last.ckpt under {ckpt!r}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist")
    return path


def _turn_means(rollouts) -> tuple[float, list[float]]:
    n_turns = max(len(r.rewards) for r in rollouts)
    sums, counts = [0.0] * n_turns, [0] * n_turns
    for rollout in rollouts:
        for t, (reward, happened) in enumerate(zip(rollout.rewards, rollout.turn_mask)):
            if happened:
                sums[t] += reward
                counts[t] += 1
    total = sum(counts)
    return (sum(sums) / total if total else math.nan,
            [s / c if c else math.nan for s, c in zip(sums, counts)])


def evaluate(config: list[str], ckpt: str, out: str = "runs/evaluate", contexts: int = 16,
             seed: int = 0, overrides: list[str] | None = None) -> dict:
    """Held-out rewards of the trained adapters and of the base model, per turn, with transcripts.

    Runs ``ppg validate`` twice on the same ``contexts`` held-out contexts and sampling seed:
    once with the checkpoint's LoRA adapters and once with fresh adapters (LoRA's B starts at
    zero, so that is exactly the base model). Writes ``<out>/evaluation.csv``,
    ``<out>/evaluation.json`` and ``<out>/transcripts_{trained,base}.{md,jsonl}``.

    Args:
        config: the config(s) the checkpoint was trained with.
        ckpt: a ppg checkpoint (``last.ckpt``) or a run folder holding ``checkpoints/last.ckpt``.
        out: output folder.
        contexts: held-out conversations (contexts are cycled if the problem has fewer).
        seed: seed of context choice and sampling (the same for both models).
        overrides: extra ``ppg validate`` arguments (repeatable), e.g.
            ``--overrides --data.init_args.sampling.temperature=0.7``.
    """
    import torch

    from callbacks.transcripts import transcript_markdown

    config = [str(c) for c in ([config] if isinstance(config, str) else config or [])]
    if not config:
        raise ValueError("give at least one --config (the one the checkpoint was trained with)")
    if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
        raise ValueError(f"--contexts must be an int >= 1, got {contexts!r}")
    ckpt_path = _resolve_ckpt(ckpt)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in ("trained", "base"):
        shutil.rmtree(out_dir / label, ignore_errors=True)
        args = ["validate"]
        for path in config:
            args += ["--config", path]
        args += [*(overrides or []), f"--data.init_args.val_contexts={contexts}",
                 f"--data.init_args.seed={seed}", f"--seed_everything={seed}",
                 _logger_arg(out_dir, label)]
        if label == "trained":
            args.append(f"--ckpt_path={ckpt_path}")
        cli = _run_cli(args)
        if label == "trained":
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
            unknown = sorted(set(saved) - set(cli.model.state_dict()))
            if unknown:
                raise ValueError(f"checkpoint {str(ckpt_path)!r} does not match the configured model: "
                                 f"unexpected {unknown[0]}")
        rollouts = cli.datamodule.last_eval_rollouts
        mean, turns = _turn_means(rollouts)
        results[label] = {"reward_mean": mean, "reward_turns": turns, "conversations": len(rollouts)}
        (out_dir / f"transcripts_{label}.jsonl").write_text(
            "".join(json.dumps(r.to_json()) + "\n" for r in rollouts))
        (out_dir / f"transcripts_{label}.md").write_text(
            transcript_markdown(rollouts, f"{label}: {len(rollouts)} held-out conversations"))
        del cli
        gc.collect()
    results["ckpt"] = str(ckpt_path)
    _write_json(out_dir / "evaluation.json", results)
    n_turns = len(results["trained"]["reward_turns"])
    rows = [{"model": label, "reward_mean": results[label]["reward_mean"],
             **{f"reward_turn{t}": results[label]["reward_turns"][t] for t in range(n_turns)}}
            for label in ("trained", "base")]
    rows.append({"model": "trained - base", **{k: rows[0][k] - rows[1][k] for k in rows[0] if k != "model"}})
    write_csv(rows, out_dir / "evaluation.csv")
    for row in rows:
        cells = "  ".join(f"{k} {v:+.3f}" if row["model"] == "trained - base" else f"{k} {v:.3f}"
                          for k, v in row.items() if k != "model")
        print(f"{row['model']:<15} {cells}")
    print(f"wrote {out_dir / 'evaluation.csv'} and transcripts in {out_dir}")
    return results
