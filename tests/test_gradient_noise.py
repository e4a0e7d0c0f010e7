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
