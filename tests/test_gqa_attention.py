"""Masked grouped-query attention on CPU: bitwise transformers' ``sdpa``, without repeated KV heads."""

import pytest
import torch

from ppg.models.cpu.gqa_attention import NAME, use_cpu_gqa_attention


def _left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 4000, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :3] = 0
    return ids, mask


def _prefill_and_step(model, ids, mask):
    """Logits of a left-padded prefill and of one decode step on its KV cache."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step_mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], dim=1)
    step = model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=out.past_key_values)
    return out.logits, step.logits


@pytest.fixture()
def sdpa_calls(monkeypatch):
    """(key heads, enable_gqa) of every torch SDPA call."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((key.shape[1], kwargs.get("enable_gqa", False)))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_inference_is_bitwise_sdpa_with_shared_kv_heads(tokenizer, sdpa_calls):
    from ppg.models import tiny_random_llama

    model = tiny_random_llama(tokenizer, seed=0).eval()  # 4 query heads on 2 key/value heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    ids, mask = _left_padded()
    with torch.no_grad():
        reference = _prefill_and_step(model, ids, mask)
        assert {heads for heads, _ in sdpa_calls} == {4}  # transformers repeats every KV head
        sdpa_calls.clear()
        assert use_cpu_gqa_attention(model) and model.config._attn_implementation == NAME
        shared = _prefill_and_step(model, ids, mask)
    layers = model.config.num_hidden_layers
    assert sdpa_calls == [(2, True)] * (2 * layers)  # prefill and step: the 2 heads, shared
    for before, after in zip(reference, shared, strict=True):
        assert torch.equal(before, after)


def test_training_forward_keeps_transformers_path_and_gradients(tokenizer, sdpa_calls):
    from ppg.models import tiny_random_llama

    ids, mask = _left_padded(1)
    grads = []
    for switch in (False, True):
        model = tiny_random_llama(tokenizer, seed=0)
        if switch:
            assert use_cpu_gqa_attention(model)
        sdpa_calls.clear()
        loss = model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
        assert {heads for heads, _ in sdpa_calls} == {4}  # repeated heads: transformers' backward
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_load_policy_switches_cpu_models(tiny_policy):
    policy, _ = tiny_policy
    assert policy.get_base_model().config._attn_implementation == NAME
