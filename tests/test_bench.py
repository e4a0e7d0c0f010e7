"""The pure helpers of tools/bench.py: FLOPs arithmetic and argument parsing (no model load)."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
_SPEC = importlib.util.spec_from_file_location("ppg_bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up there
_SPEC.loader.exec_module(bench)

# SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 query heads / 3 kv heads of 64, vocab 49152.
SMOLLM2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          vocab_size=49152)


@pytest.fixture
def shape():
    return bench.ModelShape.from_config(SMOLLM2, lora_r=16)


def test_parameter_counts_of_smollm2(shape):
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3
    assert shape.linear_params() == 30 * per_layer == 106_168_320
    per_layer_lora = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert shape.lora_params() == 30 * per_layer_lora


def test_forward_and_train_flops(shape):
    head = 2 * 576 * 49152
    attention_per_context = 4 * 30 * 9 * 64
    forward = bench.forward_flops(shape, 100)
    assert forward == 2 * shape.linear_params() + 2 * shape.lora_params() + 100 * attention_per_context + head
    assert bench.forward_flops(shape, 100, head=False) == forward - head
    train = bench.train_flops(shape, 100)
    # Frozen base + LoRA: about twice the forward, well under the 3x of full fine-tuning.
    assert 1.9 < train / forward < 2.2


def test_sequence_flops_is_the_sum_over_positions(shape):
    length, scored = 7, 3
    by_position = sum(bench.forward_flops(shape, p, head=False) for p in range(1, length + 1))
    head = bench.forward_flops(shape, 0) - bench.forward_flops(shape, 0, head=False)
    assert bench.sequence_flops(shape, length, scored) == pytest.approx(by_position + scored * head)
    by_position = sum(bench.train_flops(shape, p, head=False) for p in range(1, length + 1))
    head = bench.train_flops(shape, 0) - bench.train_flops(shape, 0, head=False)
    assert bench.sequence_flops(shape, length, scored, train=True) == pytest.approx(by_position + scored * head)


def test_rollout_and_batch_flops_ignore_padding_and_trailing_tokens(shape):
    rollout = SimpleNamespace(action_turn=[-1, -1, 0, 0, -1, 1, -1, -1])  # last action at index 5
    assert bench.rollout_flops(shape, [rollout]) == bench.sequence_flops(shape, 6, 3)
    batch = SimpleNamespace(attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
                            action_mask=torch.tensor([[[0, 0, 0, 1, 1]], [[0, 0, 0, 0, 1]]]).bool())
    expected = bench.sequence_flops(shape, 3, 2, train=True) + bench.sequence_flops(shape, 5, 1, train=True)
    assert bench.batch_train_flops(shape, batch) == pytest.approx(expected)


def test_roofline_ratio_and_limit():
    row = {"generated_tokens": 100, "seconds": 2.0, "gflop": 50.0}
    bench.add_roofline_ratio(row, roofline=100.0)
    assert row["roofline_ratio"] == pytest.approx(0.25)
    assert row["limit_tokens_per_s"] == pytest.approx(200.0)
    bench.add_roofline_ratio(row, roofline=100.0, bf16_roofline=400.0)
    assert row["bf16_roofline_ratio"] == pytest.approx(0.0625)


def test_parse_args_quick_and_batches():
    args = bench.parse_args(["--batches", "64,8,32"])
    assert args.batches == [8, 32, 64]
    quick = bench.parse_args(["--quick"])
    assert quick.batches == [8] and quick.max_new_tokens == 16 and quick.n_turns == 2
