"""LoRA adapters in and out of ppg checkpoints, through peft's own state-dict functions.

A ppg checkpoint keeps Lightning's ``state_dict`` (the LoRA tensors, for resuming) and, beside
it, ``ppg_adapter``: the adapters as ``peft.get_peft_model_state_dict`` returns them, with the
LoRA config and the model spec, so a checkpoint can be loaded or exported without the trainer.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

CHECKPOINT_KEY = "ppg_adapter"


def adapter_payload(policy, spec) -> dict:
    """What a checkpoint stores about the adapters: peft state dict, LoRA config, model spec."""
    from peft import get_peft_model_state_dict

    from ppg.models.spec import spec_dict

    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(policy).items()}
    # Plain JSON types only: Lightning may load checkpoints with torch.load(weights_only=True).
    config = json.loads(json.dumps(policy.peft_config["default"].to_dict(),
                                   default=lambda value: sorted(value) if isinstance(value, set) else str(value)))
    return {"state": state, "lora_config": config, "spec": spec_dict(spec)}


def read_checkpoint(ckpt: str | Path) -> dict:
    """The adapter payload of a ppg checkpoint; one-line errors for missing or foreign files."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{str(ckpt)!r} is not a torch checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{str(ckpt)!r} is not a ppg checkpoint (no {CHECKPOINT_KEY!r} entry)")
    return checkpoint[CHECKPOINT_KEY]


def load_adapters_from_checkpoint(policy, ckpt: str | Path) -> None:
    """Set ``policy``'s LoRA weights from a ppg checkpoint (``peft.set_peft_model_state_dict``)."""
    from peft import set_peft_model_state_dict

    payload = read_checkpoint(ckpt)
    result = set_peft_model_state_dict(policy, payload["state"])
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {str(ckpt)!r} does not match the model: unexpected {unexpected[0]}")
