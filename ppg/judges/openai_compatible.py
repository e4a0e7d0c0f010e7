"""A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, ``transformers
serve``, hosted APIs): the persona question of ``LMJudge`` asked over HTTP.

Connection, retries, concurrency and the on-disk cache are ``ppg.clients.ChatClient``'s.
Persistent failure raises ``JudgeError``: a reward is never silently replaced by a default.
"""

from __future__ import annotations

from collections.abc import Sequence

from ppg.clients import ChatClient, EndpointError, ReplyError
from ppg.judges.backends import JudgeError, parse_score, parse_yes
from ppg.judges.base import Judge, JudgeRequest
from ppg.judges.lm import DEFAULT_QUESTION, check_template, render

__all__ = ["JudgeError", "OpenAIJudge", "ReplyError", "parse_reply"]

SCORE_QUESTION = (
    "Persona:\n{persona}\n\n"
    "Line: \"{line}\"\n\n"
    "How consistent is this line with the persona, from 0 (contradicts it) to 10 (fully "
    "consistent)? Reply with a single integer."
)
VERDICTS = {"yes_no": DEFAULT_QUESTION + " Reply with one word.", "score": SCORE_QUESTION}


def parse_reply(reply: object, verdict: str) -> float:
    """The reward in a chat-completions reply; ``ReplyError`` if it holds no usable verdict.

    ``yes_no``: the question asks whether the line contradicts the persona, so reward = P(no).
    Integer scores are read from text only (a multi-token "10" makes logprobs ambiguous).
    """
    if verdict == "yes_no":
        return 1.0 - parse_yes(reply)
    return parse_score(reply)


class OpenAIJudge(Judge):
    """Asks a chat model behind an OpenAI-compatible endpoint whether each line fits the persona.

    ``verdict="yes_no"`` (default) asks "does this line contradict the persona?"; the reward is
    1 for "no", 0 for "yes", or P(no)/(P(yes)+P(no)) when the server returns logprobs.
    ``verdict="score"`` asks for an integer 0-10, reward = value / 10. ``prompt`` overrides the
    question (fields ``{persona}``, ``{line}``, ``{history}``, ``{turn}``) and must ask for the
    same kind of answer. ``base_url`` is the API root as for the OpenAI client
    (``http://host:8000/v1``); ``api_key`` falls back to the ``api_key_env`` variable. Up to
    ``concurrency`` requests are in flight; the openai client retries transport errors and HTTP
    408/409/429/5xx ``max_retries`` times with backoff, an unparseable reply is asked again as
    often, then ``JudgeError``. ``cache_dir``: replies stored on disk by hash of URL + body.
    ``extra_body`` is merged into every request (a ``None`` value removes a key, e.g.
    ``{"max_tokens": null, "max_completion_tokens": 64}``). ``stats`` is the client's counters.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", verdict: str = "yes_no",
                 prompt: str | None = None, system: str | None = None, concurrency: int = 4,
                 timeout: float = 30.0, max_retries: int = 3, cache_dir: str | None = None,
                 max_tokens: int = 8, temperature: float = 0.0, logprobs: bool = True,
                 extra_body: dict | None = None):
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        if prompt is not None:
            check_template(prompt, "prompt")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.client = ChatClient(base_url, model, api_key=api_key, api_key_env=api_key_env,
                                 concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                                 cache_dir=cache_dir, name="OpenAIJudge")
        self.url = self.client.url
        self.verdict = verdict
        self.prompt = prompt or VERDICTS[verdict]
        self.system = system
        self.max_tokens, self.temperature, self.logprobs = max_tokens, temperature, logprobs
        self.extra_body = dict(extra_body or {})

    @property
    def stats(self) -> dict:
        return self.client.stats

    def body(self, request: JudgeRequest) -> dict:
        """The JSON body sent for ``request``."""
        messages = [{"role": "user", "content": render(self.prompt, request)}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        body = self.client.body(messages, max_tokens=self.max_tokens, temperature=self.temperature)
        if self.logprobs and self.verdict == "yes_no":
            body.update(logprobs=True, top_logprobs=20)
        body.update(self.extra_body)
        return {key: value for key, value in body.items() if value is not None}

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        try:
            return self.client.complete([self.body(r) for r in requests],
                                        lambda reply: parse_reply(reply, self.verdict))
        except EndpointError as error:
            raise JudgeError(str(error)) from None
