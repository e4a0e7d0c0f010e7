"""``ppg evaluate``: a trained policy against the base model on held-out contexts."""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path

import torch

from ppg.commands.compare.run import csv_logger_arg, run_cli, write_json
from ppg.commands.compare.stats import mean_ci, write_csv
from ppg.objective import masked_turn_means


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
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    mean, per_turn = masked_turn_means(rewards, torch.tensor([r.turn_mask for r in rollouts]))
    return float(mean), per_turn.tolist()


def _metric_rows(label: str, metric: str, per_turn: list[list[float]]) -> list[dict]:
    """Mean and 95% t-interval half-width per turn and over all turns (``[conversation][turn]``
    values; NaN = no value, counted as ``unscored`` when the turn happened)."""
    rows = []
    n_turns = max(len(values) for values in per_turn)
    columns = [[values[t] for values in per_turn if t < len(values)] for t in range(n_turns)]
    pooled = [[v for v in values if math.isfinite(v)] for values in per_turn]
    for turn, values in [*enumerate(columns), ("all", [sum(v) / len(v) for v in pooled if v])]:
        mean, half = mean_ci(values)
        rows.append({"model": label, "metric": metric, "turn": turn, "mean": mean, "ci95": half,
                     "n": sum(math.isfinite(v) for v in values)})
    return rows


def _consistency_metrics(judge_files: list[str], rollouts: dict, out_dir: Path) -> list[dict]:
    """Held-out conversations scored by each evaluation judge; rows for evaluation_metrics.csv."""
    from ppg.judges.rescore import load_judge, score_transcripts

    rows, scores = [], {label: {} for label in rollouts}
    for path in judge_files:
        judge = load_judge(path)
        if hasattr(judge, "on_parse_failure"):
            judge.on_parse_failure = "nan"  # evaluation counts unreadable verdicts instead of stopping
        metric = getattr(judge, "metric", "") or Path(path).stem
        for label, label_rollouts in rollouts.items():
            per_turn = score_transcripts(judge, label_rollouts)
            scores[label][metric] = per_turn
            happened = sum(sum(r.turn_mask) for r in label_rollouts)
            unscored = happened - sum(math.isfinite(v) for values in per_turn for v in values)
            rows += [{**row, "unscored": unscored if row["turn"] == "all" else ""}
                     for row in _metric_rows(label, metric, per_turn)]
        # trained - base, paired by conversation (same held-out context, same sampling seed)
        differences = [[a - b for a, b in zip(x, y)] for x, y in
                       zip(scores["trained"][metric], scores["base"][metric])]
        rows += [{**row, "unscored": ""} for row in _metric_rows("trained - base", metric, differences)]
    for label, label_rollouts in rollouts.items():
        with (out_dir / f"transcripts_{label}.jsonl").open("w") as handle:
            for i, rollout in enumerate(label_rollouts):
                record = {**rollout.to_json(), "eval_rewards": {m: s[i] for m, s in scores[label].items()}}
                handle.write(json.dumps(record) + "\n")
    return rows


def _print_metrics(rows: list[dict]) -> None:
    for metric in dict.fromkeys(row["metric"] for row in rows):
        chosen = [row for row in rows if row["metric"] == metric]
        turns = list(dict.fromkeys(row["turn"] for row in chosen))
        print(f"{metric:<15} " + "  ".join(f"{'turn' + str(t) if t != 'all' else 'all':>13}" for t in turns))
        for label in dict.fromkeys(row["model"] for row in chosen):
            cells = {row["turn"]: row for row in chosen if row["model"] == label}
            line = "  ".join(f"{cells[t]['mean']:>6.3f} ± {cells[t]['ci95']:<5.3f}" for t in turns)
            unscored = cells["all"]["unscored"]
            print(f"{label:<15} {line}" + (f"  ({unscored} unscored)" if unscored else ""))


def device_args(device: str) -> list[str]:
    """``ppg validate`` arguments that put the trainer on ``device`` (one process); ``auto``
    with no CUDA device keeps the config's trainer."""
    import torch

    from ppg.models.spec import resolve_device

    if device == "auto" and not torch.cuda.is_available():
        return []
    kind = resolve_device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return [f"--trainer.accelerator={'gpu' if kind == 'cuda' else 'cpu'}", "--trainer.devices=1",
            "--trainer.strategy=auto"]


