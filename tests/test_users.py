"""SelfPlayUser keeps its KV cache between user turns: same replies, fewer tokens encoded."""

from ppg.judges.rule import RuleJudge
from ppg.rollout import RolloutEngine, Sampling
from ppg.rollout.users import SelfPlayUser
from ppg.types import Context


def _self_play(policy, tokenizer, reuse_cache: bool):
    """Near-greedy 3-turn self-play conversations and the number of token ids embedded."""
    contexts = [Context(f"c{i}", "You are Ann.", "You are Bob, a curious student.", "Hi!" + " really" * i,
                        [], []) for i in range(2)]
    near_greedy = Sampling(temperature=1e-4, max_new_tokens=6)
    user = SelfPlayUser(near_greedy, reuse_cache=reuse_cache)
    engine = RolloutEngine(policy, tokenizer, RuleJudge(keywords=["a"]), user, n_turns=3,
                           sampling=near_greedy, group_size=2, progress=False)
    embedded = []
    embeddings = policy.get_base_model().get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, out: embedded.append(args[0].numel()))
    try:
        rollouts = engine.run(contexts, seed=0)
    finally:
        hook.remove()
    return [r.messages for r in rollouts], sum(embedded)


def test_self_play_user_cache_gives_the_same_replies_with_fewer_tokens(tiny_policy):
    policy, tokenizer = tiny_policy
    cached, cached_tokens = _self_play(policy, tokenizer, reuse_cache=True)
    fresh, fresh_tokens = _self_play(policy, tokenizer, reuse_cache=False)
    assert [len(m) for m in cached] == [6] * 4  # opening + 3 agent lines + 2 user replies
    assert cached == fresh
    assert cached_tokens < fresh_tokens
