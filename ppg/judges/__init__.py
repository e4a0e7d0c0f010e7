"""Judges: per-turn rewards in [0, 1] (rule, embedding, local LM, OpenAI-compatible HTTP,
persona consistency, combined)."""

from ppg.judges.backends import JudgeBackend, JudgeError, LocalBackend, OpenAIBackend
from ppg.judges.base import Judge, JudgeRequest
from ppg.judges.combined import CombinedJudge
from ppg.judges.consistency import (
    ConsistencyJudge,
    LineToLineJudge,
    PromptToLineJudge,
    QAConsistencyJudge,
)
from ppg.judges.embedding import EmbeddingJudge
from ppg.judges.lm import LMJudge
from ppg.judges.openai_compatible import OpenAIJudge
from ppg.judges.rule import RuleJudge

__all__ = ["CombinedJudge", "ConsistencyJudge", "EmbeddingJudge", "Judge", "JudgeBackend", "JudgeError",
           "JudgeRequest", "LMJudge", "LineToLineJudge", "LocalBackend", "OpenAIBackend", "OpenAIJudge",
           "PromptToLineJudge", "QAConsistencyJudge", "RuleJudge"]
