"""Where a judge's questions go: a local HF causal LM, or an OpenAI-compatible endpoint.

A backend answers chat prompts (lists of ``{"role", "content"}`` messages) two ways:
``yes_probability`` — P(yes) / (P(yes) + P(no)) for a yes/no question — and ``generate`` —
free text. Both return ``None`` for a prompt whose reply could not be read as an answer
(counted in ``stats["parse_failures"]``); judges decide what that means.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ppg.clients import ChatClient, EndpointError, ReplyError, one_line, parse_text, reply_text

Prompt = list[dict]

_LEAD = r"^[\s\"'*`(\[]*(?:answer\s*:\s*|score\s*:\s*)?"
_YES_NO = re.compile(_LEAD + r"(yes|no)\b", re.IGNORECASE)
_SCORE = re.compile(_LEAD + r"(\d{1,2})(?:\s*/\s*10)?(?![\d.])", re.IGNORECASE)


class JudgeError(EndpointError):
    """A judge could not produce a reward (server unreachable, bad replies, rejected request)."""


# --- reading replies -----------------------------------------------------------------------------

def _word(token: str) -> str:
    return token.strip().strip("\"'*`.,:;!()[]").lower()


def yes_from_logprobs(choice: dict) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the top logprobs of the first non-blank token, if present."""
    content = (choice.get("logprobs") or {}).get("content") or []
    for position in content:
        if not _word(position.get("token", "")):
            continue
        if _word(position["token"]) not in ("yes", "no"):
            return None
        mass = {"yes": 0.0, "no": 0.0}
        for entry in position.get("top_logprobs") or [position]:
            word = _word(entry.get("token", ""))
            if word in mass:
                mass[word] += math.exp(float(entry["logprob"]))
        total = mass["yes"] + mass["no"]
        return mass["yes"] / total if total > 0 else None
    return None


def parse_yes(reply: object) -> float:
    """P(yes) in a reply: graded from logprobs when present, else 1.0 / 0.0 from a text that
    starts with yes or no; ``ReplyError`` otherwise."""
    content = reply_text(reply)
    graded = yes_from_logprobs(reply["choices"][0])
    if graded is not None:
        return graded
    match = _YES_NO.match(content)
    if match:
        return 1.0 if match.group(1).lower() == "yes" else 0.0
    raise ReplyError(f"no yes/no verdict in reply {one_line(content, 80)!r}")


def parse_score(reply: object) -> float:
    """An integer 0-10 at the start of the reply, divided by 10; ``ReplyError`` otherwise."""
    content = reply_text(reply)
    match = _SCORE.match(content)
    if match and 0 <= int(match.group(1)) <= 10:
        return int(match.group(1)) / 10
    raise ReplyError(f"no integer 0-10 in reply {one_line(content, 80)!r}")


# --- backends ------------------------------------------------------------------------------------

class JudgeBackend:
    """Base class: answers yes/no questions and writes text for a judge."""

    stats: dict

    def yes_probability(self, prompts: Sequence[Prompt]) -> list[float | None]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Prompt], max_tokens: int,
                 parse: Callable[[str], Any] | None = None) -> list[Any]:
        """Replies as text, or ``parse(text)`` of them (``ReplyError`` = unreadable: None)."""
        raise NotImplementedError


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


