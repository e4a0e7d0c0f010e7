"""Reproducibility and safe stops: what a run was, and a checkpoint when it dies."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import lightning as L

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


class CheckpointOnException(L.Callback):
    """On any exception (judge failure, non-finite loss, Ctrl-C) save ``interrupted.ckpt`` first."""

    def on_exception(self, trainer, pl_module, exception):
        reason = str(exception).strip().splitlines()[0] if str(exception).strip() else type(exception).__name__
        # Not trainer.log_dir: it broadcasts, and other ranks may not be here.
        log_dir = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
        if getattr(pl_module, "policy", None) is None or log_dir is None:
            print(f"ppg: stopped: {reason}", file=sys.stderr)
            return
        path = Path(log_dir) / "checkpoints" / "interrupted.ckpt"
        try:
            if trainer.world_size == 1:
                trainer.save_checkpoint(path)
            else:  # other ranks may not have failed: no collectives, one file per rank
                path = path.with_name(f"interrupted-rank{trainer.global_rank}.ckpt")
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            saved = f"checkpoint saved to {path}"
        except (OSError, RuntimeError, ValueError) as error:  # the stop reason matters more
            saved = f"checkpoint could not be saved ({type(error).__name__})"
        print(f"ppg: stopped: {type(exception).__name__}: {reason}; {saved}", file=sys.stderr)
