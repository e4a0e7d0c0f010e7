"""``ppg export``: peft adapter folders and merged models from ppg checkpoints."""

import pytest
import torch

from ppg.cli import main
from ppg.models import load_base_model, load_policy
from ppg.models.adapters import CHECKPOINT_KEY, adapter_payload, load_adapters_from_checkpoint
from ppg.models.spec import as_spec

TOKENS = torch.tensor([[1, 42, 7, 99, 1234, 5, 17, 300]])


def _logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits.float()
    return torch.log_softmax(logits, dim=-1)


def _trained_checkpoint(spec: dict, path):
    """A policy with non-zero adapters saved as a ppg checkpoint; returns the policy."""
    policy, _ = load_policy(spec)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    torch.save({"state_dict": {}, CHECKPOINT_KEY: adapter_payload(policy, as_spec(spec))}, path)
    return policy


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_export_adapter_loads_in_peft_with_the_same_logprobs(tmp_path, tiny_spec, quantization):
    from peft import PeftModel

    spec = {**tiny_spec, "quantization": quantization}
    policy = _trained_checkpoint(spec, tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "adapter")])
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= files
    base, _ = load_base_model(spec)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    expected = _logprobs(policy.eval())
    assert torch.allclose(_logprobs(loaded), expected, atol=1e-5)
    with policy.disable_adapter():  # the adapters matter: without them the log-probs differ
        assert (_logprobs(policy) - expected).abs().max() > 1e-2


def test_export_merge_loads_with_automodel_alone(tmp_path, tiny_spec):
    from transformers import AutoModelForCausalLM

    policy = _trained_checkpoint(tiny_spec, tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "merged"), "--merge"])
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logprobs(merged), _logprobs(policy.eval()), atol=1e-4)


def test_export_merge_dequantizes_an_nf4_base(tmp_path, tiny_spec):
    from transformers import AutoModelForCausalLM

    spec = {**tiny_spec, "quantization": "nf4"}
    policy = _trained_checkpoint(spec, tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "merged"), "--merge"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    # nf4 kernels and the dequantized fp32 matmul differ only by rounding
    assert (_logprobs(merged) - _logprobs(policy.eval())).abs().max() < 2e-3


def test_loading_adapters_from_a_checkpoint_restores_them(tmp_path, tiny_spec):
    policy = _trained_checkpoint(tiny_spec, tmp_path / "last.ckpt")
    fresh, _ = load_policy(tiny_spec)
    load_adapters_from_checkpoint(fresh, tmp_path / "last.ckpt")
    assert torch.equal(_logprobs(fresh.eval()), _logprobs(policy.eval()))


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ppg: error: checkpoint {str(tmp_path / 'missing.ckpt')!r} does not exist"]
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(tmp_path / "foreign.ckpt"), "--out", str(tmp_path / "o")])
    assert "is not a ppg checkpoint (no 'ppg_adapter' entry)" in capsys.readouterr().err
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(tmp_path / "text.ckpt"), "--out", str(tmp_path / "o")])
    assert "is not a torch checkpoint" in capsys.readouterr().err
