"""A local causal LM asked whether the line contradicts the persona, read from next-token logits."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch

from ppg.judges.base import Judge, JudgeRequest

DEFAULT_QUESTION = (
    "Persona:\n{persona}\n\n"
    "Line: \"{line}\"\n\n"
    "Does this line contradict the persona? Answer yes or no."
)
TEMPLATE_FIELDS = ("persona", "line", "history", "turn")


def check_template(template: str, argument: str) -> None:
    """One-line ValueError naming ``argument`` if ``template`` is not a usable prompt template."""
    try:
        template.format(**{field: "" for field in TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{argument} template is invalid ({type(error).__name__}: {error}); "
                         f"fields: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}") from None
    if "{line}" not in template:
        raise ValueError(f"{argument} template must contain {{line}}")


def render(template: str, request: JudgeRequest) -> str:
    """Fill ``template`` with the request's persona facts, history, line and turn."""
    persona = "\n".join(f"- {fact}" for fact in request.context.persona) or "(none given)"
    speakers = {"user": "User", "assistant": "Agent"}
    history = "\n".join(f"{speakers.get(role, role)}: {text}" for role, text in request.history)
    return template.format(persona=persona, line=request.line, history=history or "(none)",
                           turn=request.turn)


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of ``word`` ("yes", "Yes", " yes", "YES", ...)."""
    ids = set()
    for variant in (word.lower(), word.capitalize(), word.upper()):
        for text in (variant, " " + variant):
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if len(tokens) == 1:
                ids.add(tokens[0])
    return sorted(ids)


@functools.lru_cache(maxsize=2)
def _load(name_or_path: str, quantization: str, device: str):
    from ppg.models import load_base_model

    model, tokenizer = load_base_model({"name_or_path": name_or_path, "quantization": quantization},
                                       device=device)
    return model.eval(), tokenizer


class LMJudge(Judge):
    """Reward = P(no) / (P(yes) + P(no)) for "does this line contradict the persona?".

    The question goes through the model's chat template; the probabilities are the softmax
    mass of every single-token spelling of each answer at the first answer position, so no
    text is generated or parsed. ``model`` is a ``name_or_path`` (hub id, local dir,
    ``embedded:...``) or a model spec dict; the model loads on first use and is shared per
    process. ``LMJudge.from_loaded`` reuses a model already in memory (e.g. the policy's base).
    """

    def __init__(self, model: str | dict = "embedded:smollm2-135m-instruct", quantization: str = "none",
                 question: str = DEFAULT_QUESTION, system: str | None = None, batch_size: int = 8,
                 device: str = "cpu"):
        from ppg.models import QUANTIZATIONS, resolve_source

        spec = {"name_or_path": model} if isinstance(model, str) else dict(model)
        if "name_or_path" not in spec:
            raise ValueError("model spec needs a 'name_or_path'")
        spec.setdefault("quantization", quantization)
        if spec["quantization"] not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {spec['quantization']!r}")
        resolve_source(spec["name_or_path"])
        check_template(question, "question")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.question = question
        self.system = system
        self.batch_size = batch_size
        self.device = device
        self.disable_adapters = True
        self._loaded = None
        self._ids = None

    @classmethod
    def from_loaded(cls, model, tokenizer, question: str = DEFAULT_QUESTION, system: str | None = None,
                    batch_size: int = 8, disable_adapters: bool = True) -> LMJudge:
        """A judge on an already-loaded ``(model, tokenizer)``; with ``disable_adapters`` a peft
        model is scored with its LoRA adapters off, i.e. as the frozen base model."""
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        judge = cls(question=question, system=system, batch_size=batch_size)
        judge.spec = {"name_or_path": getattr(model, "name_or_path", "in-memory"), "quantization": "loaded"}
        judge.device = str(next(model.parameters()).device)
        judge.disable_adapters = disable_adapters
        judge._loaded = (model, tokenizer)
        return judge

    def _model(self):
        if self._loaded is None:
            self._loaded = _load(self.spec["name_or_path"], self.spec["quantization"], self.device)
        return self._loaded

    def _answer_ids(self, tokenizer) -> tuple[list[int], list[int]]:
        if self._ids is None:
            yes, no = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")
            if not yes or not no or set(yes) & set(no):
                raise ValueError(f"LMJudge: tokenizer has no distinct single-token yes/no "
                                 f"(yes={yes}, no={no})")
            self._ids = (yes, no)
        return self._ids

    def prompt(self, request: JudgeRequest, tokenizer) -> str:
        """The full text fed to the model: the question in the chat template, answer turn open."""
        messages = [{"role": "user", "content": render(self.question, request)}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in messages) + "\nAnswer:"

    def answer_probabilities(self, requests: Sequence[JudgeRequest]) -> torch.Tensor:
        """``[len(requests), 2]``: softmax mass of (yes, no) spellings at the answer position."""
        return self.answer_logprobs(requests).exp()

    @torch.no_grad()
    def answer_logprobs(self, requests: Sequence[JudgeRequest]) -> torch.Tensor:
        """``[len(requests), 2]``: log of the (yes, no) masses, kept in log space for the ratio."""
        model, tokenizer = self._model()
        yes_ids, no_ids = self._answer_ids(tokenizer)
        adapters_off = (model.disable_adapter() if self.disable_adapters and hasattr(model, "disable_adapter")
                        else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        out = []
        try:
            with adapters_off:
                for start in range(0, len(requests), self.batch_size):
                    texts = [self.prompt(r, tokenizer) for r in requests[start:start + self.batch_size]]
                    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                      return_tensors="pt").to(next(model.parameters()).device)
                    mask = batch["attention_mask"]
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                                   position_ids=positions, logits_to_keep=1).logits[:, -1]
                    logprobs = torch.log_softmax(logits.double(), dim=-1)
                    out.append(torch.stack([logprobs[:, yes_ids].logsumexp(-1),
                                            logprobs[:, no_ids].logsumexp(-1)], -1))
        finally:
            model.train(was_training)
        return torch.cat(out).cpu() if out else torch.empty(0, 2, dtype=torch.double)

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        if not requests:
            return []
        logprobs = self.answer_logprobs(requests)
        # P(no) / (P(yes) + P(no)) = sigmoid(log P(no) - log P(yes)), exact in log space.
        return torch.sigmoid(logprobs[:, 1] - logprobs[:, 0]).tolist()
