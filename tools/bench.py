#!/usr/bin/env python
"""Throughput benchmark of ppg on this machine, as ratios measured side by side in one run.

Measures the fp32 matmul roofline, the model's FLOPs per token, ppg's multi-turn rollout and
training throughput (and their fraction of the roofline), one full ppg iteration against TRL's
GRPOTrainer on the same model, and the peak RSS of a default nf4 rollout + update.

    python tools/bench.py --json bench.json [--model embedded:smollm2-135m-instruct]
        [--quantization nf4] [--batches 8,32,64] [--quick] [--fit-command "ppg fit ..."]

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
sampled token); padding, re-encoding of the history and finished rows are overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE_CONFIG = ROOT / "configs" / "experiment" / "smoke.yaml"
LORA = {"r": 16, "alpha": 32}


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
    """Best GFLOP/s of ``size``² matmuls with torch's current thread count."""
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
    from ppg.problems.base import Context

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


def make_engine(policy, tokenizer, batch: int, args):
    from ppg.judges.rule import RuleJudge
    from ppg.rollout import RolloutEngine, Sampling
    from ppg.rollout.users import ScriptedUser

    return RolloutEngine(policy, tokenizer, RuleJudge(keywords=["fun", "practice", "tip"]),
                         ScriptedUser(), n_turns=args.n_turns,
                         sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
                         group_size=args.group_size, batch_size=batch, progress=False)


