"""HF sampler: the sampler contract, exact log-probs, finished conversations leave the batch,
judges that need the user's reply, and the engine's sampler log-probs per token."""

import pytest
import torch
from sampler_contract import check_sampler_contract, trainer_logprobs

from ppg.judges.base import Judge
from ppg.rollout import HFSampler, RolloutEngine
from ppg.rollout.samplers.base import Sampling, cut_at_stop
from ppg.rollout.users import ScriptedUser
from ppg.types import Context


def _contexts(count, user_lines=("Nice. Any pets?", "Where do you live?", "Bye!")):
    return [Context(f"c{i}", f"You are Ann #{i}, a nurse.", "You are curious.", "Hi! What do you do?",
                    ["I am a nurse."], list(user_lines)) for i in range(count)]


class RecordingJudge(Judge):
    def __init__(self, needs_reply):
        self.needs_reply, self.requests = needs_reply, []

    def score(self, requests):
        self.requests += list(requests)
        return [0.5] * len(requests)


def test_hf_sampler_contract(tiny_policy):
    policy, tokenizer = tiny_policy
    sampler = HFSampler()
    sampler.bind(policy.eval(), tokenizer)
    assert check_sampler_contract(sampler, policy, tokenizer) < 1e-4


def test_hf_logprobs_are_the_sampling_distribution_with_top_p(tiny_policy):
    """top_p=1: the tempered policy's log-probs; top_p<1: the renormalised nucleus (higher)."""
    policy, tokenizer = tiny_policy
    policy.eval()
    sampler = HFSampler()
    sampler.bind(policy, tokenizer)
    prompt = tokenizer("Hello there, how are", add_special_tokens=False)["input_ids"]
    for top_p in (1.0, 0.5):
        torch.manual_seed(0)
        turn = sampler.sample([prompt], Sampling(temperature=0.7, top_p=top_p, max_new_tokens=8,
                                                 bf16_head=False))[0]
        tempered = trainer_logprobs(policy, prompt, turn.token_ids, 0.7)
        deltas = [a - b for a, b in zip(turn.logprobs, tempered)]
        if top_p == 1.0:
            assert max(abs(d) for d in deltas) < 1e-4
        else:  # minus the log of the nucleus' mass, which is < 1 on a random model's flat logits
            assert min(deltas) > 0.1


def test_draw_and_record_draws_from_the_scores_distribution():
    """Inverse-CDF draws: frequencies match softmax(scores), masked tokens never come, the
    recorded log-prob is the drawn token's, and only the drawn token is left for argmax."""
    from ppg.rollout.samplers.hf import DrawAndRecord

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen) * 2
    logits[[3, 17, 40]] = float("-inf")  # what top_p leaves outside the nucleus
    rows = 40_000
    scores = logits.repeat(rows, 1)
    recorder = DrawAndRecord()
    torch.manual_seed(1)
    out = recorder(torch.zeros(rows, 1, dtype=torch.long), scores.clone())
    drawn = out.argmax(-1)
    assert torch.isfinite(out).sum(-1).eq(1).all()
    frequencies = torch.bincount(drawn, minlength=50).float() / rows
    probs = torch.softmax(logits, -1)
    assert frequencies[[3, 17, 40]].sum() == 0
    assert (frequencies - probs).abs().max() < 4 * (probs * (1 - probs) / rows).sqrt().max()
    logprobs = recorder.result(drawn[:, None])[:, 0]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[drawn])


