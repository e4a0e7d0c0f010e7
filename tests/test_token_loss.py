"""The per-token on-policy-correct surrogate: ρ = 1 exactness, no overflow, clipping, TIS."""

import csv
import math

import pytest
import torch

from ppg.objective import partial_advantages, partial_pg_loss, token_pg_loss
from ppg.subsets import Discounted, FullPlanning, Greedy, KStepLookahead, Segment

SUBSETS = [FullPlanning(), Greedy(), KStepLookahead(2), Segment(length=2), Discounted(0.7)]


def _random_case(seed: int, batch: int = 6, n_turns: int = 4, length: int = 40):
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randint(-1, n_turns, (batch, length), generator=gen)  # -1: not an agent token
    action_mask = owner[:, None, :] == torch.arange(n_turns)[None, :, None]
    logp = (-5 * torch.rand(batch, length, generator=gen)).requires_grad_()
    rewards = torch.rand(batch, n_turns, generator=gen)
    turn_mask = torch.rand(batch, n_turns, generator=gen) > 0.2
    turn_mask[:, 0] = True
    groups = torch.arange(batch // 2).repeat_interleave(2)
    return logp, action_mask, rewards, turn_mask, groups


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: s.name)
def test_ratio_one_gradient_equals_turn_level_partial_pg(subset):
    logp, actions, rewards, turn_mask, groups = _random_case(0)
    valid = actions.any(dim=1)
    turn_lp = torch.einsum("bl,btl->bt", torch.where(valid, logp, 0.0), actions.float())
    reference = partial_pg_loss(turn_lp, rewards, subset, "leave_one_out", groups, turn_mask)
    (g_turn,) = torch.autograd.grad(reference, logp)
    adv = partial_advantages(rewards, subset, "leave_one_out", groups, turn_mask)
    for clip_eps, tis_cap in [(None, None), (0.2, 2.0)]:
        tokens = torch.where(valid, logp, math.nan)  # off-action positions may hold garbage
        out = token_pg_loss(tokens, tokens.detach(), adv, actions, turn_mask, clip_eps, tis_cap)
        (g_token,) = torch.autograd.grad(out.loss, logp)
        assert (g_token - g_turn).abs().max().item() <= 1e-6
        assert out.loss.item() == pytest.approx(reference.item(), abs=1e-5)
        assert out.clipped.item() == 0 and out.log_ratio_max.item() == 0.0
        assert out.tokens.item() == (actions & turn_mask[:, :, None]).sum().item()
    assert g_turn.abs().max() > 0.01  # the comparison is not between zeros


def test_long_turns_with_three_nat_drift_stay_finite():
    length = 400  # two turns of 200 agent tokens
    owner = torch.arange(length) // 200
    actions = (owner[None, None, :] == torch.arange(2)[None, :, None]).expand(2, 2, length)
    sampler = torch.full((2, length), -5.0)
    adv = torch.tensor([[1.0, -1.0], [-0.5, 2.0]])
    e3 = math.exp(3.0)
    # per-turn log-ratio: 600 nats, whose exp overflows float32 (the old per-turn ratio)
    assert torch.exp(torch.tensor([[600.0]])).isinf().all()
    weights = {  # per (drift, clip_eps, tis_cap): token weight where A > 0, where A < 0
        (3.0, None, None): (e3, e3), (3.0, 0.2, 2.0): (0.0, 2.0), (3.0, None, 2.0): (2.0, 2.0),
        (-3.0, None, None): (1 / e3, 1 / e3), (-3.0, 0.2, 2.0): (1 / e3, 0.0),
        (-3.0, None, 2.0): (1 / e3, 1 / e3),
    }
    for (drift, clip_eps, tis_cap), (w_pos, w_neg) in weights.items():
        logp = (sampler + drift).requires_grad_()
        out = token_pg_loss(logp, sampler, adv, actions, clip_eps=clip_eps, tis_cap=tis_cap)
        (grad,) = torch.autograd.grad(out.loss, logp)
        w = torch.where(adv > 0, w_pos, w_neg)
        expected = -(adv * w * 200 * (drift - 5.0)).sum() / 2
        assert math.isfinite(out.loss.item()) and torch.isfinite(grad).all()
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert grad[0, 0].item() == pytest.approx(-1.0 * w_pos / 2, rel=1e-5)
        assert out.log_ratio_max.item() == pytest.approx(drift)


