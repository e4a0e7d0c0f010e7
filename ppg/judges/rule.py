"""Programmatic rewards: keywords, a regular expression, or any Python callable."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from ppg.judges.base import Judge, JudgeRequest


def import_callable(dotted: str) -> Callable:
    """``"package.module.function"`` -> the function; a one-line error if it does not resolve."""
    module_name, _, attribute = dotted.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"function {dotted!r} cannot be imported (expected 'module.function')") from None
    if not callable(target):
        raise TypeError(f"function {dotted!r} is not callable")
    return target


class RuleJudge(Judge):
    """Rule-based reward, the mean of the rules that are set.

    - ``keywords``: fraction of the keywords found in the line (case-insensitive);
    - ``regex``: 1 if the pattern matches anywhere in the line, else 0;
    - ``function``: a callable (or its dotted import path) taking a ``JudgeRequest`` and
      returning a float in [0, 1].
    """

    def __init__(self, keywords: list[str] | None = None, regex: str | None = None,
                 function: str | Callable[[JudgeRequest], float] | None = None):
        if not (keywords or regex or function):
            raise ValueError("RuleJudge needs at least one of keywords, regex, function")
        self.keywords = [k.lower() for k in keywords or []]
        try:
            self.pattern = re.compile(regex) if regex else None
        except re.error as error:
            raise ValueError(f"RuleJudge: invalid regex {regex!r}: {error}") from None
        self.function = import_callable(function) if isinstance(function, str) else function

    def score_one(self, request: JudgeRequest) -> float:
        parts = []
        line = request.line.lower()
        if self.keywords:
            parts.append(sum(k in line for k in self.keywords) / len(self.keywords))
        if self.pattern is not None:
            parts.append(float(self.pattern.search(request.line) is not None))
        if self.function is not None:
            value = float(self.function(request))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RuleJudge function returned {value}, outside [0, 1]")
            parts.append(value)
        return sum(parts) / len(parts)

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        return [self.score_one(request) for request in requests]
