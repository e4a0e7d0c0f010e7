"""``ppg evaluate``: a trained policy against the base model on held-out contexts."""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path

from ppg.commands.compare.run import csv_logger_arg, run_cli, write_json
from ppg.commands.compare.stats import write_csv


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

    from ppg.callbacks.transcripts import transcript_markdown

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
    print(f"wrote {out_dir / 'evaluation.csv'} and transcripts in {out_dir}")
    return results