def evaluate(config: list[str], ckpt: str, out: str = "runs/evaluate", contexts: int = 16,
             seed: int = 0, overrides: list[str] | None = None,
             eval_judges: list[str] | None = None, device: str = "auto") -> dict:
    """Held-out rewards of the trained adapters and of the base model, per turn, with transcripts.

    Runs ``ppg validate`` twice on the same ``contexts`` held-out contexts and sampling seed:
    once with the checkpoint's LoRA adapters and once with fresh adapters (LoRA's B starts at
    zero, so that is exactly the base model). Writes ``<out>/evaluation.csv``,
    ``<out>/evaluation.json`` and ``<out>/transcripts_{trained,base}.{md,jsonl}``.

    With ``eval_judges`` both sets of conversations are graded again by each of those judges
    (configured apart from the training judge, e.g. ``configs/judge/prompt_to_line.yaml``
    ``line_to_line.yaml`` ``qa.yaml`` with a stronger judge model): per turn and overall, the
    mean with its 95% t-interval for trained, base and trained - base (paired by conversation),
    in ``<out>/evaluation_metrics.csv`` and the JSON; per-turn values go into the transcripts'
    ``eval_rewards``. Unreadable verdicts are left out and counted (``unscored``).

    Args:
        config: the config(s) the checkpoint was trained with.
        ckpt: a ppg checkpoint (``last.ckpt``) or a run folder holding ``checkpoints/last.ckpt``.
        out: output folder.
        contexts: held-out conversations (contexts are cycled if the problem has fewer).
        seed: seed of context choice and sampling (the same for both models).
        overrides: extra ``ppg validate`` arguments (repeatable), e.g.
            ``--overrides --data.init_args.sampling.temperature=0.7``.
        eval_judges: judge config files (a ``data.init_args.judge`` config or a bare
            ``class_path``/``init_args``) that grade the held-out conversations afterwards.
        device: where both runs load the model: ``auto`` (one CUDA GPU when available, else
            the config's trainer), ``cpu`` or ``cuda``.
    """
    import torch

    from ppg.callbacks.transcripts import transcript_markdown

    config = [str(c) for c in ([config] if isinstance(config, str) else config or [])]
    if not config:
        raise ValueError("give at least one --config (the one the checkpoint was trained with)")
    if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
        raise ValueError(f"--contexts must be an int >= 1, got {contexts!r}")
    ckpt_path = _resolve_ckpt(ckpt)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, all_rollouts = {}, {}
    for label in ("trained", "base"):
        shutil.rmtree(out_dir / label, ignore_errors=True)
        args = ["validate"]
        for path in config:
            args += ["--config", path]
        args += [*device_args(device), *(overrides or []), f"--data.init_args.val_contexts={contexts}",
                 f"--data.init_args.seed={seed}", f"--seed_everything={seed}",
                 csv_logger_arg(out_dir, label)]
        if label == "trained":
            args.append(f"--ckpt_path={ckpt_path}")
        cli = run_cli(args)
        if label == "trained":
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
            unknown = sorted(set(saved) - set(cli.model.state_dict()))
            if unknown:
                raise ValueError(f"checkpoint {str(ckpt_path)!r} does not match the configured model: "
                                 f"unexpected {unknown[0]}")
        rollouts = all_rollouts[label] = cli.datamodule.last_eval_rollouts
        mean, turns = _turn_means(rollouts)
        results[label] = {"reward_mean": mean, "reward_turns": turns, "conversations": len(rollouts)}
        (out_dir / f"transcripts_{label}.jsonl").write_text(
            "".join(json.dumps(r.to_json()) + "\n" for r in rollouts))
        (out_dir / f"transcripts_{label}.md").write_text(
            transcript_markdown(rollouts, f"{label}: {len(rollouts)} held-out conversations"))
        del cli
        gc.collect()
    results["ckpt"] = str(ckpt_path)
    write_json(out_dir / "evaluation.json", results)
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
    if eval_judges:
        metrics = _consistency_metrics(list(eval_judges), all_rollouts, out_dir)
        results["metrics"] = metrics
        write_json(out_dir / "evaluation.json", results)
        write_csv(metrics, out_dir / "evaluation_metrics.csv")
        _print_metrics(metrics)
        print(f"wrote {out_dir / 'evaluation_metrics.csv'}")
    print(f"wrote {out_dir / 'evaluation.csv'} and transcripts in {out_dir}")
    return results
