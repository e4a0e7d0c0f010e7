"""A local causal LM asked whether the line contradicts the persona, read from next-token logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ppg.judges.backends import LocalBackend, answer_token_ids
from ppg.judges.base import Judge, JudgeRequest

__all__ = ["DEFAULT_QUESTION", "LMJudge", "answer_token_ids", "check_template", "render"]

DEFAULT_QUESTION = (
    "Persona:\n{persona}\n\n"
    "Line: \"{line}\"\n\n"
    "Does this line contradict the persona? Answer yes or no."
)
TEMPLATE_FIELDS = ("persona", "line", "history", "turn")


def check_template(template: str, argument: str,
                   fields: tuple[str, ...] = TEMPLATE_FIELDS) -> str:
    """``template`` if it formats with ``fields`` and holds ``{line}``; else a one-line ValueError
    naming ``argument``."""
    try:
        template.format(**{field: "" for field in fields})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{argument} template is invalid ({type(error).__name__}: {error}); "
                         f"fields: {', '.join('{' + f + '}' for f in fields)}") from None
    if "{line}" not in template:
        raise ValueError(f"{argument} template must contain {{line}}")
    return template


def render(template: str, request: JudgeRequest) -> str:
    """Fill ``template`` with the request's persona facts, history, line and turn."""
    persona = "\n".join(f"- {fact}" for fact in request.context.persona) or "(none given)"
    speakers = {"user": "User", "assistant": "Agent"}
    history = "\n".join(f"{speakers.get(role, role)}: {text}" for role, text in request.history)
    return template.format(persona=persona, line=request.line, history=history or "(none)",
                           turn=request.turn)


class LMJudge(Judge):
    """Reward = P(no) / (P(yes) + P(no)) for "does this line contradict the persona?".

    The question goes through the model's chat template; the probabilities are the softmax
    mass of every single-token spelling of each answer at the first answer position, so no
    text is generated or parsed (``ppg.judges.backends.LocalBackend``). ``model`` is a
    ``name_or_path`` (hub id, local dir, ``embedded:...``) or a model spec dict; the model loads
    on first use and is shared per process. ``LMJudge.from_loaded`` reuses a model already in
    memory (e.g. the policy's base).
    """

    def __init__(self, model: str | dict = "embedded:smollm2-135m-instruct", quantization: str = "none",
                 question: str = DEFAULT_QUESTION, system: str | None = None, batch_size: int = 8,
                 device: str = "auto"):
        from ppg.models.spec import resolve_device

        check_template(question, "question")
        # auto: CUDA when available (the current device at load time: the trainer's), else CPU
        self.backend = LocalBackend(model, quantization, batch_size, str(resolve_device(device)))
        self.question, self.system = question, system

    @classmethod
    def from_loaded(cls, model, tokenizer, question: str = DEFAULT_QUESTION, system: str | None = None,
                    batch_size: int = 8, disable_adapters: bool = True) -> LMJudge:
        """A judge on an already-loaded ``(model, tokenizer)``; with ``disable_adapters`` a peft
        model is scored with its LoRA adapters off, i.e. as the frozen base model."""
        check_template(question, "question")
        judge = cls.__new__(cls)
        judge.backend = LocalBackend.from_loaded(model, tokenizer, batch_size, disable_adapters)
        judge.question, judge.system = question, system
        return judge

    def messages(self, request: JudgeRequest) -> list[dict]:
        messages = [{"role": "user", "content": render(self.question, request)}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def prompt(self, request: JudgeRequest, tokenizer=None) -> str:
        """The full text fed to the model: the question in the chat template, answer turn open."""
        return self.backend.render(self.messages(request))

    def answer_probabilities(self, requests: Sequence[JudgeRequest]) -> torch.Tensor:
        """``[len(requests), 2]``: softmax mass of (yes, no) spellings at the answer position."""
        return self.answer_logprobs(requests).exp()

    def answer_logprobs(self, requests: Sequence[JudgeRequest]) -> torch.Tensor:
        """``[len(requests), 2]``: log of the (yes, no) masses, kept in log space for the ratio."""
        return self.backend.answer_logprobs([self.messages(r) for r in requests])

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        return [1.0 - p for p in self.backend.yes_probability([self.messages(r) for r in requests])]
