"""Device and dtype defaults: CUDA when present (mocked availability), the trainer's device,
fp32 adapters on bf16 bases, CPU-only helpers inert elsewhere, gradient checkpointing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppg.models.spec import resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


class Loaded(Exception):
    """Raised by the stand-in loaders once they have recorded where they were asked to load."""


@pytest.fixture()
def cuda_present(monkeypatch):
    import bitsandbytes  # noqa: F401  (picks its backend on import: before the mock)
    import peft  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture()
def record_loads(monkeypatch):
    """Replace the model loaders with ones that record ``device`` and stop."""
    calls = []

    def fake(spec=None, device="auto"):
        calls.append(str(device))
        raise Loaded

    import ppg.commands.chat
    import ppg.commands.rollout
    import ppg.models

    for module, name in ((ppg.models, "load_base_model"), (ppg.commands.chat, "load_policy"),
                         (ppg.commands.rollout, "load_policy")):
        monkeypatch.setattr(module, name, fake)
    return calls


def test_auto_device_and_dtype_follow_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", "auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")  # no index: the current device
    assert resolve_dtype("auto", "auto") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"^device must be one of auto, cpu, cuda, meta \(or cuda:N\), got 'gpu0'$"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"^unknown dtype 'float8'; choose one of auto, float32"):
        resolve_dtype("float8", "cpu")


def test_model_user_loads_on_the_policy_device_else_cuda(tiny_policy, cuda_present, record_loads):
    from ppg.rollout.users import ModelUser

    user = ModelUser("embedded:tiny-random-llama")
    assert user.load_device() == torch.device("cuda")
    with pytest.raises(Loaded):
        user.respond([], [], 0)
    policy, tokenizer = tiny_policy
    policy.to("meta")  # stands for the trainer's device
    user.bind(policy, tokenizer)
    with pytest.raises(Loaded):
        user.respond([], [], 0)
    with pytest.raises(Loaded):
        ModelUser("embedded:tiny-random-llama", device="cpu").respond([], [], 0)
    assert record_loads == ["cuda", "meta", "cpu"]
    with pytest.raises(ValueError, match="^device must be one of"):
        ModelUser("embedded:tiny-random-llama", device="tpu")


def test_lm_judge_loads_on_cuda_when_present(cuda_present, record_loads):
    from ppg.judges.backends import _load
    from ppg.judges.lm import LMJudge
    from ppg.types import Context, JudgeRequest

    _load.cache_clear()
    request = JudgeRequest(Context("c", "agent", "user", "hi", persona=["I surf."]), [], "hello", 0)
    with pytest.raises(Loaded):
        LMJudge("embedded:tiny-random-llama").score([request])
    with pytest.raises(Loaded):
        LMJudge("embedded:tiny-random-llama", device="cpu").score([request])
    _load.cache_clear()
    assert record_loads == ["cuda", "cpu"]


def test_chat_and_rollout_commands_load_on_cuda_when_present(cuda_present, record_loads):
    from ppg.commands.chat import chat
    from ppg.commands.rollout import rollout
    from ppg.problems import DelayedPayoff

    with pytest.raises(Loaded):
        chat()
    with pytest.raises(Loaded):
        chat(device="cpu")
    with pytest.raises(Loaded):
        rollout(DelayedPayoff(), out="unused.jsonl")
    assert record_loads == ["cuda", "cpu", "cuda"]


def test_evaluate_puts_both_runs_on_one_gpu_when_present(monkeypatch, tmp_path):
    import ppg.commands.evaluate as evaluate_module

    seen = []

    def fake_run_cli(args):
        seen.append(args)
        raise Loaded

    monkeypatch.setattr(evaluate_module, "run_cli", fake_run_cli)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.strategy=auto"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate_module.device_args("auto") == []  # the config's trainer
    assert evaluate_module.device_args("cpu") == ["--trainer.accelerator=cpu", *gpu[1:]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Loaded):
        evaluate_module.evaluate(["base.yaml"], str(ckpt), out=str(tmp_path / "out"))
    assert seen[0][3:6] == gpu  # after ["validate", "--config", "base.yaml"], before overrides


def test_trainer_device_reaches_the_policy_and_adapters_stay_fp32(tiny_spec):
    from ppg.module import PartialPolicyGradientModule

    module = PartialPolicyGradientModule(model={**tiny_spec, "dtype": "bfloat16"})
    module.to("meta")  # Lightning moves the module to the trainer's device before configure_model
    module.configure_model()
    dtypes = {(p.requires_grad, p.dtype, p.device.type) for p in module.policy.parameters()}
    # frozen base in bf16, LoRA weights (hence AdamW's state) fp32, everything on the device
    assert dtypes == {(False, torch.bfloat16, "meta"), (True, torch.float32, "meta")}
    optimizer = module.configure_optimizers()
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}


def test_cpu_only_helpers_do_nothing_off_cpu(tiny_model):
    from ppg.models.cpu.bf16_head import bf16_output_head
    from ppg.models.cpu.memory import detach_from_checkpoint_file
    from ppg.models.cpu.nf4_layouts import keep_both_nf4_layouts

    on_cpu = sum(1 for _ in tiny_model.parameters()) + sum(1 for _ in tiny_model.buffers())
    assert detach_from_checkpoint_file(tiny_model) == on_cpu
    tiny_model.to("meta")
    head = tiny_model.get_output_embeddings()
    assert detach_from_checkpoint_file(tiny_model) == 0
    assert keep_both_nf4_layouts(tiny_model) == 0
    with bf16_output_head(tiny_model):
        assert tiny_model.get_output_embeddings() is head


def test_memory_trimming_does_not_import_bitsandbytes():
    code = ("import sys, torch; from ppg.models.cpu.memory import detach_from_checkpoint_file; "
            "print(detach_from_checkpoint_file(torch.nn.Linear(2, 2)), 'bitsandbytes' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "False"]


def test_gradient_checkpointing_same_gradients_and_cache_kept_for_sampling(tiny_spec):
    from ppg.models import load_policy
    from ppg.models.loading import enable_gradient_checkpointing

    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    grads = []
    for checkpointing in (False, True):
        policy, _ = load_policy(tiny_spec)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            enable_gradient_checkpointing(policy)
        policy.train()
        policy(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad]))
    assert policy.base_model.model.model.gradient_checkpointing
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    policy.eval()
    with torch.no_grad():
        out = policy(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 6


def test_gpu_check_refuses_without_cuda_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run"]
    assert result.stdout == ""


def test_prepare_kbit_is_opt_in_and_casts_unquantized_weights_to_fp32(tiny_spec):
    from ppg.models import load_policy

    spec = {**tiny_spec, "quantization": "nf4", "dtype": "bfloat16"}
    norm_dtypes = []
    for prepare in (False, True):
        policy, _ = load_policy({**spec, "prepare_kbit": prepare})
        norm_dtypes.append({p.dtype for n, p in policy.named_parameters() if "norm" in n})
    assert norm_dtypes == [{torch.bfloat16}, {torch.float32}]
