"""Sampling with a bf16 copy of the output projection: close logits, head restored after."""

import pytest
import torch

from ppg.models.cpu.bf16_head import Bf16Head, bf16_output_head, cpu_has_fast_bf16
from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.hf import sample_continuations


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="CPU without native bf16 matmuls")
def test_bf16_head_logits_close_and_head_restored(tiny_policy):
    policy, _ = tiny_policy
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    head = base.get_output_embeddings()
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    policy.eval()
    with torch.no_grad():
        exact = policy(input_ids=ids).logits
        with bf16_output_head(policy):
            assert isinstance(base.get_output_embeddings(), Bf16Head)
            fast = policy(input_ids=ids).logits
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, exact, rtol=0.02, atol=0.02)
        assert not torch.equal(fast, exact)  # it did run in bf16
        assert base.get_output_embeddings() is head
        torch.testing.assert_close(policy(input_ids=ids).logits, exact, rtol=0, atol=0)
        with bf16_output_head(policy, enabled=False):
            assert base.get_output_embeddings() is head


def test_sampling_repeats_under_a_seed_and_head_is_restored(tiny_policy):
    policy, tokenizer = tiny_policy
    base = policy.get_base_model()
    head = base.get_output_embeddings()
    prompts = [[1, 2, 3, 4], [5, 6]]
    draws = []
    for bf16_head in (False, False, True):
        torch.manual_seed(0)
        draws.append(sample_continuations(policy, tokenizer, prompts,
                                          Sampling(max_new_tokens=5, bf16_head=bf16_head)))
        assert base.get_output_embeddings() is head
    assert draws[0] == draws[1]
    assert all(1 <= len(row) <= 5 for rows in draws for row in rows)