def run_rollouts(policy, tokenizer, batch: int, args, seed: int = 0):
    """``batch`` conversations in one engine chunk: (rollouts, seconds, engine)."""
    engine = make_engine(policy, tokenizer, batch, args)
    contexts = bench_contexts(max(1, batch // args.group_size), args.n_turns)
    started = time.perf_counter()
    rollouts = engine.run(contexts, seed=seed)
    return rollouts, time.perf_counter() - started, engine


def make_optimizer(policy):
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5)


def update_step(policy, optimizer, batch, precision: str = "bf16-mixed", micro_batch: int = 1) -> float:
    """The module's training step: turn log-probs and partial PG loss per micro-batch (whole-batch
    advantages), backward, clip, AdamW; under bf16 autocast for ``precision="bf16-mixed"``."""
    from ppg.objective import advantage_weighted_loss, partial_advantages
    from ppg.rollout import turn_logprobs
    from ppg.subsets import KStepLookahead

    policy.train()
    started = time.perf_counter()
    advantages = partial_advantages(batch.rewards, KStepLookahead(2), "leave_one_out",
                                    batch.group_ids, batch.turn_mask)
    size = batch.rewards.shape[0]
    optimizer.zero_grad()
    for start in range(0, size, micro_batch or size):
        rows = list(range(start, min(start + (micro_batch or size), size)))
        part = batch.select(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logprobs = turn_logprobs(policy, part)
        loss = advantage_weighted_loss(logprobs, advantages[rows], part.turn_mask)
        (loss * len(rows) / size).backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return time.perf_counter() - started


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
    """Training throughput (forward, backward, clip, AdamW) per training batch size.

    Every size trains on the same ``train_rollouts`` rollouts, in consecutive batches, like the
    data module does with the rollouts of a generation batch.
    """
    from ppg.rollout import collate_rollouts

    rollouts = rollouts[:args.train_rollouts]
    optimizer = make_optimizer(policy)
    warm_up = collate_rollouts(rollouts[:min(args.train_batches)], tokenizer.pad_token_id)
    update_step(policy, optimizer, warm_up, args.precision, args.micro_batch)
    results = {}
    for size in args.train_batches:
        batches = [collate_rollouts(rollouts[i:i + size], tokenizer.pad_token_id)
                   for i in range(0, len(rollouts), size)]
        seconds = sum(update_step(policy, optimizer, batch, args.precision, args.micro_batch) for batch in batches)
        tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        results[size] = {
            "rollouts": len(rollouts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "padded_tokens": sum(batch.input_ids.numel() for batch in batches),
            "gflop": sum(batch_train_flops(shape, batch) for batch in batches) / 1e9,
        }
        _progress(f"train batch {size}: {tokens / seconds:.1f} tok/s")
    return results


def add_roofline_ratio(row: dict, roofline: float, bf16_roofline: float | None = None) -> None:
    """Add the row's fraction of the fp32 roofline (and of the bf16 one, if given) and its
    tokens/s at the fp32 roofline, in place."""
    tokens = row.get("generated_tokens", row.get("tokens"))
    row["roofline_ratio"] = row["gflop"] / row["seconds"] / roofline
    row["limit_tokens_per_s"] = roofline * tokens / row["gflop"]
    if bf16_roofline:
        row["bf16_roofline_ratio"] = row["gflop"] / row["seconds"] / bf16_roofline


def nf4_packed_for_inference(policy) -> bool:
    """True if bitsandbytes left 4-bit weights in its CPU inference layout (packed, bf16).

    bitsandbytes repacks Linear4bit weights on the first no-grad eval forward on CPUs with
    AVX512-BF16 and keeps them packed; a later training forward then runs an op without a
    backward formula, so gradients through the frozen base weights are silently wrong.
    """
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False) for m in policy.modules())


def bench_ppg_iteration(policy, tokenizer, args) -> dict:
    """Full ppg iterations (rollouts + update) on ``trl_prompts`` contexts x ``group_size``."""
    from ppg.rollout import collate_rollouts

    batch = args.trl_prompts * args.group_size
    optimizer = make_optimizer(policy)
    times, tokens = [], []
    for step in range(args.iterations + 1):
        rollouts, rollout_s, engine = run_rollouts(policy, tokenizer, batch, args, seed=step)
        update_s = update_step(policy, optimizer, collate_rollouts(rollouts, tokenizer.pad_token_id),
                               args.precision, args.micro_batch)
        if step > 0:  # the first iteration is a warm-up
            times.append(rollout_s + update_s)
            tokens.append(engine.stats.agent_tokens)
    return {"batch": batch, "iterations": args.iterations, "generated_tokens": sum(tokens),
            "seconds": sum(times), "tokens_per_s": sum(tokens) / sum(times)}


def bench_trl(args) -> dict:
    """TRL GRPOTrainer steps, single turn, same model/LoRA/G/max new tokens/prompts per step."""
    try:
        return _run_trl(args)
    except Exception as error:  # noqa: BLE001 - any failure is reported, never faked
        return {"trl_error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}


def _run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer, _ = load(args.model, args.quantization)
    contexts = bench_contexts(args.trl_prompts * (args.iterations + 1), 1)
    prompts = [[{"role": "system", "content": c.agent_system_prompt},
                {"role": "user", "content": c.opening}] for c in contexts]
    counts = []

    def reward(completions, completion_ids=None, **_):
        counts.append(sum(len(ids) for ids in completion_ids))
        return [float("fun" in str(c).lower()) for c in completions]

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
        use_cpu=True, bf16=args.precision == "bf16-mixed", fp16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, shuffle_dataset=False, dataloader_num_workers=0,
        disable_tqdm=True, max_grad_norm=1.0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    trainer.train()
    seconds, tokens = sum(timer.seconds[1:]), sum(counts[1:])  # step 0 is a warm-up
    import trl

    return {"batch": batch, "steps": len(timer.seconds) - 1, "generated_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "trl_version": trl.__version__}


def default_fit_command(args) -> list[str]:
    """``ppg fit`` on the smoke config when it exists, else this script's rollout+update child."""
    if SMOKE_CONFIG.exists():
        return [sys.executable, "-m", "ppg.cli", "fit", "--config", str(SMOKE_CONFIG)]
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", "--model", args.model]
    return command + (["--threads", str(args.threads)] if args.threads else [])


# Runs argv[1:], relays its output tails on stderr, prints "returncode peak_rss_kb" of its children.
_RSS_WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(done.stdout[-4000:] + "\\n" + done.stderr[-4000:])
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(command: list[str], timeout: float) -> dict:
    """Peak RSS of ``command`` run in a fresh wrapper process (getrusage of its children)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", _RSS_WRAPPER, *command], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the wrapper and the command it started
        process.communicate()
        return {"command": shlex.join(command), "error": f"timed out after {timeout:.0f}s"}
    try:
        code, kilobytes = map(int, stdout.split()[-2:])
    except ValueError:
        return {"command": shlex.join(command), "error": stderr.strip()[-500:]}
    result = {"command": shlex.join(command), "returncode": code, "peak_rss_mb": kilobytes / 1024,
              "seconds": time.perf_counter() - started}
    phases = [line for line in stderr.splitlines() if line.startswith("RSS_PHASES ")]
    if phases:
        result["phases_mb"] = json.loads(phases[-1].split(" ", 1)[1])
    if code != 0:
        result["error"] = stderr.strip()[-500:] or f"exit code {code}"
    return result


def rss_child(args) -> None:
    """The in-process default setup: load nf4, one rollout batch, one update (for peak RSS).

    Prints one ``RSS_PHASES {json}`` line: peak RSS (MB) after each phase.
    """
    from ppg.rollout import collate_rollouts

    phases = {"imports": _self_peak_mb()}
    policy, tokenizer, _ = load(args.model, "nf4")
    phases["load"] = _self_peak_mb()
    rollouts, _, _ = run_rollouts(policy, tokenizer, 8, args)
    phases["rollout"] = _self_peak_mb()
    update_step(policy, make_optimizer(policy), collate_rollouts(rollouts, tokenizer.pad_token_id),
                args.precision, args.micro_batch)
    phases["update"] = _self_peak_mb()
    print("RSS_PHASES " + json.dumps(phases), flush=True)


def _self_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    import transformers

    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for package in ("peft", "bitsandbytes", "trl"):
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


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def print_table(result: dict) -> None:
    """A readable summary of the headline figures and the per-batch details."""
    rows = [("roofline fp32 (GFLOP/s)", result["roofline_gflops"], ""),
            ("FLOPs/token forward (M, ctx 256)", result["flops_per_token"]["forward_ctx256"] / 1e6, ""),
            ("FLOPs/token train (M, ctx 256)", result["flops_per_token"]["train_ctx256"] / 1e6, "")]
    for batch, row in result["rollout_by_batch"].items():
        rows.append((f"rollout tok/s, gen batch {batch}", row["tokens_per_s"], _ratio_note(row)))
    for batch, row in result["train_by_batch"].items():
        rows.append((f"train tok/s, train batch {batch}", row["tokens_per_s"], _ratio_note(row)))
    rows.append(("ppg iteration gen tok/s", result["ppg_iteration"]["tokens_per_s"], ""))
    trl = result.get("trl_tokens_per_s")
    rows.append(("TRL GRPO step gen tok/s", trl if trl is not None else float("nan"),
                 result.get("trl_error", "")))
    ratio = result.get("ppg_over_trl")
    rows.append(("ppg / TRL", ratio if ratio is not None else float("nan"), ""))
    rows.append(("peak RSS (MB)", result.get("peak_rss_mb") or float("nan"),
                 result["peak_rss"].get("command", "")[:60]))
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10.2f}  {note}")


def _ratio_note(row: dict) -> str:
    return (f"{row['roofline_ratio']:.1%} of fp32 roofline (limit {row['limit_tokens_per_s']:.0f} tok/s), "
            f"{row.get('bf16_roofline_ratio', float('nan')):.1%} of bf16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--batches", default="8,32,64", help="comma-separated rollout batch sizes")
    parser.add_argument("--n-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4, help="G rollouts per context")
    parser.add_argument("--trl-prompts", type=int, default=2, help="prompts per ppg/TRL iteration")
    parser.add_argument("--iterations", type=int, default=2, help="timed ppg/TRL iterations")
    parser.add_argument("--train-batches", default="8,16",
                        help="comma-separated training batch sizes (rollouts per update)")
    parser.add_argument("--train-rollouts", type=int, default=32,
                        help="rollouts (of the largest generation batch) trained on per size")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"],
                        help="training precision of ppg and TRL (as the configs' trainer.precision)")
    parser.add_argument("--micro-batch", type=int, default=1, help="rollouts per forward/backward (0: whole batch)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--fit-command", help="command whose peak RSS is measured "
                        "(default: ppg fit on configs/experiment/smoke.yaml if present)")
    parser.add_argument("--fit-timeout", type=float, default=600.0)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.n_turns, args.max_new_tokens, args.iterations = "8", 2, 16, 1
        args.train_batches, args.train_rollouts = "4,8", 8
    args.batches = _int_list(args.batches)
    args.train_batches = _int_list(args.train_batches)
    return args


def _int_list(text) -> list[int]:
    return sorted({int(part) for part in str(text).split(",") if part.strip()})


def run(args) -> dict:
    """All measurements, in one process (TRL and the RSS probe load their own copies)."""
    result = {"machine": machine_info(), "load_average_start": load_average(), "warnings": [],
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "rss_child")}}
    result["settings"]["json"] = str(args.json) if args.json else None
    roofline = measure_roofline()
    result["roofline_bf16_gflops"] = measure_roofline(dtype=torch.bfloat16)
    policy, tokenizer, load_s = load(args.model, args.quantization)
    shape = ModelShape.from_config(policy.get_base_model().config, LORA["r"])
    result["model_shape"] = asdict(shape)
    result["load_seconds"] = load_s
    result["flops_per_token"] = {"forward_ctx256": forward_flops(shape, 256),
                                 "train_ctx256": train_flops(shape, 256),
                                 "linear_params": shape.linear_params(),
                                 "lora_params": shape.lora_params()}
    _progress(f"roofline {roofline:.1f} GFLOP/s; model loaded in {load_s:.1f}s")
    rollouts, largest = bench_rollouts(policy, tokenizer, shape, args)
    train = bench_train(policy, tokenizer, shape, largest, args)
    if nf4_packed_for_inference(policy):
        result["warnings"].append(
            "nf4 weights were in bitsandbytes' packed CPU inference layout during training: "
            "gradients through the frozen base are wrong and train figures skip that work")
    del largest
    result["ppg_iteration"] = bench_ppg_iteration(policy, tokenizer, args)
    _progress(f"ppg iteration: {result['ppg_iteration']['tokens_per_s']:.1f} gen tok/s")
    del policy
    trl = {"trl_error": "skipped (--skip-trl)"} if args.skip_trl else bench_trl(args)
    result["trl"] = trl
    _progress(f"TRL: {trl}")
    command = shlex.split(args.fit_command) if args.fit_command else default_fit_command(args)
    result["peak_rss"] = peak_rss_mb(command, args.fit_timeout)
    _progress(f"peak RSS: {result['peak_rss']}")
    roofline = max(roofline, measure_roofline())  # best of start and end
    for row in [*rollouts.values(), *train.values()]:
        add_roofline_ratio(row, roofline, result["roofline_bf16_gflops"])
    top, train_top = max(args.batches), max(args.train_batches)
    result.update({
        "roofline_gflops": roofline,
        "rollout_by_batch": rollouts, "train_by_batch": train,
        "rollout_tokens_per_s": rollouts[top]["tokens_per_s"],
        "rollout_roofline_ratio": rollouts[top]["roofline_ratio"],
        "train_tokens_per_s": train[train_top]["tokens_per_s"],
        "train_roofline_ratio": train[train_top]["roofline_ratio"],
        "trl_tokens_per_s": trl.get("tokens_per_s"),
        "ppg_over_trl": (result["ppg_iteration"]["tokens_per_s"] / trl["tokens_per_s"]
                         if "tokens_per_s" in trl else None),
        "peak_rss_mb": result["peak_rss"].get("peak_rss_mb"),
        "load_average_end": load_average(),
    })
    if "trl_error" in trl:
        result["trl_error"] = trl["trl_error"]
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
