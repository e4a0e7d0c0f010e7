"""Gradient SNR: the streaming accumulator against the textbook formula."""

import pytest
import torch
from ppg.callbacks.gradient_noise import SNRAccumulator


def _snr_from_all(samples: torch.Tensor) -> float:
    size = samples.shape[0]
    mean = samples.mean(0)
    covariance_trace = ((samples - mean) ** 2).sum() / (size - 1)
    return float(mean.pow(2).sum() / (covariance_trace / size))


@pytest.mark.parametrize("offset", [0.0, 0.3, 5.0])
def test_streaming_snr_matches_batch_formula(offset):
    samples = torch.randn(7, 50, generator=torch.Generator().manual_seed(0)) + offset
    accumulator = SNRAccumulator()
    for sample in samples:
        accumulator.add(sample)
    assert accumulator.snr() == pytest.approx(_snr_from_all(samples.double()), rel=1e-9)


def test_identical_samples_have_huge_snr_and_zero_samples_zero():
    same = SNRAccumulator()
    for _ in range(3):
        same.add(torch.ones(4))
    assert same.snr() > 1e20
    zero = SNRAccumulator()
    for _ in range(3):
        zero.add(torch.zeros(4))
    assert zero.snr() == 0.0


def _fit_with_gradient_noise(tiny_spec, precision: str, tmp_path) -> tuple[set, dict]:
    """One update on a fixed 4-rollout batch with GradientNoise firing; (autocast states seen
    while the callback took per-turn log-probs, the logged SNRs)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from ppg.callbacks.gradient_noise import GradientNoise

    from ppg.data import ConversationDataModule
    from ppg.module import PartialPolicyGradientModule
    from ppg.rollout import collate_rollouts, rollout_from_messages
    from ppg.types import Context

    class Recording(PartialPolicyGradientModule):
        def turn_logprobs(self, batch):  # only GradientNoise asks for turn log-probs
            self.autocast_seen.add(torch.is_autocast_enabled("cpu"))
            return super().turn_logprobs(batch)

    torch.manual_seed(0)
    module = Recording(model=tiny_spec, lr=1e-6)
    module.autocast_seen = set()
    module.configure_model()
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape))
    gen = torch.Generator().manual_seed(1)
    rollouts = [rollout_from_messages(
        module.tokenizer, Context(f"c{row // 2}", "You are Ann.", "", "Hi!"),
        [("user", "Hi!"), ("assistant", "Hello, how can I help?" * (row + 1)),
         ("user", "Tell me more."), ("assistant", "Sure: it rains." * (2 - row % 2))],
        torch.rand(2, generator=gen).tolist(), [True, True], group_id=row // 2) for row in range(4)]
    batch = collate_rollouts(rollouts, module.tokenizer.pad_token_id)

    class Data(ConversationDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)

    trainer = L.Trainer(max_epochs=1, precision=precision, logger=CSVLogger(tmp_path, name=precision),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[GradientNoise(every_n_steps=1, compare=["greedy", "full"])])
    trainer.fit(module, datamodule=Data())
    import csv

    with open(tmp_path / precision / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    snr = {name: float(r[f"grad_noise/{name}/snr"]) for r in rows for name in ("greedy", "full")
           if r.get(f"grad_noise/{name}/snr")}
    return module.autocast_seen, snr


def test_snr_is_measured_in_the_training_precision(tiny_spec, tmp_path):
    seen_bf16, snr_bf16 = _fit_with_gradient_noise(tiny_spec, "bf16-mixed", tmp_path)
    seen_fp32, snr_fp32 = _fit_with_gradient_noise(tiny_spec, "32-true", tmp_path)
    assert seen_bf16 == {True} and seen_fp32 == {False}
    assert set(snr_bf16) == set(snr_fp32) == {"greedy", "full"}
    for name in snr_fp32:  # the same estimate up to bf16 rounding, not the same numbers
        assert snr_bf16[name] == pytest.approx(snr_fp32[name], rel=0.1)
        assert snr_bf16[name] != snr_fp32[name]
