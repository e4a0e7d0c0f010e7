"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama built on it."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    from ppg.models import load_tokenizer

    return load_tokenizer({"name_or_path": "embedded:smollm2-135m-instruct"})


@pytest.fixture(scope="session")
def tiny_spec():
    """Model spec of the tiny random Llama (no quantization) with small LoRA adapters."""
    return {"name_or_path": "embedded:tiny-random-llama", "quantization": "none",
            "lora": {"r": 4, "alpha": 8}}


@pytest.fixture()
def tiny_policy(tiny_spec):
    """A fresh tiny random Llama + LoRA policy and its tokenizer."""
    from ppg.models import load_policy

    return load_policy(tiny_spec)


@pytest.fixture()
def tiny_model(tokenizer):
    """A bare tiny random Llama (no adapters), e.g. for judges."""
    from ppg.models import tiny_random_llama

    return tiny_random_llama(tokenizer, seed=0)
