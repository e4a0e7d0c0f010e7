"""FSDP2 (ppg.strategy.FSDP2Strategy): sharding rules in-process, a 2-process fit on CPU (gloo)."""

import pytest
import torch

from ppg.models.sharding import check_shardable, decoder_layers, shard_policy
from ppg.models.spec import as_spec


def test_fsdp_refuses_quantized_models_in_one_line():
    with pytest.raises(ValueError, match=r"^model.model.quantization=nf4 cannot be sharded with FSDP"):
        check_shardable(as_spec({"quantization": "nf4"}))
    check_shardable(as_spec({"quantization": "none"}))


def test_fsdp_shards_decoder_layers_only(tiny_spec):
    from ppg.models import load_policy

    policy, _ = load_policy(tiny_spec)
    assert [type(layer).__name__ for layer in decoder_layers(policy)] == ["LlamaDecoderLayer"] * 2
    head, _ = load_policy({**tiny_spec, "lora": {"r": 4, "alpha": 8,
                                                  "target_modules": ["q_proj", "lm_head"]}})
    with pytest.raises(ValueError, match=r"trainable parameter '.*lm_head.lora_A.default.weight' "
                                         r"lies outside them"):
        shard_policy(head, mesh=None)


def test_fsdp_two_processes_on_cpu_checkpoint_adapters_only_and_resume(tmp_path):
    from rank_record import CONFIGS, launch, record, same  # lightning: not in spawned workers

    fsdp = ["--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.accelerator=cpu",
            "--trainer.devices=2"]
    launch(tmp_path, *fsdp, "--trainer.max_epochs=1", out="first", name="fsdp")
    first = [record(tmp_path / "first", rank, "end") for rank in (0, 1)]
    # 8 rollouts over 2 ranks, batches of 2: 2 optimizer steps; both ranks end with the same adapters.
    assert [r["global_step"] for r in first] == [2, 2] and first[0]["world_size"] == 2
    assert same(first[0]["adapters"], first[1]["adapters"])
    start = record(tmp_path / "first", 0, "start")["adapters"]
    assert not same(start, first[0]["adapters"])  # it trained
    checkpoint = torch.load(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt", weights_only=False)
    # 2 layers x 7 projections x (A, B), whole tensors (not shards), nothing of the frozen base.
    assert len(checkpoint["state_dict"]) == 28
    assert all("lora_" in key for key in checkpoint["state_dict"])
    assert checkpoint["state_dict"]["policy.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (4, 64)
    assert same(checkpoint["ppg_adapter"]["state"], first[0]["adapters"])

    launch(tmp_path, *fsdp, "--trainer.max_epochs=2", "--ckpt_path=last", out="resumed", name="fsdp")
    for rank in (0, 1):  # resumed from the checkpoint's adapters, then trained one more epoch
        assert same(record(tmp_path / "resumed", rank, "start")["adapters"], first[0]["adapters"])
    resumed = [record(tmp_path / "resumed", rank, "end") for rank in (0, 1)]
    assert [r["global_step"] for r in resumed] == [4, 4]
    assert same(resumed[0]["adapters"], resumed[1]["adapters"])
    assert not same(resumed[0]["adapters"], first[0]["adapters"])


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class TwoBlocks(torch.nn.Module):
    _no_split_modules = ("Block",)

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(x)


def _unequal_forwards(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ppg.models.sharding import release

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model, x = TwoBlocks(), torch.randn(3, 8)
    expected = model(x).detach()
    shard_policy(model, init_device_mesh("cpu", (2,)))
    model.eval()
    with torch.no_grad():  # sampling: rank 1 makes 3 more forwards than rank 0; no deadlock
        outputs = [model(x) for _ in range(2 + 3 * rank)]
    release(model)
    model.train()
    model(x).sum().backward()  # training forwards are collective again, gradients sharded
    grad = model.blocks[0].linear.weight.grad
    torch.save({"match": all(torch.allclose(o, expected) for o in outputs),
                "grad_shape": tuple(grad.to_local().shape)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fsdp_sampling_forwards_need_not_match_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_unequal_forwards, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result == {"match": True, "grad_shape": (4, 8)}  # 8 rows sharded over 2 ranks
