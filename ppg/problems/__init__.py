"""Problems: where conversations come from, how long they run, and their default judge.

Select one in YAML by class path, e.g. ``class_path: ppg.problems.SyntheticPersonaChat``,
or by short name with ``problem_from_name("delayed_payoff", n_turns=4)``.
"""

from __future__ import annotations

from ppg.problems.base import Context, Problem
from ppg.problems.domains import Chatting, Education, PersonaDomain, Therapy
from ppg.problems.persona_chat import SyntheticPersonaChat
from ppg.problems.synthetic import (
    BlockStructured,
    BlockStructuredJudge,
    DelayedPayoff,
    DelayedPayoffJudge,
    LaggedPayoff,
    LaggedPayoffJudge,
    NoisyIndependent,
    NoisyIndependentJudge,
)

PROBLEMS: dict[str, type[Problem]] = {
    "synthetic_persona_chat": SyntheticPersonaChat,
    "education": Education,
    "therapy": Therapy,
    "chatting": Chatting,
    "delayed_payoff": DelayedPayoff,
    "noisy_independent": NoisyIndependent,
    "block_structured": BlockStructured,
    "lagged_payoff": LaggedPayoff,
}

__all__ = [
    "PROBLEMS",
    "BlockStructured",
    "BlockStructuredJudge",
    "Chatting",
    "Context",
    "DelayedPayoff",
    "DelayedPayoffJudge",
    "Education",
    "LaggedPayoff",
    "LaggedPayoffJudge",
    "NoisyIndependent",
    "NoisyIndependentJudge",
    "PersonaDomain",
    "Problem",
    "SyntheticPersonaChat",
    "Therapy",
    "problem_from_name",
]


def problem_from_name(name: str, **kwargs) -> Problem:
    """Build a registered problem by its short name (a key of ``PROBLEMS``)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)
