"""Evaluate judges on labelled sets (``ppg judge-eval``): persona lines, line-to-line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ppg.jsonl import read_jsonl
from ppg.judges.base import Judge, JudgeRequest
from ppg.types import Context

LABELS = ("consistent", "contradicting", "off_topic")
DATA_DIR = Path(__file__).parents[1] / "judges" / "data"
LABELLED_SETS = {"persona_lines": DATA_DIR / "labelled_persona_lines.jsonl",
                 "line_to_line": DATA_DIR / "labelled_line_to_line.jsonl"}
DEFAULT_DATA = LABELLED_SETS["persona_lines"]
THRESHOLD = 0.5


def load_labelled(path: str | Path = DEFAULT_DATA) -> list[dict]:
    """Rows ``{"persona": [facts], "line": str, "label": one of LABELS}`` from a JSONL file,
    optionally with ``"history": [[role, text], ...]`` (what was said before the line)."""
    rows = []
    for number, row in read_jsonl(path, "labelled lines"):
        history = row.get("history", [])
        if not (isinstance(row.get("persona"), list) and isinstance(row.get("line"), str)
                and row.get("label") in LABELS and isinstance(history, list)
                and all(isinstance(m, list) and len(m) == 2 for m in history)):
            raise ValueError(f"{path}:{number}: expected persona (list), line (str), "
                             f"label in {LABELS}, optional history ([[role, text], ...])")
        rows.append(row)
    return rows


def _requests(rows: list[dict]) -> list[JudgeRequest]:
    requests = []
    for i, row in enumerate(rows):
        persona = list(row["persona"])
        history = [(role, text) for role, text in row.get("history", [])]
        context = Context(context_id=f"eval-{i}", user_system_prompt="",
                          agent_system_prompt="You are this person:\n" + "\n".join(persona),
                          opening=history[0][1] if history else "", persona=persona)
        turn = sum(role == "assistant" for role, _ in history)
        requests.append(JudgeRequest(context, history=history, line=row["line"], turn=turn))
    return requests


def separation(scores: list[float], positive: list[bool]) -> dict:
    """Accuracy at THRESHOLD (score >= 0.5 means "consistent") and AUROC; AUROC is None
    when only one class is present. NaN scores (no verdict) are left out."""
    from torchmetrics.functional.classification import binary_auroc

    kept = [(s, p) for s, p in zip(scores, positive) if not math.isnan(s)]
    if not kept:
        return {"accuracy": None, "auroc": None, "n": 0}
    scores, positive = [s for s, _ in kept], [p for _, p in kept]
    preds = torch.tensor(scores, dtype=torch.float64)
    target = torch.tensor(positive, dtype=torch.long)
    accuracy = float(((preds >= THRESHOLD).long() == target).double().mean())
    both = 0 < int(target.sum()) < len(target)
    auroc = float(binary_auroc(preds, target)) if both else None
    return {"accuracy": accuracy, "auroc": auroc, "n": len(scores)}


def evaluate_scores(scores: list[float], labels: list[str]) -> dict:
    """Metrics of ``scores`` against ``labels``: consistent vs contradicting, vs off_topic, vs both."""
    result = {"overall": separation(scores, [label == "consistent" for label in labels])}
    for other in ("contradicting", "off_topic"):
        kept = [(s, label) for s, label in zip(scores, labels) if label in ("consistent", other)]
        result[f"vs_{other}"] = (separation([s for s, _ in kept], [label == "consistent" for _, label in kept])
                                 if other in labels else {"accuracy": None, "auroc": None, "n": 0})
    result["mean"] = {}
    for label in LABELS:
        values = [s for s, lab in zip(scores, labels) if lab == label and not math.isnan(s)]
        result["mean"][label] = sum(values) / len(values) if values else None
    result["unscored"] = sum(math.isnan(s) for s in scores)
    return result


CONSISTENCY_JUDGES = {"prompt_to_line": "PromptToLineJudge", "line_to_line": "LineToLineJudge",
                      "qa": "QAConsistencyJudge"}


def build_judge(name: str) -> Judge:
    """``embedding``, ``lm``, ``prompt_to_line``, ``line_to_line``, ``qa`` (these three on the
    embedded model, unreadable verdicts left out as NaN), or ``package.module.attribute`` (a
    Judge class or zero-argument factory returning a Judge)."""
    if name in CONSISTENCY_JUDGES:
        import ppg.judges

        return getattr(ppg.judges, CONSISTENCY_JUDGES[name])(on_parse_failure="nan")
    if name == "embedding":
        from ppg.judges.embedding import EmbeddingJudge

        return EmbeddingJudge()
    if name == "lm":
        from ppg.judges.lm import LMJudge

        return LMJudge()
    if "." not in name:
        raise ValueError(f"judges: unknown judge {name!r}; use embedding, lm, "
                         f"{', '.join(CONSISTENCY_JUDGES)}, or a dotted path")
    from ppg.judges.rule import import_callable

    judge = import_callable(name)()
    if not isinstance(judge, Judge):
        raise TypeError(f"judges: {name!r} built a {type(judge).__name__}, not a Judge")
    return judge


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    """A plain-text table of ``judge_eval``'s per-judge metrics."""
    width = max([12] + [len(name) for name in results])
    header = (f"{'judge':<{width}} {'acc':>6} {'auroc':>6} | {'acc/ctr':>7} {'auc/ctr':>7} | "
              f"{'acc/off':>7} {'auc/off':>7} | {'m_cons':>6} {'m_ctr':>6} {'m_off':>6}")
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        lines.append(
            f"{name:<{width}} {_fmt(m['overall']['accuracy']):>6} {_fmt(m['overall']['auroc']):>6} | "
            f"{_fmt(m['vs_contradicting']['accuracy']):>7} {_fmt(m['vs_contradicting']['auroc']):>7} | "
            f"{_fmt(m['vs_off_topic']['accuracy']):>7} {_fmt(m['vs_off_topic']['auroc']):>7} | "
            f"{_fmt(m['mean']['consistent']):>6} {_fmt(m['mean']['contradicting']):>6} "
            f"{_fmt(m['mean']['off_topic']):>6}")
    return "\n".join(lines)


