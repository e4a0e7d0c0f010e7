"""The judge interface: a reward in [0, 1] for each agent turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ppg.problems.base import Context


@dataclass
class JudgeRequest:
    """One agent line to score, with everything said before it.

    ``history`` holds (role, text) pairs in order, roles "user" and "assistant", starting with
    the user's opening; it does not include ``line``. ``turn`` is the 0-indexed agent turn.
    """

    context: Context
    history: list[tuple[str, str]]
    line: str
    turn: int

    @property
    def agent_lines(self) -> list[str]:
        """The agent's earlier lines followed by this one."""
        return [text for role, text in self.history if role == "assistant"] + [self.line]


class Judge:
    """Scores agent lines. Subclasses implement ``score`` (batched) and return floats in [0, 1]."""

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        raise NotImplementedError