class LocalBackend(JudgeBackend):
    """A local HF causal LM: yes/no read from next-token logits (no text generated), batched.

    P(yes) sums the softmax mass of every single-token spelling of yes at the answer position,
    likewise P(no); the result is P(yes) / (P(yes) + P(no)), computed in log space. ``generate``
    decodes greedily. ``model`` is a ``name_or_path`` (hub id, local dir, ``embedded:...``) or a
    model spec dict; it loads on first use and is shared per process. ``LocalBackend.from_loaded``
    reuses a model in memory (a peft model is asked with its adapters off).
    """

    def __init__(self, model: str | dict = "embedded:smollm2-135m-instruct", quantization: str = "none",
                 batch_size: int = 8, device: str = "cpu"):
        from ppg.models import QUANTIZATIONS, resolve_source

        spec = {"name_or_path": model} if isinstance(model, str) else dict(model)
        if "name_or_path" not in spec:
            raise ValueError("model spec needs a 'name_or_path'")
        spec.setdefault("quantization", quantization)
        if spec["quantization"] not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {spec['quantization']!r}")
        resolve_source(spec["name_or_path"])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.disable_adapters = True
        self.stats = {"parse_failures": 0}
        self._loaded = None
        self._ids = None

    @classmethod
    def from_loaded(cls, model, tokenizer, batch_size: int = 8, disable_adapters: bool = True) -> LocalBackend:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        backend = cls(batch_size=batch_size)
        backend.spec = {"name_or_path": getattr(model, "name_or_path", "in-memory"), "quantization": "loaded"}
        backend.device = str(next(model.parameters()).device)
        backend.disable_adapters = disable_adapters
        backend._loaded = (model, tokenizer)
        return backend

    def model(self):
        """``(model, tokenizer)``, loaded on first use."""
        if self._loaded is None:
            self._loaded = _load(self.spec["name_or_path"], self.spec["quantization"], self.device)
        return self._loaded

    def answer_ids(self) -> tuple[list[int], list[int]]:
        if self._ids is None:
            tokenizer = self.model()[1]
            yes, no = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")
            if not yes or not no or set(yes) & set(no):
                raise ValueError(f"judge tokenizer has no distinct single-token yes/no (yes={yes}, no={no})")
            self._ids = (yes, no)
        return self._ids

    def render(self, prompt: Prompt) -> str:
        """The text fed to the model: the chat template with the answer turn open."""
        tokenizer = self.model()[1]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in prompt) + "\nAnswer:"

    @contextlib.contextmanager
    def _frozen(self):
        model, _ = self.model()
        adapters_off = (model.disable_adapter() if self.disable_adapters and hasattr(model, "disable_adapter")
                        else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        try:
            with adapters_off, torch.no_grad():
                yield model
        finally:
            model.train(was_training)

    def _batches(self, prompts: Sequence[Prompt]):
        tokenizer = self.model()[1]
        for start in range(0, len(prompts), self.batch_size):
            texts = [self.render(p) for p in prompts[start:start + self.batch_size]]
            yield tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                            return_tensors="pt")

    def answer_logprobs(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """``[len(prompts), 2]``: log of the (yes, no) masses at the answer position."""
        yes_ids, no_ids = self.answer_ids()
        out = []
        with self._frozen() as model:
            device = next(model.parameters()).device
            for batch in self._batches(prompts):
                batch = batch.to(device)
                mask = batch["attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                               position_ids=positions, logits_to_keep=1).logits[:, -1]
                logprobs = torch.log_softmax(logits.double(), dim=-1)
                out.append(torch.stack([logprobs[:, yes_ids].logsumexp(-1),
                                        logprobs[:, no_ids].logsumexp(-1)], -1))
        return torch.cat(out).cpu() if out else torch.empty(0, 2, dtype=torch.double)

    def yes_probability(self, prompts):
        if not prompts:
            return []
        logprobs = self.answer_logprobs(prompts)
        # P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no)), exact in log space.
        return torch.sigmoid(logprobs[:, 0] - logprobs[:, 1]).tolist()

    def generate(self, prompts, max_tokens, parse=None):
        tokenizer = self.model()[1]
        texts: list[Any] = []
        with self._frozen() as model:
            device = next(model.parameters()).device
            for batch in self._batches(prompts):
                batch = batch.to(device)
                output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
                for row in output[:, batch["input_ids"].shape[1]:]:
                    text = tokenizer.decode(row, skip_special_tokens=True).strip()
                    try:
                        if not text:
                            raise ReplyError("reply is empty")
                        texts.append(parse(text) if parse else text)
                    except ReplyError:
                        self.stats["parse_failures"] += 1
                        texts.append(None)
        return texts


class OpenAIBackend(JudgeBackend):
    """A chat model behind an OpenAI-compatible endpoint (vLLM, ``transformers serve``, hosted).

    Yes/no questions ask for top-20 logprobs (``logprobs``) and read the graded
    P(yes) / (P(yes) + P(no)) from the first answer token when the server returns them, else
    1.0 / 0.0 from a reply that starts with yes or no. Any other reply is a parse failure: asked
    again up to ``max_retries`` times, then ``None``. Transport failures raise ``JudgeError``.
    Connection, retries, concurrency and the on-disk cache are ``ppg.clients.ChatClient``'s.
    ``extra_body`` is merged into every request (a ``None`` value removes a key).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 3, cache_dir: str | None = None, temperature: float = 0.0,
                 logprobs: bool = True, extra_body: dict | None = None):
        self.client = ChatClient(base_url, model, api_key=api_key, api_key_env=api_key_env,
                                 concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                                 cache_dir=cache_dir, name="judge")
        self.temperature, self.logprobs = temperature, logprobs
        self.extra_body = dict(extra_body or {})

    @property
    def stats(self) -> dict:
        return self.client.stats

    def _body(self, prompt: Prompt, **params) -> dict:
        body = self.client.body(prompt, temperature=self.temperature, **params)
        body.update(self.extra_body)
        return {key: value for key, value in body.items() if value is not None}

    def _complete(self, bodies, parse):
        try:
            return self.client.complete(bodies, parse, allow_unparsed=True)
        except EndpointError as error:
            raise JudgeError(str(error)) from None

    def yes_probability(self, prompts):
        extra = {"logprobs": True, "top_logprobs": 20} if self.logprobs else {}
        return self._complete([self._body(p, max_tokens=4, **extra) for p in prompts], parse_yes)

    def generate(self, prompts, max_tokens, parse=None):
        def read(reply):
            text = parse_text(reply)
            return parse(text) if parse else text

        return self._complete([self._body(p, max_tokens=max_tokens) for p in prompts], read)
