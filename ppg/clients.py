"""One client for OpenAI-compatible chat endpoints (vLLM, ``transformers serve``, hosted APIs).

Built on the ``openai`` package: its client does the HTTP, the timeout and the retries
(connection errors, timeouts, HTTP 408/409/429/5xx, with backoff and ``Retry-After``). This
module adds what judges and simulated users share on top: a limit on requests in flight
(asyncio), an on-disk reply cache, and strict reply parsing where an unusable reply is counted
and asked again. Persistent failure raises ``EndpointError`` with a one-line message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["ChatClient", "EndpointError", "ReplyError", "one_line", "parse_text", "reply_text"]


class EndpointError(RuntimeError):
    """An endpoint gave no usable reply (unreachable, rejected the request, unusable replies)."""


class ReplyError(ValueError):
    """A reply the caller's parser cannot use; counted as a parse failure and asked again."""


def one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def reply_text(reply: object) -> str:
    """``choices[0].message.content`` of a chat-completions reply; ``ReplyError`` if absent."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReplyError("reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ReplyError(f"reply content is {type(content).__name__}, not text")
    return content


def parse_text(reply: object) -> str:
    """The reply's text, stripped; ``ReplyError`` if empty."""
    text = reply_text(reply).strip()
    if not text:
        raise ReplyError("reply is empty")
    return text


def _run(coroutine):
    """Run ``coroutine`` to completion, also from code that already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class ChatClient:
    """Chat completions from one endpoint, ``concurrency`` requests in flight.

    ``base_url`` is the API root as for the OpenAI client (``http://127.0.0.1:8000/v1``).
    ``api_key`` falls back to the ``api_key_env`` variable (a placeholder when neither is set:
    local servers ignore it). Each request is tried ``1 + max_retries`` times by the openai
    client for transport errors and retryable statuses; a reply that ``parse`` rejects with
    ``ReplyError`` is asked again up to ``max_retries`` times. With ``cache_dir`` each usable
    reply is stored as ``<sha256 of URL + body>.json`` and identical requests are answered from
    disk (assumes deterministic answers, e.g. temperature 0). ``stats`` counts ``requests``
    (HTTP requests sent, retries included), ``cache_hits``, ``http_errors`` (responses with a
    status >= 400) and ``parse_failures`` (replies ``parse`` rejected).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, timeout: float = 30.0,
                 max_retries: int = 3, cache_dir: str | None = None, name: str = "endpoint"):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                             f"got {base_url!r}")
        if not model:
            raise ValueError("model must name the served model")
        for key, value, least in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/").removesuffix("/chat/completions")
        self.url = self.base_url + "/chat/completions"
        self.model, self.name = model, name
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.stats = {"requests": 0, "cache_hits": 0, "http_errors": 0, "parse_failures": 0}
        self._lock = threading.Lock()

    def body(self, messages: list[dict], **params: Any) -> dict:
        """A request body for ``messages``; ``None``-valued parameters are left out."""
        body = {"model": self.model, "messages": messages, **params}
        return {key: value for key, value in body.items() if value is not None}

    def cache_key(self, body: dict) -> str:
        canonical = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def complete(self, bodies: Sequence[dict], parse: Callable[[dict], Any],
                 allow_unparsed: bool = False, dedupe: bool = True) -> list[Any]:
        """``parse(reply)`` of each body's reply, in order.

        Identical bodies are asked once unless ``dedupe=False`` (sampled replies that should
        differ). A body whose replies ``parse`` rejected every time gives ``None`` if
        ``allow_unparsed``, else ``EndpointError``. Transport failures always raise it.
        """
        if not bodies:
            return []
        keys = [self.cache_key(body) for body in bodies] if dedupe else list(range(len(bodies)))
        unique = dict(zip(keys, bodies))
        results = _run(self._complete_all(unique, parse, allow_unparsed))
        return [results[key] for key in keys]

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[key] += amount

    async def _complete_all(self, unique: dict[str, dict], parse, allow_unparsed) -> dict:
        import openai  # about 1 s to import: only when a request is made

        async def on_request(request):
            self._count("requests")

        async def on_response(response):
            if response.status_code >= 400:
                self._count("http_errors")

        http_client = openai.DefaultAsyncHttpx2Client(
            event_hooks={"request": [on_request], "response": [on_response]})
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "not-needed",
                                    timeout=self.timeout, max_retries=self.max_retries,
                                    http_client=http_client)
        limit = asyncio.Semaphore(self.concurrency)
        async with client:
            tasks = [self._complete_one(client, limit, body, parse, allow_unparsed)
                     for body in unique.values()]
            results = await asyncio.gather(*tasks)
        return dict(zip(unique, results))

    async def _complete_one(self, client, limit, body, parse, allow_unparsed):
        key = self.cache_key(body)
        cached = self._from_cache(key, parse)
        if cached is not None:
            return cached
        params = {k: v for k, v in body.items() if k not in ("model", "messages")}
        last = "no attempt made"
        for _ in range(self.max_retries + 1):
            async with limit:
                text = await self._post(client, body, params)
            try:
                reply = json.loads(text)
                result = parse(reply)
            except ValueError as error:  # ReplyError, or a body that is not JSON
                self._count("parse_failures")
                last = (f"malformed reply: {error}" if isinstance(error, ReplyError)
                        else f"reply is not JSON: {one_line(text, 80)!r}")
                continue
            self._to_cache(key, body, reply)
            return result
        if allow_unparsed:
            return None
        raise EndpointError(f"{self.name}: {self.url} gave no usable reply in "
                            f"{self.max_retries + 1} attempt(s); last error: {last}")

    async def _post(self, client, body: dict, params: dict) -> str:
        import openai

        attempts = f"failed after {self.max_retries + 1} attempt(s)"
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"], extra_body=params)
            return raw.http_response.text
        except openai.APIStatusError as error:
            detail = f"HTTP {error.status_code}: {one_line(error.response.text, 200)}"
            if error.status_code in (408, 409, 429) or error.status_code >= 500:  # retried by openai
                raise EndpointError(f"{self.name}: {self.url} {attempts}; last error: {detail}") from None
            raise EndpointError(f"{self.name}: {self.url} rejected the request: {detail}") from None
        except openai.APITimeoutError:
            raise EndpointError(f"{self.name}: {self.url} {attempts}; last error: timed out "
                                f"after {self.timeout:g} s") from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise EndpointError(f"{self.name}: {self.url} {attempts}; last error: "
                                f"{type(cause).__name__}: {one_line(cause, 200)}") from None

    def _from_cache(self, key: str, parse):
        if self.cache_dir is None:
            return None
        try:
            result = parse(json.loads((self.cache_dir / f"{key}.json").read_text())["response"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unusable: ask the server
        self._count("cache_hits")
        return result

    def _to_cache(self, key: str, body: dict, reply: dict) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        partial.write_text(json.dumps({"url": self.url, "request": body, "response": reply}, indent=1))
        os.replace(partial, self.cache_dir / f"{key}.json")
