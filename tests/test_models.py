"""Model loading: quantization, LoRA-only training, seeded sampling, one-line errors."""

import json

import pytest
import torch

from ppg.models import load_policy
from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.hf import generate_replies


def _linear_kinds(model):
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.integration
def test_embedded_nf4_has_4bit_layers_and_only_lora_trains():
    import bitsandbytes as bnb

    policy, tokenizer = load_policy({"quantization": "nf4", "lora": {"r": 8, "alpha": 16}})
    four_bit = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 30 layers x 7 projections (q, k, v, o, gate, up, down).
    assert len(four_bit) == 210
    assert four_bit[0].weight.quant_type == "nf4"
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 210 * 2
    assert tokenizer.padding_side == "left"


def test_tiny_int8_and_nf4_quantize(tiny_spec):
    import bitsandbytes as bnb

    for quantization, layer in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        policy, _ = load_policy({**tiny_spec, "quantization": quantization})
        assert sum(isinstance(m, layer) for m in policy.modules()) == 2 * 7


def test_only_lora_parameters_train(tiny_policy):
    policy, _ = tiny_policy
    named = dict(policy.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # layers x projections x (A, B)
    assert any("embed_tokens" in n for n in frozen)


def test_seeded_sampling_is_reproducible(tiny_policy):
    policy, tokenizer = tiny_policy
    conversation = [{"role": "system", "content": "You are Ann."}, {"role": "user", "content": "Hi"}]
    sampling = Sampling(max_new_tokens=12)
    torch.manual_seed(3)
    first = generate_replies(policy, tokenizer, [conversation] * 2, sampling)
    torch.manual_seed(3)
    second = generate_replies(policy, tokenizer, [conversation] * 2, sampling)
    torch.manual_seed(4)
    third = generate_replies(policy, tokenizer, [conversation] * 2, sampling)
    assert first == second
    assert first != third


@pytest.mark.parametrize("spec, message", [
    ({"name_or_path": "embedded:nope"}, "unknown model name 'embedded:nope'"),
    ({"name_or_path": "./no/such/dir"}, "model path './no/such/dir' does not exist"),
    ({"name_or_path": "embedded:tiny-random-llama", "quantization": "fp3"}, "unknown quantization 'fp3'"),
    ({"name_or_path": "embedded:tiny-random-llama", "dtype": "float8"}, "unknown dtype 'float8'"),
    ({"name_or_path": "embedded:tiny-random-llama", "colour": "red"}, "unknown model spec key 'colour'"),
])
def test_bad_specs_raise_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_policy(spec)
    assert "\n" not in str(info.value)


def test_cli_reports_bad_model_in_one_line(capsys):
    from ppg.cli import main

    with pytest.raises(SystemExit) as info:
        main(["chat", "--model.name_or_path=embedded:nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = ("ppg: error: unknown model name 'embedded:nope'; embedded models: "
                "embedded:smollm2-135m-instruct, embedded:tiny-random-llama")
    assert err == [expected]


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    from ppg.models import embedded

    calls = []

    def fake_convert(directory):
        calls.append(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "model.safetensors"
        weights.write_bytes(b"weights")
        marker = {"size": weights.stat().st_size, "sha256": embedded._sha256(weights)}
        (directory / "ppg-complete.json").write_text(json.dumps(marker))

    monkeypatch.setenv("PPG_HOME", str(tmp_path))
    monkeypatch.setattr(embedded, "_convert_smollm2", fake_convert)
    directory = embedded.embedded_model_dir()
    assert len(calls) == 1
    assert embedded.embedded_model_dir() == directory and len(calls) == 1  # cached: no reconversion
    (directory / "model.safetensors").write_bytes(b"weightz")  # same size, different content
    embedded.embedded_model_dir()
    assert len(calls) == 2
    (directory / "ppg-complete.json").unlink()  # interrupted before the marker was written
    embedded.embedded_model_dir()
    assert len(calls) == 3
