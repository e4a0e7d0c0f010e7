"""One-GPU check: short fits of a small model in bf16 and in nf4 (bitsandbytes), then a resume.

    python tools/gpu_check.py [--model embedded:smollm2-135m-instruct] [--out runs/gpu_check]

Runs ``ppg fit`` (configs/experiment/smoke.yaml on configs/trainer/gpu.yaml: one CUDA GPU,
bf16 autocast) once per precision, then resumes the nf4 run for one more epoch from its
``last.ckpt``. Prints, per run: wall time, training and rollout tokens/s, peak GPU memory,
``rollout/sampler_logprob_gap`` (when the run logs it) and the final loss, as a Markdown
table to paste into docs/gpu.md. Refuses in one line when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import shutil
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = {"bf16": {"quantization": "none", "dtype": "bfloat16"},
        "nf4": {"quantization": "nf4", "dtype": "bfloat16"}}


def _metrics(run_dir: Path) -> dict[str, float]:
    """Mean of each metric column over the rows that have it; the last ``train/loss``."""
    files = sorted(run_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not files:
        return {}
    with files[-1].open() as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for key in ("train/tokens_per_s", "rollout/tokens_per_s", "rollout/sampler_logprob_gap"):
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            out[key] = sum(values) / len(values)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    if losses:
        out["train/loss"] = losses[-1]
    steps = [int(r["step"]) for r in rows if r.get("step")]
    out["steps"] = max(steps) + 1 if steps else 0
    return out


def _fit(name: str, out: Path, model: str, epochs: int, extra: list[str]) -> dict:
    import torch

    from ppg.cli import main

    folder = name.split("-")[0]
    setting = RUNS[folder]
    if "--ckpt_path=last" not in extra:
        shutil.rmtree(out / folder, ignore_errors=True)  # a fresh run, not a leftover checkpoint
    args = ["fit", "--config", str(CONFIGS / "experiment" / "smoke.yaml"),
            "--config", str(CONFIGS / "trainer" / "gpu.yaml"),
            f"--model.model.name_or_path={model}",
            f"--model.model.quantization={setting['quantization']}",
            f"--model.model.dtype={setting['dtype']}",
            f"--trainer.max_epochs={epochs}", "--data.init_args.progress=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name={folder}", *extra]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    main(args)
    seconds = time.perf_counter() - started
    result = _metrics(out / folder)
    result.update(run=name, seconds=seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return result


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def report(results: list[dict], model: str) -> str:
    import torch

    columns = [("run", "run"), ("seconds", "wall s"), ("steps", "steps"),
               ("train/tokens_per_s", "train tok/s"), ("rollout/tokens_per_s", "rollout tok/s"),
               ("peak_gib", "peak GPU GiB"), ("rollout/sampler_logprob_gap", "sampler log-prob gap"),
               ("train/loss", "last loss")]
    title = (f"gpu_check {datetime.date.today().isoformat()} on {torch.cuda.get_device_name()} "
             f"(torch {torch.__version__}, CUDA {torch.version.cuda}), model {model}")
    lines = [title, "",
             "| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    for result in results:
        lines.append("| " + " | ".join(_cell(result.get(key, "absent")) for key, _ in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct",
                        help="name_or_path of a small causal LM (a local folder on offline machines)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for the runs' logs")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each fit")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    results = [_fit("bf16", out, args.model, args.epochs, []),
               _fit("nf4", out, args.model, args.epochs - 1 or 1, [])]
    results.append(_fit("nf4-resumed", out, args.model, (args.epochs - 1 or 1) + 1,
                        ["--ckpt_path=last"]))
    if results[2]["steps"] <= results[1]["steps"]:
        print(f"gpu_check: the resumed run did not train further ({results[1]['steps']} -> "
              f"{results[2]['steps']} steps)", file=sys.stderr)
        return 1
    print(report(results, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
