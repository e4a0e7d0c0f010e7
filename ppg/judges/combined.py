"""A weighted mean of several judges."""

from __future__ import annotations

from collections.abc import Sequence

from ppg.judges.base import Judge, JudgeRequest


class CombinedJudge(Judge):
    """Reward = sum_j w_j * judge_j / sum_j w_j (weights default to equal; weight-0 judges are not
    called)."""

    def __init__(self, judges: list[Judge], weights: list[float] | None = None):
        if not judges:
            raise ValueError("judges must list at least one judge")
        weights = [1.0] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges):
            raise ValueError(f"weights has {len(weights)} entries for {len(judges)} judges")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative and not all zero, got {weights}")
        self.judges = list(judges)
        self.weights = weights

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        total = sum(self.weights)
        rewards = [0.0] * len(requests)
        for judge, weight in zip(self.judges, self.weights):
            if weight == 0:
                continue
            scores = judge.score(requests)
            if len(scores) != len(requests):
                raise ValueError(f"{type(judge).__name__} returned {len(scores)} rewards "
                                 f"for {len(requests)} requests")
            rewards = [r + weight * s for r, s in zip(rewards, scores)]
        return [min(1.0, max(0.0, r / total)) for r in rewards]
