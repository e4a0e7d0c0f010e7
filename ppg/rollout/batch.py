"""Finished conversations and their padded training tensors.

``RolloutBatch.action_mask`` marks exactly the tokens the policy sampled at each agent turn;
``token_logprobs`` scores them under the current policy in one forward pass, ``turn_logprobs``
sums them per turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ppg.rollout.samplers.base import left_pad
from ppg.types import Context


@dataclass
class Rollout:
    """One finished conversation: tokens, which agent turn produced each token, rewards."""

    context: Context
    group_id: int
    token_ids: list[int]
    action_turn: list[int]  # per token: agent turn index that sampled it, or -1
    rewards: list[float]  # [n_turns], 0 for turns that did not happen
    turn_mask: list[bool]  # [n_turns]
    messages: list[tuple[str, str]]  # (role, text), starting with the user's opening
    # per token: the sampler's log-prob of each sampled agent token (temperature applied), 0.0
    # elsewhere; empty when unknown (logged conversations)
    sampler_logprobs: list[float] = field(default_factory=list)

    @property
    def agent_texts(self) -> list[str]:
        return [text for role, text in self.messages if role == "assistant"]

    def to_json(self) -> dict:
        """The logged-conversation record (see ``LoggedConversationDataModule``)."""
        return {"context_id": self.context.context_id, "group_id": self.group_id,
                "agent_system_prompt": self.context.agent_system_prompt,
                "user_system_prompt": self.context.user_system_prompt,
                "persona": self.context.persona, "messages": [list(m) for m in self.messages],
                "rewards": self.rewards, "turn_mask": self.turn_mask}


_TENSORS = ("input_ids", "attention_mask", "action_mask", "rewards", "turn_mask", "group_ids")


@dataclass
class RolloutBatch:
    """Padded tensors for a list of rollouts (left padding).

    ``action_mask[b, t, j]`` is True where token j of row b was sampled by the agent at turn t.
    ``sampler_logprobs[b, j]`` is the sampler's log-prob of that token (0 elsewhere); None when
    the rollouts do not carry them (logged conversations).
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, n, L] bool
    rewards: torch.Tensor  # [B, n]
    turn_mask: torch.Tensor  # [B, n] bool
    group_ids: torch.Tensor  # [B]
    rollouts: list[Rollout] = field(default_factory=list, repr=False)
    temperature: float = 1.0  # the sampling temperature, so log-probs match what was sampled
    sampler_logprobs: torch.Tensor | None = None  # [B, L] float32

    @property
    def n_turns(self) -> int:
        return self.rewards.shape[1]

    def select(self, rows: list[int]) -> RolloutBatch:
        """The sub-batch of ``rows`` (padding kept)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        picked = {name: getattr(self, name)[index] for name in _TENSORS}
        sampler = self.sampler_logprobs[index] if self.sampler_logprobs is not None else None
        return RolloutBatch(**picked, rollouts=[self.rollouts[r] for r in rows if r < len(self.rollouts)],
                            temperature=self.temperature, sampler_logprobs=sampler)

    def to(self, device) -> RolloutBatch:
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        sampler = self.sampler_logprobs.to(device) if self.sampler_logprobs is not None else None
        return RolloutBatch(**moved, rollouts=self.rollouts, temperature=self.temperature,
                            sampler_logprobs=sampler)


def _sampler_logprobs(rollouts: Sequence[Rollout], width: int) -> torch.Tensor | None:
    """``[B, width]`` left-padded sampler log-probs, or None when no rollout carries them."""
    carried = [bool(r.sampler_logprobs) for r in rollouts]
    if not any(carried):
        return None
    if not all(carried):
        raise ValueError("sampler_logprobs: some rollouts of the batch carry them and others not")
    out = torch.zeros(len(rollouts), width, dtype=torch.float32)
    for row, rollout in enumerate(rollouts):
        if len(rollout.sampler_logprobs) != len(rollout.token_ids):
            raise ValueError(f"sampler_logprobs: rollout {row} has {len(rollout.sampler_logprobs)} "
                             f"entries for {len(rollout.token_ids)} tokens")
        out[row, width - len(rollout.token_ids):] = torch.tensor(rollout.sampler_logprobs)
    return out


def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int, temperature: float = 1.0) -> RolloutBatch:
    """Pad rollouts (all with the same number of turns) into a ``RolloutBatch``."""
    n_turns = len(rollouts[0].rewards)
    input_ids, attention_mask = left_pad([r.token_ids for r in rollouts], pad_id)
    turns, _ = left_pad([r.action_turn for r in rollouts], -1)
    turn_index = torch.arange(n_turns).view(1, n_turns, 1)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        action_mask=turns.unsqueeze(1) == turn_index,
        rewards=torch.tensor([r.rewards for r in rollouts], dtype=torch.float32),
        turn_mask=torch.tensor([r.turn_mask for r in rollouts], dtype=torch.bool),
        group_ids=torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
        rollouts=list(rollouts),
        temperature=temperature,
        sampler_logprobs=_sampler_logprobs(rollouts, input_ids.shape[1]),
    )


def token_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """``[B, L]`` log-probability of each agent-sampled token (column j: log π(token j | tokens
    before j), temperature applied), 0 at other positions; with gradients, fp32.

    One forward pass over the batch; the vocabulary projection runs on action positions only.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=position_ids, use_cache=False).last_hidden_state
    # Token j is predicted from position j - 1.
    rows, cols = batch.action_mask[:, :, 1:].any(dim=1).nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols])
    targets = batch.input_ids[rows, cols + 1]
    with torch.autocast(logits.device.type, enabled=False):  # fp32 under mixed precision
        logits = logits.float()
        if temperature != 1.0:  # x / 1.0 == x: skip a pass over a [tokens, vocabulary] tensor
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        logp = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
        per_token = torch.zeros(batch.input_ids.shape, dtype=logp.dtype, device=logp.device)
        return per_token.index_put((rows, cols + 1), logp)


def turn_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """``[B, n]`` sums of the log-probabilities of each turn's sampled tokens, with gradients."""
    per_token = token_logprobs(model, batch, temperature)
    with torch.autocast(per_token.device.type, enabled=False):
        return torch.einsum("bl,btl->bt", per_token, batch.action_mask.to(per_token.dtype))