def _hand_case():
    """One row: prompt, turn 0 (A=+1) log-ratios 0.5, -0.5, 0.1, 0, turn 1 (A=-1) 0.5, -0.5,
    turn 2 (did not happen) 5.0."""
    owner = torch.tensor([-1, 0, 0, 0, 0, 1, 1, 2])
    actions = (owner[None, :] == torch.arange(3)[:, None])[None]
    log_ratio = torch.tensor([[0.0, 0.5, -0.5, 0.1, 0.0, 0.5, -0.5, 5.0]])
    sampler = torch.full((1, 8), -1.0)
    logp = (sampler + log_ratio).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    return logp, sampler, adv, actions, torch.tensor([[True, True, False]])


def test_clip_fraction_ratio_max_and_gradient_hand_case():
    logp, sampler, adv, actions, turn_mask = _hand_case()
    out = token_pg_loss(logp, sampler, adv, actions, turn_mask, clip_eps=0.2, tis_cap=1.5)
    out.loss.backward()
    # clipped: 0.5 with A > 0 (ρ > 1.2) and -0.5 with A < 0 (ρ < 0.8): 2 of 6 tokens
    assert (out.tokens.item(), out.clipped.item()) == (6, 2)
    assert out.log_ratio_max.item() == 0.5  # the 5.0 of the masked turn does not count
    expected = torch.tensor([[0.0, 0.0, -math.exp(-0.5), -math.exp(0.1), -1.0, 1.5, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-7)

    unclipped = token_pg_loss(logp, sampler, adv, actions, turn_mask, tis_cap=1.5)
    assert unclipped.clipped.item() == 0


def test_tis_cap_truncates_the_weight_exactly():
    sampler = torch.full((1, 5), -2.0)
    log_ratio = torch.tensor([[0.0, math.log(3.0), math.log(0.5), 0.0, math.log(1.5)]])
    actions = torch.tensor([[[False, True, True, True, True]]])
    adv = torch.tensor([[2.0]])
    for cap, weights in [(2.0, [2.0, 0.5, 1.0, 1.5]), (None, [3.0, 0.5, 1.0, 1.5])]:
        logp = (sampler + log_ratio).requires_grad_()
        out = token_pg_loss(logp, sampler, adv, actions, tis_cap=cap)
        out.loss.backward()
        w = torch.tensor([[0.0, *weights]])
        torch.testing.assert_close(logp.grad, -2.0 * w, rtol=0, atol=1e-6)
        assert out.loss.item() == pytest.approx(-2.0 * (w * logp.detach()).sum().item(), rel=1e-6)
        assert out.log_ratio_max.item() == pytest.approx(math.log(3.0))  # raw, before the cap


# ---- the batch carries the sampler's log-probs ------------------------------------------------


def test_collate_left_pads_sampler_logprobs_and_select_keeps_them():
    from ppg.rollout import Rollout, collate_rollouts
    from ppg.types import Context

    def rollout(tokens, turns, sampler):
        return Rollout(Context("c", "sys", "", "Hi"), 0, tokens, turns, [1.0], [True], [], sampler)

    batch = collate_rollouts([rollout([5, 6, 7], [-1, 0, 0], [0.0, -0.5, -1.5]),
                              rollout([5, 6], [-1, 0], [0.0, -2.0])], pad_id=0)
    assert batch.sampler_logprobs.tolist() == [[0.0, -0.5, -1.5], [0.0, 0.0, -2.0]]
    assert batch.select([1]).sampler_logprobs.tolist() == [[0.0, 0.0, -2.0]]
    assert batch.to("cpu").sampler_logprobs.dtype == torch.float32
    assert collate_rollouts([rollout([5, 6], [-1, 0], [])], pad_id=0).sampler_logprobs is None
    with pytest.raises(ValueError, match="sampler_logprobs: some rollouts of the batch carry them"):
        collate_rollouts([rollout([5, 6], [-1, 0], []), rollout([5, 6], [-1, 0], [0.0, -1.0])], 0)
    with pytest.raises(ValueError, match="sampler_logprobs: rollout 0 has 1 entries for 2 tokens"):
        collate_rollouts([rollout([5, 6], [-1, 0], [0.0])], 0)


# ---- end to end on the tiny random Llama -------------------------------------------------------


@pytest.fixture()
def tiny_batch(tiny_spec):
    """A module with non-zero LoRA B (every adapter parameter gets a gradient) and a batch of four
    3-turn conversations in two groups, with random rewards and one turn that did not happen."""
    from ppg.module import PartialPolicyGradientModule
    from ppg.rollout import collate_rollouts, rollout_from_messages
    from ppg.types import Context

    module = PartialPolicyGradientModule(model=tiny_spec, lr=1e-6)
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=gen))
    rollouts = []
    for row in range(4):
        lines = ["Hi!", "Hello, how can I help?" * (row + 1), "Tell me more.", "Sure: it rains.",
                 "Why?", "Clouds." * (3 - row)]
        messages = [("user" if i % 2 == 0 else "assistant", line) for i, line in enumerate(lines)]
        rollouts.append(rollout_from_messages(
            module.tokenizer, Context(f"c{row // 2}", "You are Ann.", "", "Hi!"), messages,
            torch.rand(3, generator=gen).tolist(), [True, True, row != 1], group_id=row // 2))
    return module, collate_rollouts(rollouts, module.tokenizer.pad_token_id)


def test_module_gradient_at_ratio_one_equals_partial_pg_on_turn_logprobs(tiny_batch):
    module, batch = tiny_batch
    params = [p for p in module.policy.parameters() if p.requires_grad]
    batch.sampler_logprobs = module.token_logprobs(batch).detach()
    worst = 0.0
    for subset in SUBSETS:
        module.subset = subset
        reference = partial_pg_loss(module.turn_logprobs(batch), batch.rewards, subset,
                                    "leave_one_out", batch.group_ids, batch.turn_mask)
        g_turn = torch.autograd.grad(reference, params)
        # the sampler's log-probs equal the trainer's; offline (no sampler log-probs) once
        for behaviour in [batch.sampler_logprobs] + ([None] if subset is SUBSETS[0] else []):
            out, _ = module.policy_loss(batch, module.advantages(batch), behaviour, clip=True)
            g_token = torch.autograd.grad(out.loss, params)
            diff = max((a - b).abs().max().item() for a, b in zip(g_token, g_turn))
            worst = max(worst, diff)
            assert diff <= 1e-6, (subset.name, diff)
        assert max(g.abs().max().item() for g in g_turn) > 1e-3
    print(f"max |grad difference| at ratio 1 over {len(SUBSETS)} classes: {worst:.2e}")


class _FixedBatches:
    def __init__(self, batches):
        from ppg.data import ConversationDataModule

        class Data(ConversationDataModule):
            def train_dataloader(self):
                return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

        self.data = Data()


def test_batch_after_the_first_is_clipped_and_gap_logged_before_updates(tiny_batch, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    module, batch = tiny_batch
    with torch.no_grad():
        trainer_logp = module.token_logprobs(batch)
    acted = (batch.action_mask & batch.turn_mask[:, :, None]).any(dim=1)
    # the sampler gave every agent token 0.5 nats less than the trainer: ρ = e^0.5 > 1 + clip_eps
    batch.sampler_logprobs = torch.where(acted, trainer_logp - 0.5, 0.0)
    adv = module.advantages(batch)
    token_adv = torch.einsum("bt,btl->bl", adv, batch.action_mask.float())
    positive = ((token_adv > 0) & acted).sum().item() / acted.sum().item()
    assert 0 < positive < 1
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=_FixedBatches([batch, batch]).data)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    gaps = [float(r["rollout/sampler_logprob_gap"]) for r in rows if r["rollout/sampler_logprob_gap"]]
    assert gaps == [pytest.approx(0.5, abs=1e-5)]  # once per epoch, before its first update
    rows = [r for r in rows if r["train/clip_fraction"]]
    assert len(rows) == 2
    first, second = rows
    assert float(first["train/clip_fraction"]) == 0.0  # the epoch's first update is not clipped
    # the second batch runs on a moved policy: every token with A > 0 and ρ ≈ e^0.5 is clipped
    assert float(second["train/clip_fraction"]) == pytest.approx(positive, abs=1e-6)
    for row in rows:
        assert float(row["train/ratio_max"]) == pytest.approx(math.exp(0.5), abs=1e-3)
