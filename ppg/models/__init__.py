"""Models: what to load (``ModelSpec``), loading a quantized policy with LoRA adapters, the
embedded default model, and CPU-only kernels (``ppg.models.cpu``)."""

from ppg.models.loading import (
           load_base_model,
           load_policy,
           load_tokenizer,
           resolve_source,
           tiny_random_llama,
)
from ppg.models.spec import DTYPES, QUANTIZATIONS, LoraSpec, ModelSpec, as_spec, spec_dict

__all__ = ["DTYPES", "QUANTIZATIONS", "LoraSpec", "ModelSpec", "as_spec", "load_base_model",
           "load_policy", "load_tokenizer", "resolve_source", "spec_dict", "tiny_random_llama"]
