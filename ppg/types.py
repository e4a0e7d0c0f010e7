"""Types shared by problems, judges, users and the rollout engine (stdlib only).

Problems make ``Context``s, the rollout engine asks judges about ``JudgeRequest``s. Keeping
both here lets ``ppg.problems`` import ``ppg.judges`` without ``ppg.judges`` ever importing
``ppg.problems``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

History = list[tuple[str, str]]
"""(role, text) pairs in order, roles ``user`` and ``assistant``, starting with the user."""


@dataclass
class Context:
    """One conversation setting: the agent's persona/task and the simulated user's role.

    The user speaks first (``opening``); the agent then answers for ``n_turns`` turns.
    """

    context_id: str
    agent_system_prompt: str
    user_system_prompt: str
    opening: str
    persona: list[str] = field(default_factory=list)
    user_lines: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeRequest:
    """One agent line to score, with everything said before it.

    ``history`` holds (role, text) pairs in order, starting with the user's opening; it does not
    include ``line``. ``turn`` is the 0-indexed agent turn. ``reply`` is the user's answer to
    ``line`` (None when the judge scores before the user answers, or the user ended the chat).
    """

    context: Context
    history: History
    line: str
    turn: int
    reply: str | None = None

    @property
    def agent_lines(self) -> list[str]:
        """The agent's earlier lines followed by this one."""
        return [text for role, text in self.history if role == "assistant"] + [self.line]


def check_n_turns(owner: str, n_turns: int) -> int:
    """``n_turns`` if it is an int >= 1, else a one-line ValueError naming ``owner``."""
    if isinstance(n_turns, bool) or not isinstance(n_turns, int) or n_turns < 1:
        raise ValueError(f"{owner}: n_turns must be an int >= 1, got n_turns={n_turns!r}")
    return n_turns
