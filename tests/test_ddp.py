"""DDP on CPU (gloo), 2 processes: both ranks end identical; one all-reduce per batch."""

import torch
from rank_record import CONFIGS, launch, record, same


def test_ddp_ranks_identical_and_gradients_reduced_once_per_batch(tmp_path):
    # 8 rollouts over 2 ranks: 4 per rank, one batch of 4, micro-batches of 1 -> 4 backward passes.
    launch(tmp_path, "--config", str(CONFIGS / "trainer" / "ddp.yaml"), "--trainer.max_epochs=1",
           "--data.init_args.batch_size=4", "--data.init_args.group_size=2", out="ddp", name="ddp")
    start = [record(tmp_path / "ddp", rank, "start") for rank in (0, 1)]
    end = [record(tmp_path / "ddp", rank, "end") for rank in (0, 1)]
    assert [r["world_size"] for r in end] == [2, 2] and [r["global_step"] for r in end] == [1, 1]
    assert same(start[0]["adapters"], start[1]["adapters"])
    assert same(end[0]["adapters"], end[1]["adapters"])
    assert not same(start[0]["adapters"], end[0]["adapters"])
    # no_sync on the first 3 micro-batches: 1 all-reduce (all LoRA grads fit one bucket), not 4.
    assert [r["allreduces"] for r in end] == [1, 1]
    metrics = [r["metrics"] for r in end]
    assert {"train/loss", "val/reward_mean", "policy/k2/reward_mean", "rollout/sampler_logprob_gap"} <= set(metrics[0])
    # Logged per rank, by design or not (yet) reduced: throughput, GradientNoise's local-batch SNR.
    local = {k for k in metrics[0] if k == "train/tokens_per_s" or k.startswith("grad_noise/")}
    assert {k: v for k, v in metrics[0].items() if k not in local} == \
        {k: v for k, v in metrics[1].items() if k not in local}
    assert metrics[0].keys() == metrics[1].keys()
    assert torch.isfinite(torch.tensor(metrics[0]["train/loss"]))
