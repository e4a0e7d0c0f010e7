"""Rollout engine on the tiny random Llama: exact action masks, turn masks, groups, log-probs."""

import pytest
import torch

from ppg.judges.rule import RuleJudge
from ppg.problems.base import Context
from ppg.rollout import RolloutEngine, collate_rollouts, rollout_from_messages, turn_logprobs
from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.hf import generate_replies
from ppg.rollout.users import ScriptedUser, SelfPlayUser


def _contexts(count, user_lines=("Nice. Any pets?", "Where do you live?", "Bye!")):
    return [Context(f"c{i}", f"You are Ann #{i}, a nurse.", "You are curious.", "Hi! What do you do?",
                    ["I am a nurse."], list(user_lines)) for i in range(count)]


def _engine(tiny_policy, n_turns=3, group_size=2, user=None, max_new_tokens=10):
    policy, tokenizer = tiny_policy
    judge = RuleJudge(function=lambda request: min(len(request.line) / 100, 1.0))
    return RolloutEngine(policy, tokenizer, judge, user or ScriptedUser(), n_turns=n_turns,
                         sampling=Sampling(max_new_tokens=max_new_tokens), group_size=group_size,
                         progress=False)


def test_action_mask_round_trip_gives_exactly_the_agent_texts(tiny_policy):
    _, tokenizer = tiny_policy
    engine = _engine(tiny_policy)
    rollouts = engine.run(_contexts(2), seed=0)
    batch = collate_rollouts(rollouts, tokenizer.pad_token_id)
    assert batch.action_mask.shape == (4, 3, batch.input_ids.shape[1])
    assert not (batch.action_mask.sum(1) > 1).any()  # a token belongs to at most one turn
    assert (batch.attention_mask.bool() | ~batch.action_mask.any(1)).all()  # never padding
    for row, rollout in enumerate(rollouts):
        for turn in range(3):
            ids = batch.input_ids[row][batch.action_mask[row, turn]]
            assert tokenizer.decode(ids, skip_special_tokens=True).strip() == rollout.agent_texts[turn]
        # Everything not sampled by the agent decodes to the prompt, user lines and template.
        rest = tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool() & ~batch.action_mask[row].any(0)])
        assert rest.count("Nice. Any pets?") == 1 and "You are Ann" in rest
    assert engine.stats.agent_tokens == int(batch.action_mask.sum())


def test_turn_mask_on_early_end_and_zero_rewards(tiny_policy):
    engine = _engine(tiny_policy, n_turns=4, group_size=1, user=ScriptedUser())
    rollouts = engine.run(_contexts(1, user_lines=("Only one line.",)), seed=0)
    # The user answers after turn 0, has nothing left after turn 1: turns 2 and 3 never happen.
    assert rollouts[0].turn_mask == [True, True, False, False]
    assert rollouts[0].rewards[2:] == [0.0, 0.0]
    assert len(rollouts[0].agent_texts) == 2


def test_group_ids_follow_contexts(tiny_policy):
    engine = _engine(tiny_policy, n_turns=1, group_size=3)
    rollouts = engine.run(_contexts(2), seed=0, first_group_id=5)
    assert [r.group_id for r in rollouts] == [5, 5, 5, 6, 6, 6]
    assert [r.context.context_id for r in rollouts] == ["c0"] * 3 + ["c1"] * 3


def test_same_seed_same_rollouts(tiny_policy):
    first = _engine(tiny_policy).run(_contexts(2), seed=7)
    second = _engine(tiny_policy).run(_contexts(2), seed=7)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_turn_logprobs_match_per_token_reference(tiny_policy):
    policy, tokenizer = tiny_policy
    rollouts = _engine(tiny_policy).run(_contexts(2), seed=1)
    batch = collate_rollouts(rollouts, tokenizer.pad_token_id)
    fast = turn_logprobs(policy, batch)
    assert fast.requires_grad
    for row, rollout in enumerate(rollouts):  # unpadded, full-vocabulary reference
        ids = torch.tensor([rollout.token_ids])
        logp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float(), -1)
        token_logp = logp.gather(1, ids[0, 1:, None])[:, 0]
        turns = torch.tensor(rollout.action_turn[1:])
        for turn in range(3):
            assert fast[row, turn].item() == pytest.approx(token_logp[turns == turn].sum().item(), abs=1e-3)


