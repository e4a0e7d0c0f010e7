"""Sample conversations with per-turn rewards, as JSONL and markdown in the log dir."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


def transcript_markdown(rollouts, title: str) -> str:
    lines = [f"# {title}", ""]
    for number, rollout in enumerate(rollouts):
        lines += [f"## {number}: context `{rollout.context.context_id}` (group {rollout.group_id})", ""]
        if rollout.context.persona:
            lines += ["Persona: " + " ".join(rollout.context.persona), ""]
        turn = 0
        for role, text in rollout.messages:
            if role == "assistant":
                lines.append(f"- **agent** (turn {turn}, reward {rollout.rewards[turn]:.3f}): {text}")
                turn += 1
            else:
                lines.append(f"- **user**: {text}")
        lines.append("")
    return "\n".join(lines)


class TranscriptLogger(L.Callback):
    """Writes ``transcripts/<stage>_epoch<k>.{jsonl,md}`` with ``samples`` conversations."""

    def __init__(self, samples: int = 4):
        self.samples = samples

    def _write(self, trainer, rollouts, stage: str):
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0 or not rollouts or log_dir is None:
            return
        folder = Path(log_dir) / "transcripts"
        folder.mkdir(parents=True, exist_ok=True)
        chosen = rollouts[: self.samples]
        stem = f"{stage}_epoch{trainer.current_epoch:03d}"
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in chosen))
        (folder / f"{stem}.md").write_text(transcript_markdown(chosen, f"{stage}, epoch {trainer.current_epoch}"))

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer, getattr(trainer.datamodule, "epoch_rollouts", None), "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        self._write(trainer, getattr(trainer.datamodule, "last_eval_rollouts", None), "val")
