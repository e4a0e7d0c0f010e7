"""The Lightning system end to end on the tiny random Llama: CLI fit, metrics, resume, DDP."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppg.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = [
    "--config", str(CONFIGS / "experiment" / "smoke.yaml"),
    "--config", str(CONFIGS / "model" / "tiny-random.yaml"),
    "--data.init_args.rollouts_per_epoch=4", "--data.init_args.group_size=2",
    "--data.init_args.batch_size=2", "--data.init_args.val_contexts=2",
    "--data.init_args.sampling.max_new_tokens=6", "--data.init_args.progress=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.precision=32-true",
]


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _fit(tmp_path, *extra, name="run"):
    main(["fit", *FAST, f"--trainer.logger.init_args.name={name}", *extra])


def _losses(tmp_path, name, version=0):
    rows = _rows(tmp_path / "runs" / name / f"version_{version}" / "metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fit_writes_design_metrics_config_and_run_record(in_tmp):
    _fit(in_tmp, "--trainer.max_epochs=2")
    log_dir = in_tmp / "runs" / "run" / "version_0"
    columns = set(_rows(log_dir / "metrics.csv")[0])
    expected = {"policy/k2/reward_mean", "policy/k2/reward_turn0", "policy/k2/reward_turn2",
                "policy/k2/credit_mean", "policy/greedy/credit_mean", "policy/full/credit_mean",
                "policy/k2/loss", "grad_noise/k2/snr", "grad_noise/full/snr",
                "rollout/tokens_per_s", "train/tokens_per_s", "val/reward_mean"}
    assert expected <= columns, expected - columns
    record = json.loads((log_dir / "run.json").read_text())
    assert record["seed"] == "0" and record["packages"]["torch"]
    assert "KStepLookahead" in (log_dir / "config.yaml").read_text()
    assert (in_tmp / "runs" / "run" / "checkpoints" / "last.ckpt").exists()
    assert list((log_dir / "transcripts").glob("train_epoch001.md"))


def test_checkpoint_holds_only_adapters(in_tmp):
    import torch

    _fit(in_tmp, "--trainer.max_epochs=1")
    state = torch.load(in_tmp / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert len(state["RolloutDataModule"]["rollouts"]) == 4  # the epoch's rollouts, for mid-epoch resume


def test_resume_from_last_matches_uninterrupted_run(in_tmp):
    _fit(in_tmp, "--trainer.max_epochs=3", name="straight")
    _fit(in_tmp, "--trainer.max_epochs=1", name="resumed")
    _fit(in_tmp, "--trainer.max_epochs=3", "--ckpt_path=last", name="resumed")
    straight = _losses(in_tmp, "straight")
    resumed = _losses(in_tmp, "resumed", version=1)
    assert sorted(resumed) == [2, 3, 4, 5]  # 2 steps per epoch, epochs 1-2
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), (step, loss, straight[step])


def test_same_seed_same_numbers(in_tmp):
    _fit(in_tmp, "--trainer.max_epochs=1", name="a")
    _fit(in_tmp, "--trainer.max_epochs=1", name="b")
    assert _losses(in_tmp, "a") == _losses(in_tmp, "b")


def test_judge_failure_checkpoints_then_stops_with_one_line(in_tmp, capsys):
    with pytest.raises(SystemExit) as info:
        _fit(in_tmp, "--trainer.max_epochs=1", "--data.init_args.judge=helpers_for_tests.FailingJudge")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "ppg: error: judge server http://127.0.0.1:9/v1 unreachable after 3 tries" in err
    assert (in_tmp / "runs" / "run" / "version_0" / "checkpoints" / "interrupted.ckpt").exists()


@pytest.mark.parametrize("arg, needle", [
    ("--model.lrr=0.1", "lrr"),
    ("--model.baseline=median", "median"),
    ("--data.init_args.batch_size=3", "batch_size"),
])
def test_bad_config_names_the_key(in_tmp, capsys, arg, needle):
    with pytest.raises(SystemExit) as info:
        _fit(in_tmp, "--trainer.max_epochs=1", arg)
    assert info.value.code != 0
    assert needle in capsys.readouterr().err


def test_print_config_resolves_interpolation(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "base.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "save_last: true" in out and "name: ppg" in out
    assert "class_path: ppg.subsets.KStepLookahead" in out


def test_stacked_configs_and_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "policy" / "kstep.yaml"),
              "--model.subset.init_args.k=3", "--print_config"])
    out = capsys.readouterr().out
    assert "k: 3" in out


def test_ddp_on_cpu_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "ppg.cli", "fit", *FAST, "--trainer.max_epochs=1", "--model.micro_batch_size=1",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
               "--trainer.logger.init_args.name=ddp"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(tmp_path / "runs" / "ddp" / "version_0" / "metrics.csv")
    # 4 rollouts over 2 ranks -> 2 per rank -> 1 batch of 2 per rank -> 1 optimizer step.
    assert max(int(r["step"]) for r in rows) <= 1
    rewards = [float(r["policy/k2/reward_mean"]) for r in rows if r.get("policy/k2/reward_mean")]
    assert len(rewards) == 1 and 0.0 <= rewards[0] <= 1.0
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt").exists()


def test_kl_penalty_and_several_updates_per_batch(in_tmp):
    _fit(in_tmp, "--trainer.max_epochs=1", "--model.kl_coef=0.1", "--model.updates_per_batch=2",
         "--data.init_args.judge=helpers_for_tests.LengthJudge", "--model.lr=0.01", name="kl")
    rows = _rows(in_tmp / "runs" / "kl" / "version_0" / "metrics.csv")
    kls = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    # 2 batches x 2 updates; the KL to the base is exactly 0 before the first update (LoRA B = 0)
    # and positive once the adapters have moved.
    assert len(kls) == 2 and all(k >= 0 for k in kls) and kls[-1] > 0
    assert max(steps) == 1  # the CSV counts batches
    import torch

    checkpoint = torch.load(in_tmp / "runs" / "kl" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4  # optimizer steps


def _logged(path, bad_line=False):
    lines = []
    for i in range(4):
        record = {"context_id": f"c{i // 2}", "group_id": i // 2, "agent_system_prompt": "You are Ann.",
                  "messages": [["user", "Hi!"], ["assistant", "Hello there." * (i + 1)], ["user", "How are you?"],
                               ["assistant", "Fine."]],
                  "rewards": [0.25 * i, 1.0 - 0.25 * i]}
        lines.append(json.dumps(record))
    if bad_line:
        lines[2] = json.dumps({"messages": [["user", "Hi!"]], "rewards": [1.0]})
    path.write_text("\n".join(lines) + "\n")
    return path


def test_offline_fit_on_logged_conversations(in_tmp):
    data = _logged(in_tmp / "logged.jsonl")
    main(["fit", "--config", str(CONFIGS / "model" / "tiny-random.yaml"), "--data=ppg.data.LoggedConversationDataModule",
          f"--data.path={data}", "--data.batch_size=2", "--trainer.max_epochs=1", "--trainer.logger.init_args.name=offline",
          "--trainer.enable_progress_bar=false", "--model.subset=ppg.subsets.Greedy"])
    losses = _losses(in_tmp, "offline")
    assert sorted(losses) == [0, 1] and all(math.isfinite(loss) for loss in losses.values())


def test_malformed_logged_conversation_names_the_line(in_tmp, capsys):
    data = _logged(in_tmp / "logged.jsonl", bad_line=True)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "model" / "tiny-random.yaml"), "--data=ppg.data.LoggedConversationDataModule",
              f"--data.path={data}", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    assert f"{data}:3: malformed conversation: missing key 'agent_system_prompt'" in capsys.readouterr().err


def test_micro_batches_give_the_same_training(in_tmp):
    import torch

    _fit(in_tmp, "--trainer.max_epochs=1", "--data.init_args.judge=helpers_for_tests.LengthJudge",
         "--model.micro_batch_size=null", name="whole")
    _fit(in_tmp, "--trainer.max_epochs=1", "--data.init_args.judge=helpers_for_tests.LengthJudge",
         "--model.micro_batch_size=1", name="micro")
    whole, micro = _losses(in_tmp, "whole"), _losses(in_tmp, "micro")
    assert sorted(whole) == sorted(micro) == [0, 1]
    for step in whole:
        assert micro[step] == pytest.approx(whole[step], abs=1e-5)
    weights = [torch.load(in_tmp / "runs" / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for name in ("whole", "micro")]
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], atol=1e-6), key


def test_bf16_mixed_precision_trains_with_fp32_log_probs(in_tmp):
    import torch

    from ppg.models import load_policy
    from ppg.problems import DelayedPayoff
    from ppg.rollout import RolloutEngine, Sampling, collate_rollouts, turn_logprobs

    _fit(in_tmp, "--trainer.max_epochs=1", "--trainer.precision=bf16-mixed", name="bf16")
    losses = _losses(in_tmp, "bf16")
    assert sorted(losses) == [0, 1] and all(math.isfinite(v) for v in losses.values())

    policy, tokenizer = load_policy({"name_or_path": "embedded:tiny-random-llama", "quantization": "none"})
    engine = RolloutEngine(policy, tokenizer, DelayedPayoff().default_judge(), n_turns=3, group_size=2,
                           sampling=Sampling(max_new_tokens=6), progress=False)
    batch = collate_rollouts(engine.run(DelayedPayoff().contexts("train", 2, seed=0), seed=0), tokenizer.pad_token_id)
    exact = turn_logprobs(policy, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = turn_logprobs(policy, batch)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.5)


def test_sigterm_stops_mid_rollout_with_a_checkpoint(tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    started = tmp_path / "judge_started"
    command = [sys.executable, "-m", "ppg.cli", "fit", *FAST, "--trainer.max_epochs=1",
               "--data.init_args.judge=helpers_for_tests.BlockingJudge",
               f"--data.init_args.judge.init_args.started_file={started}",
               "--trainer.logger.init_args.name=term"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.exists(), process.communicate()[1][-2000:]
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30  # the judge would have blocked for 300 s
    assert process.returncode == 128 + signal.SIGTERM
    assert "ppg: stopped: Terminated: terminated by SIGTERM; checkpoint saved to" in stderr
    assert (tmp_path / "runs" / "term" / "version_0" / "checkpoints" / "interrupted.ckpt").exists()
