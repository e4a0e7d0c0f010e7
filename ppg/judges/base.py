"""The judge interface: a reward in [0, 1] for each agent turn."""

from __future__ import annotations

from collections.abc import Sequence

from ppg.types import JudgeRequest

__all__ = ["Judge", "JudgeRequest"]


class Judge:
    """Scores agent lines. Subclasses implement ``score`` (batched) and return floats in [0, 1].

    ``needs_reply``: True if the reward of turn t depends on the user's answer y_t (r_t = r(x, τ_t));
    the rollout engine then scores a turn after the user has replied to it.
    """

    needs_reply: bool = False

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        raise NotImplementedError
