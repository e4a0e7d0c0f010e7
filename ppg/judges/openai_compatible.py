"""A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, ``transformers
serve``, hosted APIs), with a concurrency limit, retries, and an on-disk cache.

Standard library only (urllib + threads). Persistent failure raises ``JudgeError``: a reward
is never silently replaced by a default value.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ppg.judges.base import Judge, JudgeRequest
from ppg.judges.lm import DEFAULT_QUESTION, check_template, render

SCORE_QUESTION = (
    "Persona:\n{persona}\n\n"
    "Line: \"{line}\"\n\n"
    "How consistent is this line with the persona, from 0 (contradicts it) to 10 (fully "
    "consistent)? Reply with a single integer."
)
VERDICTS = {"yes_no": DEFAULT_QUESTION + " Reply with one word.", "score": SCORE_QUESTION}
# Retrying these can help (rate limit, overload, gateway trouble); other 4xx are our fault.
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_LEAD = r"^[\s\"'*`(\[]*(?:answer\s*:\s*|score\s*:\s*)?"
_YES_NO = re.compile(_LEAD + r"(yes|no)\b", re.IGNORECASE)
_SCORE = re.compile(_LEAD + r"(\d{1,2})(?:\s*/\s*10)?(?![\d.])", re.IGNORECASE)


class JudgeError(RuntimeError):
    """A judge could not produce a reward (server unreachable, bad replies, rejected request)."""


class ReplyError(ValueError):
    """A reply that maps to no reward; counted as a failed attempt."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _word(token: str) -> str:
    return token.strip().strip("\"'*`.,:;!()[]").lower()


def verdict_from_logprobs(choice: dict, verdict: str) -> float | None:
    """P(no) / (P(yes) + P(no)) from the top logprobs of the first non-blank token, if present.

    Only for ``yes_no``: integer scores may span several tokens, so they are read from text.
    """
    if verdict != "yes_no":
        return None
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
        return mass["no"] / total if total > 0 else None
    return None


def parse_reply(reply: object, verdict: str) -> float:
    """The reward in a chat-completions reply; ``ReplyError`` if it holds no usable verdict."""
    try:
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReplyError("reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ReplyError(f"reply content is {type(content).__name__}, not text")
    from_logprobs = verdict_from_logprobs(choice, verdict)
    if from_logprobs is not None:
        return from_logprobs
    if verdict == "yes_no":
        match = _YES_NO.match(content)
        if match:
            # The question asks whether the line contradicts the persona: "no" is the good answer.
            return 1.0 if match.group(1).lower() == "no" else 0.0
        raise ReplyError(f"no yes/no verdict in reply {_one_line(content, 80)!r}")
    match = _SCORE.match(content)
    if match and 0 <= int(match.group(1)) <= 10:
        return int(match.group(1)) / 10
    raise ReplyError(f"no integer 0-10 in reply {_one_line(content, 80)!r}")


class OpenAIJudge(Judge):
    """Asks a chat model behind an OpenAI-compatible endpoint whether each line fits the persona.

    ``verdict="yes_no"`` (default) asks "does this line contradict the persona?"; the reward is
    1 for "no", 0 for "yes", or P(no)/(P(yes)+P(no)) when the server returns logprobs.
    ``verdict="score"`` asks for an integer 0-10, reward = value / 10. ``prompt`` overrides the
    question (fields ``{persona}``, ``{line}``, ``{history}``, ``{turn}``) and must ask for the
    same kind of answer. ``base_url`` is the API root as for the OpenAI client
    (``http://host:8000/v1``). ``api_key`` falls back to the ``api_key_env`` variable.
    Up to ``concurrency`` requests are in flight; a failed request (connection error, timeout,
    HTTP 408/429/5xx, unparseable reply) is retried ``max_retries`` times after
    ``backoff * 2**attempt`` seconds, then ``JudgeError``. With ``cache_dir`` each reply is
    stored as a JSON file named by the hash of URL + request body, so identical requests are
    answered from disk. ``extra_body`` is merged into every request (a ``None`` value removes a
    key, e.g. ``{"max_tokens": null, "max_completion_tokens": 64}``).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", verdict: str = "yes_no",
                 prompt: str | None = None, system: str | None = None, concurrency: int = 4,
                 timeout: float = 30.0, max_retries: int = 3, backoff: float = 0.5,
                 cache_dir: str | None = None, max_tokens: int = 8, temperature: float = 0.0,
                 logprobs: bool = True, extra_body: dict | None = None):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if not model:
            raise ValueError("model must name the served model")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        if prompt is not None:
            check_template(prompt, "prompt")
        for name, value, least in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                                   ("max_tokens", max_tokens, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
        endpoint = base_url.rstrip("/")
        self.url = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.verdict = verdict
        self.prompt = prompt or VERDICTS[verdict]
        self.system = system
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.logprobs = logprobs
        self.extra_body = dict(extra_body or {})
        self.stats = {"http_requests": 0, "cache_hits": 0, "failures": 0}
        self._lock = threading.Lock()

    def body(self, request: JudgeRequest) -> dict:
        """The JSON body sent for ``request``."""
        messages = [{"role": "user", "content": render(self.prompt, request)}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        if self.logprobs and self.verdict == "yes_no":
            body.update(logprobs=True, top_logprobs=20)
        body.update(self.extra_body)
        return {key: value for key, value in body.items() if value is not None}

    def cache_key(self, body: dict) -> str:
        canonical = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _from_cache(self, key: str) -> float | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            reward = parse_reply(json.loads(path.read_text())["response"], self.verdict)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: ask the server again
        self._count("cache_hits")
        return reward

    def _to_cache(self, key: str, body: dict, reply: dict) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        partial.write_text(json.dumps({"url": self.url, "request": body, "response": reply}, indent=1))
        os.replace(partial, self.cache_dir / f"{key}.json")

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        self._count("http_requests")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise ReplyError(f"reply is not JSON: {_one_line(raw.decode(errors='replace'), 80)!r}") from None

    def _score_body(self, key: str, body: dict) -> float:
        cached = self._from_cache(key)
        if cached is not None:
            return cached
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._post(body)
                reward = parse_reply(reply, self.verdict)
            except urllib.error.HTTPError as error:
                detail = _one_line(error.read().decode(errors="replace"), 200)
                last = f"HTTP {error.code}: {detail}"
                if error.code not in RETRYABLE_STATUS:
                    raise JudgeError(f"OpenAIJudge: {self.url} rejected the request: {last}") from None
            except ReplyError as error:
                last = f"malformed reply: {error}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, timeout, DNS
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {_one_line(reason)}"
            except http.client.HTTPException as error:  # e.g. a reply cut short
                last = f"{type(error).__name__}: {_one_line(error)}"
            else:
                self._to_cache(key, body, reply)
                return reward
            self._count("failures")
        raise JudgeError(f"OpenAIJudge: {self.url} failed after {self.max_retries + 1} attempt(s); "
                         f"last error: {last}")

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        bodies = [self.body(request) for request in requests]
        keys = [self.cache_key(body) for body in bodies]
        unique = dict(zip(keys, bodies))  # identical requests in one batch are asked once
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(unique))) as pool:
            futures = {key: pool.submit(self._score_body, key, body) for key, body in unique.items()}
            try:
                rewards = {key: future.result() for key, future in futures.items()}
            except JudgeError:
                for future in futures.values():
                    future.cancel()
                raise
        return [rewards[key] for key in keys]
