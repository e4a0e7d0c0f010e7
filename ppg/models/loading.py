"""Policy loading: a (quantized) causal LM with LoRA adapters, only the adapters trainable."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ppg.models.cpu.gqa_attention import use_cpu_gqa_attention
from ppg.models.cpu.memory import detach_from_checkpoint_file
from ppg.models.cpu.nf4_layouts import keep_both_nf4_layouts
from ppg.models.embedded import EMBEDDED_MODELS, SMOLLM2, TINY_RANDOM, embedded_model_dir
from ppg.models.spec import QUANTIZATIONS, ModelSpec, as_spec, resolve_device, resolve_dtype

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_source(name_or_path: str) -> tuple[str, Path | str]:
    """Classify ``name_or_path`` as ("embedded", name), ("local", dir) or ("hub", id)."""
    if name_or_path.startswith("embedded:"):
        name = name_or_path.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise ValueError(
                f"unknown model name {name_or_path!r}; embedded models: "
                + ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
            )
        return "embedded", name
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name_or_path!r} is not a directory")
        return "local", path
    if name_or_path.startswith((".", "/", "~")) or not _HUB_ID.match(name_or_path):
        raise ValueError(f"model path {name_or_path!r} does not exist")
    return "hub", name_or_path


def load_tokenizer(spec: ModelSpec | dict | None = None):
    """The tokenizer of ``spec``'s model, left-padded, with a pad token."""
    from transformers import AutoTokenizer

    spec = as_spec(spec)
    kind, source = resolve_source(spec.name_or_path)
    if kind == "embedded":
        source = embedded_model_dir(SMOLLM2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    except OSError as error:
        raise ValueError(f"cannot load tokenizer for {spec.name_or_path!r}: {_first_line(error)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_random_llama(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random Llama sized to ``tokenizer`` (fast tests, smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(spec: ModelSpec | dict | None = None, device: str | torch.device = "auto"):
    """The frozen base model of ``spec`` (quantized as asked) and its tokenizer, no adapters.

    ``device``: ``auto`` is CUDA when available (the current device), else the CPU.
    """
    from transformers import AutoModelForCausalLM

    spec = as_spec(spec)
    if spec.quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {spec.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # device_map needs the index
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(spec.dtype, device)
    kind, source = resolve_source(spec.name_or_path)
    tokenizer = load_tokenizer(spec)
    if kind == "embedded" and source == TINY_RANDOM:
        model = tiny_random_llama(tokenizer, seed=spec.seed, dtype=dtype)
        if spec.quantization != "none":
            model = _quantize_in_memory(model, spec.quantization, dtype, device)
    else:
        if kind == "embedded":
            source = embedded_model_dir(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=spec.gguf_file, dtype=dtype, device_map={"": device},
                quantization_config=_quantization_config(spec.quantization, dtype),
            )
        except OSError as error:
            raise ValueError(f"cannot load model {spec.name_or_path!r}: {_first_line(error)}") from None
        detach_from_checkpoint_file(model)
    if spec.quantization == "none":
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.quantization == "nf4":
        keep_both_nf4_layouts(model)
    use_cpu_gqa_attention(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def _quantize_in_memory(model, quantization: str, dtype: torch.dtype, device: torch.device):
    """Quantize an in-memory model's Linear layers by a save/reload round trip through a temp dir."""
    import tempfile

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    # Not save_pretrained: under torch.distributed it writes on rank 0 only.
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        return AutoModelForCausalLM.from_pretrained(
            tmp, dtype=dtype, device_map={"": device},
            quantization_config=_quantization_config(quantization, dtype),
        )


def load_policy(spec: ModelSpec | dict | None = None, device: str | torch.device = "auto"):
    """Load ``spec`` as a policy: quantized frozen base + trainable LoRA adapters (peft).

    Returns ``(model, tokenizer)``; only LoRA parameters have ``requires_grad``. They are fp32
    whatever the base dtype (peft's ``autocast_adapter_dtype``), so under bf16 autocast the
    adapters and their optimizer state stay fp32.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = as_spec(spec)
    torch.manual_seed(spec.seed)
    model, tokenizer = load_base_model(spec, device)
    if spec.prepare_kbit and spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"lora.target_modules={lora.target_modules!r}: {_first_line(error)}") from None
    model.config.use_cache = True
    return model, tokenizer


def enable_gradient_checkpointing(policy) -> None:
    """Recompute each decoder layer's activations in the backward pass. Applies to training
    forwards only: transformers turns it off in eval mode, so sampling keeps its KV cache.
    Non-reentrant checkpointing, so LoRA gradients flow although the frozen inputs need none."""
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