def test_rollout_from_messages_marks_agent_lines(tokenizer):
    context = _contexts(1)[0]
    messages = [("user", "Hi! What do you do?"), ("assistant", "I am a nurse."),
                ("user", "Nice."), ("assistant", "Thanks, I love it.")]
    rollout = rollout_from_messages(tokenizer, context, messages, [0.5, 1.0])
    batch = collate_rollouts([rollout], tokenizer.pad_token_id)
    for turn, text in enumerate(["I am a nurse.", "Thanks, I love it."]):
        ids = batch.input_ids[0][batch.action_mask[0, turn]]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with pytest.raises(ValueError, match="alternate"):
        rollout_from_messages(tokenizer, context, messages[1:], [0.5])


def test_self_play_user_runs_with_adapters_disabled(tiny_policy):
    policy, tokenizer = tiny_policy
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 5.0)  # make the adapters change the output a lot
    contexts = _contexts(2)
    histories = [[("user", "Hi!"), ("assistant", "Hello, I am Ann.")]] * 2
    user = SelfPlayUser(Sampling(max_new_tokens=8))
    user.bind(policy, tokenizer)
    torch.manual_seed(0)
    replies = user.respond(contexts, histories, 0)
    torch.manual_seed(0)
    from ppg.rollout.users import user_view

    with policy.disable_adapter():
        base = generate_replies(policy, tokenizer, [user_view(c, h) for c, h in zip(contexts, histories)],
                                Sampling(max_new_tokens=8))
    torch.manual_seed(0)
    adapted = generate_replies(policy, tokenizer, [user_view(c, h) for c, h in zip(contexts, histories)],
                               Sampling(max_new_tokens=8))
    assert replies == base
    assert adapted != base


def test_out_of_range_judge_reward_is_an_error(tiny_policy):
    policy, tokenizer = tiny_policy
    engine = RolloutEngine(policy, tokenizer, RuleJudge(function=lambda r: 0.5), n_turns=1,
                           sampling=Sampling(max_new_tokens=4), group_size=1, progress=False)
    engine.judge.score = lambda requests: [1.5] * len(requests)
    with pytest.raises(ValueError, match="returned reward 1.5, outside"):
        engine.run(_contexts(1), seed=0)


def test_kv_cache_reuse_between_turns_gives_the_same_conversations(tiny_policy):
    """Near-greedy sampling: keeping the cache must not change what the model says."""
    contexts = [Context(f"c{i}", "You are Ann.", "u", "Hi!" + " really" * i, [],
                        ["Nice.", "Where do you live?" * (i + 1), "Bye!"]) for i in range(3)]
    texts = {}
    for reuse in (False, True):
        engine = _engine(tiny_policy, n_turns=4, group_size=2, max_new_tokens=8)
        engine.reuse_cache = reuse
        engine.sampling = Sampling(temperature=1e-4, max_new_tokens=8)
        rollouts = engine.run(contexts, seed=0)
        texts[reuse] = [(r.agent_texts, r.token_ids) for r in rollouts]
    assert texts[True] == texts[False]


def test_a_rollout_phase_leaves_no_tensor_in_reference_cycles(tiny_policy):
    """The engine trims the heap after a phase without a garbage collection: that is only
    right if the phase's tensors (KV caches, sampled ids) are freed by reference counting."""
    import gc

    engine = _engine(tiny_policy, user=SelfPlayUser(Sampling(max_new_tokens=6)))
    engine.run(_contexts(2), seed=0)  # warm-up: lazily built modules, caches of transformers
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        rollouts = engine.run(_contexts(3), seed=1)
        gc.collect()
        cyclic_tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(rollouts) == 6
    assert cyclic_tensors == []
