"""Evaluate judges on labelled persona lines (``ppg judge-eval``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ppg.judges.base import Judge, JudgeRequest
from ppg.problems.base import Context

LABELS = ("consistent", "contradicting", "off_topic")
DEFAULT_DATA = Path(__file__).parents[1] / "judges" / "data" / "labelled_persona_lines.jsonl"
THRESHOLD = 0.5


def load_labelled(path: str | Path = DEFAULT_DATA) -> list[dict]:
    """Rows ``{"persona": [facts], "line": str, "label": one of LABELS}`` from a JSONL file."""
    rows = []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not (isinstance(row.get("persona"), list) and isinstance(row.get("line"), str)
                and row.get("label") in LABELS):
            raise ValueError(f"{path}:{number}: expected persona (list), line (str), "
                             f"label in {LABELS}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no labelled lines")
    return rows


def _requests(rows: list[dict]) -> list[JudgeRequest]:
    return [JudgeRequest(Context(context_id=f"eval-{i}", agent_system_prompt="", user_system_prompt="",
                                 opening="", persona=list(row["persona"])), history=[],
                         line=row["line"], turn=0)
            for i, row in enumerate(rows)]


def separation(scores: list[float], positive: list[bool]) -> dict:
    """Accuracy at THRESHOLD (score >= 0.5 means "consistent") and AUROC; AUROC is None
    when only one class is present."""
    from torchmetrics.functional.classification import binary_auroc

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
        result[f"vs_{other}"] = separation([s for s, _ in kept], [label == "consistent" for _, label in kept])
    result["mean"] = {label: (sum(s for s, lab in zip(scores, labels) if lab == label)
                              / max(1, labels.count(label))) for label in LABELS}
    return result


def build_judge(name: str) -> Judge:
    """``embedding``, ``lm``, or ``package.module.attribute`` (a Judge class or zero-argument
    factory returning a Judge)."""
    if name == "embedding":
        from ppg.judges.embedding import EmbeddingJudge

        return EmbeddingJudge()
    if name == "lm":
        from ppg.judges.lm import LMJudge

        return LMJudge()
    if "." not in name:
        raise ValueError(f"judges: unknown judge {name!r}; use embedding, lm, or a dotted path")
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
               out: str | None = None) -> dict:
    """Score labelled persona lines with each judge and report how well it separates them.

    Positive class = ``consistent``. Accuracy uses the threshold 0.5 (reward >= 0.5 means
    consistent); AUROC is threshold-free. Both are given for consistent vs contradicting,
    consistent vs off_topic, and consistent vs the rest (overall), with the mean reward per label.

    Args:
        judges: judge names: ``embedding``, ``lm``, or a dotted path to a Judge class or a
            zero-argument factory returning a Judge.
        data: JSONL file of ``{"persona": [...], "line": ..., "label": ...}``; default: the
            packaged ``ppg/judges/data/labelled_persona_lines.jsonl``.
        out: write the results as JSON to this path.
    """
    if not judges:
        raise ValueError("judges must name at least one judge")
    path = Path(data) if data else DEFAULT_DATA
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
        results[name] = metrics
    counts = {label: labels.count(label) for label in LABELS}
    print(f"judge-eval on {path} ({len(rows)} lines: "
          + ", ".join(f"{n} {label}" for label, n in counts.items()) + ")")
    print(format_table(results))
    report = {"data": str(path), "counts": counts, "threshold": THRESHOLD, "judges": results}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
