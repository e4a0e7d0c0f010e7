"""User simulators: who answers the agent between its turns.

Every simulator answers a batch at once: ``respond(contexts, histories, turn)`` returns one
reply per conversation, or ``None`` where the user ends the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.hf import generate_replies
from ppg.types import Context, History


def user_view(context: Context, history: History) -> list[dict]:
    """The conversation from the simulated user's side: roles swapped, the user's own prompt."""
    messages = [{"role": "system", "content": context.user_system_prompt}]
    for role, text in history:
        messages.append({"role": "assistant" if role == "user" else "user", "content": text})
    return messages


class UserSimulator:
    """Base class; ``bind`` gives model-backed simulators access to the policy when they need it."""

    def bind(self, policy, tokenizer) -> None:
        pass

    def respond(self, contexts: Sequence[Context], histories: Sequence[History], turn: int) -> list[str | None]:
        raise NotImplementedError


class ScriptedUser(UserSimulator):
    """Replies with the context's ``user_lines[turn]`` (e.g. the other side of a logged chat).

    When the lines run out the conversation ends, or restarts from the first line if ``cycle``.
    """

    def __init__(self, cycle: bool = False):
        self.cycle = cycle

    def respond(self, contexts, histories, turn):
        replies = []
        for context in contexts:
            lines = context.user_lines
            if turn < len(lines):
                replies.append(lines[turn])
            else:
                replies.append(lines[turn % len(lines)] if self.cycle and lines else None)
        return replies


class _ModelBackedUser(UserSimulator):
    def __init__(self, sampling: Sampling | None = None):
        self.sampling = sampling or Sampling(temperature=0.7, max_new_tokens=40)

    def _generate(self, model, tokenizer, contexts, histories) -> list[str]:
        conversations = [user_view(c, h) for c, h in zip(contexts, histories)]
        return generate_replies(model, tokenizer, conversations, self.sampling)


class SelfPlayUser(_ModelBackedUser):
    """The policy's own base model with LoRA adapters disabled, playing the user's role prompt.

    Uses the already-loaded policy (no second copy of the weights in memory).
    """

    def bind(self, policy, tokenizer):
        self.policy, self.tokenizer = policy, tokenizer

    def respond(self, contexts, histories, turn):
        if not hasattr(self, "policy"):
            raise RuntimeError("SelfPlayUser is not bound to a policy; the rollout engine binds it")
        with self.policy.disable_adapter():
            return self._generate(self.policy, self.tokenizer, contexts, histories)


class ModelUser(_ModelBackedUser):
    """Any other HF causal LM as the user (loaded once, frozen, optionally quantized)."""

    def __init__(self, name_or_path: str, quantization: str = "none", sampling: Sampling | None = None):
        super().__init__(sampling)
        self.spec = {"name_or_path": name_or_path, "quantization": quantization}
        self._model = None

    def respond(self, contexts, histories, turn):
        if self._model is None:
            from ppg.models import load_base_model

            self._model, self._tokenizer = load_base_model(self.spec)
        return self._generate(self._model, self._tokenizer, contexts, histories)


class OpenAIUser(UserSimulator):
    """A chat model behind an OpenAI-compatible endpoint (vLLM, ``transformers serve``, hosted).

    Requests run ``concurrency`` at a time; a failed one is retried ``max_retries`` times with
    exponential backoff, then the rollout stops with a one-line error naming the URL.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 max_tokens: int = 64, temperature: float = 0.7, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, concurrency: int = 4):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIUser: base_url must be an http(s) URL, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, concurrency

    def _ask(self, messages: list[dict]) -> str:
        import json
        import time
        import urllib.request

        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"].strip()
            except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
                last = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        from ppg.judges.openai_compatible import JudgeError

        raise JudgeError(f"OpenAIUser: {self.url} failed after {self.max_retries + 1} attempt(s); last error: {last}")

    def respond(self, contexts, histories, turn):
        from concurrent.futures import ThreadPoolExecutor

        conversations = [user_view(c, h) for c, h in zip(contexts, histories)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(conversations)))) as pool:
            return list(pool.map(self._ask, conversations))
