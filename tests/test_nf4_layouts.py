"""nf4 on CPU: inference forwards must not break the gradients of later training forwards."""

import pytest
import torch

from ppg.models import load_policy


def _packing_cpu() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _lora_grads(policy, ids):
    policy.train()
    loss = policy(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.skipif(not _packing_cpu(), reason="bitsandbytes packs nf4 for inference only on AVX512-BF16 CPUs")
def test_inference_forward_keeps_training_gradients_exact(tiny_spec):
    import bitsandbytes as bnb

    policy, _ = load_policy({**tiny_spec, "quantization": "nf4"})
    with torch.no_grad():  # non-zero B so every adapter's gradient depends on the layers above
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    loss_before, before = _lora_grads(policy, ids)

    policy.eval()
    with torch.no_grad():
        inference_logits = policy(input_ids=ids).logits
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)  # fast kernel used

    loss_after, after = _lora_grads(policy, ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert loss_after == pytest.approx(loss_before, abs=1e-6)
    first_layer = [n for n in before if "layers.0." in n]
    assert len(first_layer) == 14
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7, msg=name)
    # the packed kernel computes in bf16: same logits up to bf16 rounding
    policy.eval()
    with torch.no_grad():
        plain_logits = policy(input_ids=ids.clone().requires_grad_(False)).logits
    torch.testing.assert_close(inference_logits, plain_logits)


def test_state_dict_while_packed_keeps_both_layouts(tiny_spec):
    policy, _ = load_policy({**tiny_spec, "quantization": "nf4"})
    ids = torch.randint(10, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    policy.eval()
    with torch.no_grad():
        first = policy(input_ids=ids).logits
        policy.state_dict()
        second = policy(input_ids=ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.skipif(not _packing_cpu(), reason="bitsandbytes packs nf4 for inference only on AVX512-BF16 CPUs")
def test_bf16_autocast_training_dequantizes_to_bf16_with_the_same_gradients(tiny_spec, monkeypatch):
    import bitsandbytes as bnb

    from ppg.models.cpu import nf4_layouts

    policy, _ = load_policy({**tiny_spec, "quantization": "nf4"})
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        policy.eval()
        inference_logits = policy(input_ids=ids).logits  # packs the inference layout, sets compute types
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def autocast_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _lora_grads(policy, ids)

    loss, grads = autocast_grads()
    assert {(m.weight.quant_state.dtype, m.compute_dtype) for m in layers} == {(torch.bfloat16,) * 2}
    policy.eval()
    with torch.no_grad():  # inference afterwards: the packed layout in fp32 again, the same logits
        assert torch.equal(policy(input_ids=ids).logits, inference_logits)
    assert {m.compute_dtype for m in layers} == {torch.float32}
    monkeypatch.setattr(nf4_layouts, "_bf16_autocast", lambda: False)  # fp32 dequantization, cast by autocast
    loss_fp32, grads_fp32 = autocast_grads()
    assert {(m.weight.quant_state.dtype, m.compute_dtype) for m in layers} == {(torch.float32,) * 2}
    assert loss == loss_fp32
    for name in grads:
        assert torch.equal(grads[name], grads_fp32[name]), name