def test_finished_conversations_leave_the_generation_batch(tiny_policy):
    policy, tokenizer = tiny_policy
    rows = []
    generate = policy.generate

    def counting_generate(**kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    policy.generate = counting_generate
    contexts = _contexts(1, ("Only one line.",)) + _contexts(2)
    engine = RolloutEngine(policy, tokenizer, RecordingJudge(False), ScriptedUser(), n_turns=3,
                           sampling=Sampling(max_new_tokens=6), group_size=1, progress=False)
    rollouts = engine.run(contexts, seed=0)
    # The first user stops after turn 1: its row is no longer sampled at turn 2.
    assert rows == [3, 3, 2]
    assert [r.turn_mask for r in rollouts] == [[True, True, False], [True] * 3, [True] * 3]
    rows.clear()
    engine.reuse_cache = False
    engine.run(contexts, seed=0)
    assert rows == [3, 3, 2]


def test_judge_that_needs_the_reply_scores_after_it(tiny_policy):
    policy, tokenizer = tiny_policy
    for needs_reply in (False, True):
        judge = RecordingJudge(needs_reply)
        engine = RolloutEngine(policy, tokenizer, judge, ScriptedUser(), n_turns=3,
                               sampling=Sampling(max_new_tokens=4), group_size=1, progress=False)
        engine.run(_contexts(1), seed=0)
        expected = ["Nice. Any pets?", "Where do you live?", None] if needs_reply else [None] * 3
        assert [r.reply for r in judge.requests] == expected
        assert [r.turn for r in judge.requests] == [0, 1, 2]
        assert [len(r.history) for r in judge.requests] == [1, 3, 5]  # reply not in the history


def test_engine_fills_sampler_logprobs_per_token(tiny_policy):
    policy, tokenizer = tiny_policy
    engine = RolloutEngine(policy, tokenizer, RecordingJudge(False), ScriptedUser(), n_turns=2,
                           sampling=Sampling(temperature=0.8, max_new_tokens=5, bf16_head=False),
                           group_size=2, progress=False)
    rollouts = engine.run(_contexts(1), seed=0)
    for rollout in rollouts:
        assert len(rollout.sampler_logprobs) == len(rollout.token_ids)
        agent = [k for k, turn in enumerate(rollout.action_turn) if turn >= 0]
        assert all(rollout.sampler_logprobs[k] == 0.0 for k in range(len(rollout.token_ids)) if k not in agent)
        assert all(rollout.sampler_logprobs[k] < 0.0 for k in agent)
        ids = torch.tensor([rollout.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float() / 0.8, -1)
        exact = logp.gather(1, ids[0, 1:, None])[:, 0]
        for k in agent:
            assert rollout.sampler_logprobs[k] == pytest.approx(exact[k - 1].item(), abs=1e-4)


def test_cut_at_stop_keeps_the_stop_token_and_names_the_reason():
    turn = cut_at_stop([5, 6, 2, 7], [-1.0, -2.0, -3.0, -4.0], stops=[2], limit=4)
    assert (turn.token_ids, turn.logprobs, turn.stop_reason) == ([5, 6, 2], [-1.0, -2.0, -3.0], "stop")
    assert cut_at_stop([5, 6], [-1.0, -2.0], stops=[2], limit=2).stop_reason == "length"


def test_dequantized_base_holds_the_trainers_nf4_weights_and_is_cached(tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    import ppg.models.loading
    from ppg.models import load_base_model
    from ppg.models.dequantized import dequantized_base_dir

    monkeypatch.setenv("PPG_HOME", str(tmp_path))
    spec = {"name_or_path": "embedded:tiny-random-llama", "quantization": "nf4"}
    folder = dequantized_base_dir(spec, dtype="float32")
    assert folder == tmp_path / "dequantized" / "tiny-random-llama-seed0-nf4-float32-float32"
    saved = load_file(str(folder / "model.safetensors"))
    quantized, _ = load_base_model(spec)
    plain, _ = load_base_model({**spec, "quantization": "none"})
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[name], expected.float())  # exactly the trainer's nf4 values
    assert (saved[name] - plain.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3

    def no_reload(*args, **kwargs):
        raise AssertionError("the cached copy was loaded again")

    monkeypatch.setattr(ppg.models.loading, "load_base_model", no_reload)
    assert dequantized_base_dir(spec, dtype="float32") == folder
    assert dequantized_base_dir({**spec, "dtype": "float32"}, dtype="float32") == folder  # = auto on CPU
    assert dequantized_base_dir({"name_or_path": str(folder), "quantization": "none"}) == folder
    (folder / "model.safetensors").write_bytes(b"truncated")  # a broken copy is rebuilt
    with pytest.raises(AssertionError, match="loaded again"):
        dequantized_base_dir(spec, dtype="float32")


def test_sampler_classes_import_without_vllm_or_openai():
    import subprocess
    import sys

    code = ("import sys; from ppg.rollout import HFSampler, VLLMSampler, ServedSampler; "
            "print(sorted(m for m in ('vllm', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
