"""Test-only callback for multi-process fits: what each rank holds, written to one file per rank.

Importable from configs in tests (the tests put tests/ on PYTHONPATH of the launched ``ppg``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = [
    "--config", str(CONFIGS / "experiment" / "smoke.yaml"),
    "--config", str(CONFIGS / "model" / "tiny-random.yaml"),
    "--data.init_args.rollouts_per_epoch=8", "--data.init_args.group_size=2",
    "--data.init_args.batch_size=2", "--data.init_args.val_contexts=2",
    "--data.init_args.sampling.max_new_tokens=6", "--data.init_args.progress=false",
    "--data.init_args.judge=helpers_for_tests.LengthJudge", "--model.lr=0.01",
    "--model.micro_batch_size=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def launch(tmp_path, *args, out: str, name: str) -> None:
    """``ppg fit`` on the tiny model in a subprocess (``args`` pick the strategy), recording each
    rank into ``tmp_path/out``; asserts it exits 0."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    command = [sys.executable, "-m", "ppg.cli", "fit", *TINY, *args,
               f"--trainer.logger.init_args.name={name}",
               "--trainer.callbacks+=rank_record.RankRecord",
               f"--trainer.callbacks.init_args.out={out}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


class RankRecord(L.Callback):
    """Writes ``<out>/rank<r>_<when>.pt``: the adapters (whole tensors), the logged metrics and,
    under DDP, how many gradient all-reduces ran, at train start and at train end."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.allreduces = 0

    def on_fit_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            def counting_allreduce(record, bucket):
                record.allreduces += 1
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(self, counting_allreduce)

    def _write(self, trainer, pl_module, when: str) -> None:
        from peft import get_peft_model_state_dict

        from ppg.models.sharding import full_tensors

        adapters = full_tensors(get_peft_model_state_dict(pl_module.policy))  # collective under FSDP
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save({"adapters": {k: v.detach().cpu().clone() for k, v in adapters.items()},
                    "metrics": metrics, "allreduces": self.allreduces,
                    "global_step": trainer.global_step, "world_size": trainer.world_size},
                   self.out / f"rank{trainer.global_rank}_{when}.pt")
        (self.out / f"rank{trainer.global_rank}_{when}.json").write_text(json.dumps(metrics, indent=1))

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "end")


def record(folder: Path, rank: int, when: str) -> dict:
    """What ``RankRecord`` wrote for ``rank`` at ``when`` (start or end)."""
    return torch.load(folder / f"rank{rank}_{when}.pt", weights_only=False)


def same(a: dict, b: dict) -> bool:
    """Same keys, bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
