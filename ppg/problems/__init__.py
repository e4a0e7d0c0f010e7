"""Problems: where conversations come from, how long they run, and their default judge.

Select one in YAML by class path, e.g. ``class_path: ppg.problems.SyntheticPersonaChat``,
or by short name with ``problem_from_name("delayed_payoff", n_turns=4)``.
"""

from __future__ import annotations

import importlib

from ppg.problems.base import Context, Problem

# Imported on first access: ppg.judges.base imports ppg.problems.base, and the synthetic
# problems subclass ppg.judges.base.Judge, so eager imports here would be circular.
_LAZY = {
    "SyntheticPersonaChat": "persona_chat",
    "PersonaDomain": "domains",
    "Education": "domains",
    "Therapy": "domains",
    "Chatting": "domains",
    "DelayedPayoff": "synthetic",
    "NoisyIndependent": "synthetic",
    "BlockStructured": "synthetic",
    "DelayedPayoffJudge": "synthetic",
    "NoisyIndependentJudge": "synthetic",
    "BlockStructuredJudge": "synthetic",
}

PROBLEMS: dict[str, str] = {
    "synthetic_persona_chat": "SyntheticPersonaChat",
    "education": "Education",
    "therapy": "Therapy",
    "chatting": "Chatting",
    "delayed_payoff": "DelayedPayoff",
    "noisy_independent": "NoisyIndependent",
    "block_structured": "BlockStructured",
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
    "NoisyIndependent",
    "NoisyIndependentJudge",
    "PersonaDomain",
    "Problem",
    "SyntheticPersonaChat",
    "Therapy",
    "problem_from_name",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ppg.problems.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ppg.problems' has no attribute {name!r}")


def problem_from_name(name: str, **kwargs) -> Problem:
    """Build a registered problem by its short name (a key of ``PROBLEMS``)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    return __getattr__(PROBLEMS[name])(**kwargs)