def judge_eval(judges: list[str] = ["embedding", "lm"], data: str | None = None,  # noqa: B006
               out: str | None = None, labelled: str = "persona_lines") -> dict:
    """Score a labelled set with each judge and report how well it separates the labels.

    Positive class = ``consistent``. Accuracy uses the threshold 0.5 (reward >= 0.5 means
    consistent); AUROC is threshold-free. Both are given for consistent vs contradicting,
    consistent vs off_topic, and consistent vs the rest (overall), with the mean reward per label.
    Lines a judge gave no verdict (NaN) are left out and counted (``unscored``).

    Args:
        judges: judge names: ``embedding``, ``lm``, ``prompt_to_line``, ``line_to_line``, ``qa``,
            or a dotted path to a Judge class or a zero-argument factory returning a Judge.
        data: JSONL file of ``{"persona": [...], "line": ..., "label": ...}`` (optional
            ``"history"``); default: the packaged file of ``labelled``.
        out: write the results as JSON to this path.
        labelled: packaged set: ``persona_lines`` (a line vs the persona: consistent,
            contradicting, off_topic) or ``line_to_line`` (a line after a conversation:
            consistent, or contradicting the speaker's own earlier lines).
    """
    if not judges:
        raise ValueError("judges must name at least one judge")
    if labelled not in LABELLED_SETS:
        raise ValueError(f"labelled must be one of {', '.join(LABELLED_SETS)}, got {labelled!r}")
    path = Path(data) if data else LABELLED_SETS[labelled]
    rows = load_labelled(path)
    labels = [row["label"] for row in rows]
    requests = _requests(rows)
    results = {}
    for name in judges:
        judge = build_judge(name)
        started = time.perf_counter()
        scores = judge.score(requests)
        metrics = evaluate_scores(scores, labels)
        metrics["seconds"] = time.perf_counter() - started
        metrics["scores"] = scores
        metrics["stats"] = dict(getattr(judge, "stats", {}))
        results[name] = metrics
    counts = {label: labels.count(label) for label in LABELS}
    print(f"judge-eval on {path} ({len(rows)} lines: "
          + ", ".join(f"{n} {label}" for label, n in counts.items()) + ")")
    print(format_table(results))
    for name, metrics in results.items():
        if metrics["unscored"]:
            print(f"{name}: {metrics['unscored']} line(s) without a readable verdict were left out")
    report = {"data": str(path), "counts": counts, "threshold": THRESHOLD, "judges": results}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
