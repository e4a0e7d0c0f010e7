"""Judges: per-turn rewards in [0, 1] (rule, embedding, local LM, OpenAI-compatible HTTP, combined)."""

from ppg.judges.base import Judge, JudgeRequest
from ppg.judges.combined import CombinedJudge
from ppg.judges.embedding import EmbeddingJudge
from ppg.judges.lm import LMJudge
from ppg.judges.openai_compatible import JudgeError, OpenAIJudge
from ppg.judges.rule import RuleJudge

__all__ = ["CombinedJudge", "EmbeddingJudge", "Judge", "JudgeError", "JudgeRequest", "LMJudge",
           "OpenAIJudge", "RuleJudge"]
