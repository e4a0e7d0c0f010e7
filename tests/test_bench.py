"""tools/bench.py: FLOPs arithmetic (checked against torch's FLOP counter), targets, arguments,
and the JSON keys of a --quick run on the tiny model."""

import importlib.util
import json
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


def test_flops_formula_matches_torch_flop_counter():
    """Linear, LoRA and head terms equal torch's count of an unpadded pass; its attention term
    is the full L x L square where ours counts the causal half."""
    from lightning.fabric.utilities.throughput import measure_flops
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config._attn_implementation = "eager"  # plain matmuls, which the counter sees
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    shape = bench.ModelShape.from_config(config, lora_r=4)
    length = 12
    ids = torch.arange(length).unsqueeze(0)
    counted = measure_flops(model, lambda: model(input_ids=ids).logits)
    attention_per_pair = 4 * 2 * 4 * 16  # layers * heads * head_dim, two matmuls of 2 FLOPs
    causal = bench.sequence_flops(shape, length, head_tokens=length)
    pairs_causal, pairs_square = length * (length + 1) / 2, length * length
    assert counted == causal + attention_per_pair * (pairs_square - pairs_causal)


def test_roofline_ratios_and_limits():
    row = {"generated_tokens": 100, "seconds": 2.0, "gflop": 50.0}
    bench.add_roofline_ratios(row, fp32=100.0, bf16=400.0)
    assert row["fp32_ratio"] == pytest.approx(0.25)
    assert row["bf16_ratio"] == pytest.approx(0.0625)
    assert row["fp32_limit_tokens_per_s"] == pytest.approx(200.0)
    assert row["bf16_limit_tokens_per_s"] == pytest.approx(800.0)


def test_verdicts_pass_miss_and_not_measured():
    result = {"rollout_bf16_ratio": 0.31, "train_bf16_ratio": 0.49, "ppg_over_trl_same_work": None,
              "demo_class_s": 200.0, "peak_rss_mb": 2100.0}
    status = {row["key"]: row["status"] for row in bench.verdicts(result)}
    assert status == {"rollout_bf16_ratio": "PASS", "train_bf16_ratio": "MISS",
                      "ppg_over_trl_same_work": "n/a", "demo_class_s": "PASS", "peak_rss_mb": "MISS"}


def test_parse_args_quick_and_batches():
    args = bench.parse_args(["--batches", "64,8,32"])
    assert args.batches == [8, 32, 64]
    quick = bench.parse_args(["--quick"])
    assert quick.batches == [8] and quick.max_new_tokens == 16 and quick.n_turns == 2
    assert quick.train_batches == [4, 8] and quick.trl_prompts == 2


CONTRACT_KEYS = ("roofline_bf16_gflops", "rollout_bf16_ratio", "train_bf16_ratio",
                 "ppg_over_trl_same_work", "peak_rss_mb", "demo_class_s")


def test_quick_run_writes_the_contract_keys(tmp_path):
    """The whole tool end to end on the tiny model: every phase runs, every contract key is a
    number, and the same-work comparison really ran one turn on both sides."""
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--threads", "1", "--model", "embedded:tiny-random-llama",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    for key in CONTRACT_KEYS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["roofline_bf16_gflops"] > 0 and result["roofline_gflops"] > 0
    assert set(result["rollout_by_batch"]) == {"8"} and set(result["train_by_batch"]) == {"4", "8"}
    same, trl = result["ppg_same_work"], result["trl"]
    assert same["batch"] == trl["batch"] == 8 and same["steps"] == trl["steps"] == 1
    assert 0 < same["generated_tokens"] <= 8 * 16 and 0 < trl["generated_tokens"] <= 8 * 16
    assert [row["key"] for row in result["targets"]] == [key for key, *_ in bench.TARGETS]


def test_shown_commands_carry_no_machine_paths():
    import os
    import sys
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), "ppg-bench-demo-x1_y2")
    command = [sys.executable, "-m", "ppg.cli", "compare", "--config", str(bench.ROOT / "configs" / "a.yaml"),
               "--out", folder]
    assert bench._shown(command) == "python -m ppg.cli compare --config configs/a.yaml --out <temporary folder>"


def test_server_log_excerpt_keeps_the_first_traceback_and_the_end():
    lines = [f"INFO start {i}" for i in range(40)] + [
        "(APIServer pid=1) ERROR 11-22 [async_llm.py:906] AsyncLLM output_handler failed.",
        "Traceback (most recent call last):", '  File "core.py", line 3', "ValueError: boom",
    ] + [f"INFO request {i} 500" for i in range(40)] + [
        " - leaked type \"triton.x\"", "nanobind: leaked 64 types!", "INFO shut down"]
    excerpt = bench._log_tail("\n".join(lines))
    assert excerpt[0].endswith("AsyncLLM output_handler failed.") and excerpt[3] == "ValueError: boom"
    assert len(excerpt) == 20 + 1 + 10 and excerpt[20] == "..."
    assert excerpt[-1] == "INFO shut down" and not any("leaked" in line for line in excerpt)
    # machine paths of packages and the standard library are named, not spelled out
    import site
    import sysconfig
    package = Path(site.getsitepackages()[0]) / "vllm" / "worker.py"
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "multiprocessing" / "tracker.py"
    assert bench._log_tail(f'Traceback\n  File "{package}", line 1\nwarning at {stdlib}:254') == [
        "Traceback", '  File "<site-packages>/vllm/worker.py", line 1', "warning at <stdlib>/multiprocessing/tracker.py:254"]
    # no error: the last lines only
    assert bench._log_tail("\n".join(f"line {i}" for i in range(50))) == [f"line {i}" for i in range(20, 50)]
