"""``FSDP2Strategy``: fully sharded data parallelism (FSDP2) over every process.

Lightning's ``ModelParallelStrategy`` with a one-dimensional mesh (no tensor parallelism) that
checkpoints only the trainable parameters (the LoRA adapters), gathered into one file that
resumes on any number of ranks. The module shards its decoder layers in ``configure_model``
(``ppg.models.sharding``). Unlike Lightning's ``FSDPStrategy`` it also runs on CPUs (gloo).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Shards over all ``num_nodes × devices`` processes; checkpoints: adapters only, one file."""

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = None):
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters, whole, on rank 0 (empty elsewhere): the frozen base is
        rebuilt from the model spec, so it is never gathered or saved."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)
