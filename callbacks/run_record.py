"""Reproducibility and safe stops: what a run was, and a checkpoint when it dies."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint

PACKAGES = ("ppg", "torch", "lightning", "transformers", "peft", "bitsandbytes", "torchmetrics",
            "omegaconf", "jsonargparse", "gguf")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RunRecord(L.Callback):
    """Writes ``run.json`` (seed, command line, package versions, machine) into the log dir.

    The resolved config sits beside it as ``config.yaml`` (LightningCLI's SaveConfigCallback).
    """

    def setup(self, trainer, pl_module, stage):
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0 or log_dir is None:
            return
        record = {"stage": stage, "seed": os.environ.get("PL_GLOBAL_SEED"), "argv": sys.argv,
                  "python": platform.python_version(), "platform": platform.platform(),
                  "packages": package_versions(), "world_size": trainer.world_size}
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "run.json").write_text(json.dumps(record, indent=2))


class CheckpointOnException(OnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint`` writing ``<log dir>/checkpoints/interrupted.ckpt`` on
    any exception (judge failure, non-finite loss, Ctrl-C, SIGTERM), then a one-line reason."""

    def __init__(self):
        super().__init__(dirpath=".", filename="interrupted")

    def setup(self, trainer, pl_module, stage):
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        self.dirpath = os.path.join(log_dir or trainer.default_root_dir, "checkpoints")

    def on_exception(self, trainer, pl_module, exception):
        text = str(exception).strip()
        reason = text.splitlines()[0] if text else type(exception).__name__
        if getattr(pl_module, "policy", None) is None:
            print(f"ppg: stopped: {reason}", file=sys.stderr)
            return
        try:
            super().on_exception(trainer)
            saved = f"checkpoint saved to {self.ckpt_path}"
        except (OSError, RuntimeError, ValueError) as error:  # the stop reason matters more
            saved = f"checkpoint could not be saved ({type(error).__name__})"
        print(f"ppg: stopped: {type(exception).__name__}: {reason}; {saved}", file=sys.stderr)
