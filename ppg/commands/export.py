"""``ppg export``: a checkpoint's LoRA adapters as a standard peft folder, or a merged model."""

from __future__ import annotations

from pathlib import Path

import torch

from ppg.models import load_base_model, load_policy
from ppg.models.adapters import read_checkpoint
from ppg.models.spec import as_spec


def export(ckpt: str, out: str, merge: bool = False) -> Path:
    """Write a ppg checkpoint's adapters as a peft adapter folder, or with ``--merge`` a full model.

    The adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer) loads with
    ``peft.PeftModel.from_pretrained`` and vLLM's LoRA loading. The merged folder holds the base
    weights (dequantized if the base was nf4/int8: the weights the adapters were trained on) plus
    the merged adapters, and loads with ``transformers.AutoModelForCausalLM`` alone.

    Args:
        ckpt: a ppg checkpoint (``last.ckpt``, ``interrupted.ckpt``).
        out: output folder (created).
        merge: merge the adapters into the base and write a full model instead.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    payload = read_checkpoint(ckpt)
    spec = as_spec(payload["spec"])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge:
        base, tokenizer = load_base_model(spec)
        if spec.quantization != "none":
            base = base.dequantize()
        model = get_peft_model(base, LoraConfig(**_config_fields(payload["lora_config"])))
        set_peft_model_state_dict(model, payload["state"])
        merged = model.merge_and_unload()
        merged.config.quantization_config = None
        if hasattr(merged, "hf_quantizer"):
            merged.hf_quantizer = None
        merged.to(torch.float32 if spec.dtype == "float32" else merged.dtype)
        merged.save_pretrained(out_dir)
        kind = "merged model"
    else:
        policy, tokenizer = load_policy(spec)
        set_peft_model_state_dict(policy, payload["state"])
        policy.save_pretrained(out_dir)
        kind = "peft adapter"
    tokenizer.save_pretrained(out_dir)
    print(f"ppg export: wrote a {kind} for {spec.name_or_path} ({spec.quantization}) to {out_dir}")
    return out_dir


def _config_fields(config: dict) -> dict:
    """The LoraConfig arguments of a stored config (drops the fields peft fills in itself)."""
    import dataclasses

    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return {k: v for k, v in config.items() if k in names and k not in ("peft_type", "revision")}
