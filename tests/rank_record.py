"""Test-only callback for multi-process fits: what each rank holds, written to one file per rank.

Importable from configs in tests (the tests put tests/ on PYTHONPATH of the launched ``ppg``).
"""

import json
from pathlib import Path

import lightning as L
import torch


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
