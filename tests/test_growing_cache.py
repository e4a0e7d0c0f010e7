"""The in-place KV cache: the same keys, values and samples as transformers' DynamicLayer."""

import torch
from transformers.cache_utils import DynamicLayer

import ppg.rollout.samplers.hf as hf_sampler
from ppg.judges.rule import RuleJudge
from ppg.rollout import RolloutEngine
from ppg.rollout.samplers.base import Sampling
from ppg.rollout.samplers.growing_cache import GrowingKVLayer, growing_cache
from ppg.rollout.users import ScriptedUser
from ppg.types import Context


def _states(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, length, 8, generator=generator), torch.randn(batch, 3, length, 8, generator=generator)


def test_growing_layer_returns_what_concatenation_returns_and_reuses_its_room():
    growing, plain = GrowingKVLayer(), DynamicLayer()
    pointers = []
    for step, length in enumerate([5, 1, 1, 7, 1]):
        keys, values = _states(2, length, step)
        got, expected = growing.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        pointers.append(growing.key_room.data_ptr())
    assert growing.get_seq_length() == plain.get_seq_length() == 15
    assert len(set(pointers)) == 1  # 15 positions fit the first room (5 + 64 spare): nothing copied
    assert growing.key_room.shape[-2] == 5 + GrowingKVLayer.spare

    # Rows dropped and reordered (finished conversations), then cropped: still the same.
    index = torch.tensor([1])
    growing.batch_select_indices(index)
    plain.batch_select_indices(index)
    growing.crop(-2)
    plain.crop(-2)
    for step, length in enumerate([3, 80]):  # 80 outgrows the room
        keys, values = _states(1, length, 10 + step)
        got, expected = growing.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing.get_seq_length() == 96
    assert growing.key_room.shape == (1, 3, 13 + 3 + 80 + GrowingKVLayer.spare, 8)


def test_growing_cache_keeps_other_layer_kinds(tiny_model):
    cache = growing_cache(tiny_model.config)
    assert len(cache.layers) == tiny_model.config.num_hidden_layers
    assert all(type(layer) is GrowingKVLayer for layer in cache.layers)


def test_rollouts_are_token_for_token_those_of_transformers_cache(tiny_policy, monkeypatch):
    policy, tokenizer = tiny_policy
    contexts = [Context(f"c{i}", f"You are Ann #{i}.", "You are curious.", "Hi! What do you do?",
                        ["I am a nurse."], ["Any pets?", "Where do you live?"] if i else ["Bye."])
                for i in range(3)]

    def run():
        engine = RolloutEngine(policy, tokenizer, RuleJudge(keywords=["pet"]), ScriptedUser(), n_turns=3,
                               sampling=Sampling(max_new_tokens=12), group_size=2, progress=False)
        return [(r.token_ids, r.sampler_logprobs) for r in engine.run(contexts, seed=3)]

    caches = []
    new_cache = hf_sampler.growing_cache
    monkeypatch.setattr(hf_sampler, "growing_cache", lambda config: caches.append(new_cache(config)) or caches[-1])
    growing = run()
    monkeypatch.setattr(hf_sampler, "growing_cache", lambda config: None)  # generate makes a DynamicCache
    assert caches and growing == run()
