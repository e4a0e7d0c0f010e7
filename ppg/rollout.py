"""Multi-turn rollouts: a batch of conversations advanced turn by turn, then scored.

The policy sees each conversation through its chat template. Token ids are built piece by
piece, the agent's sampled tokens kept verbatim, so the action mask marks exactly the tokens the
policy produced (never prompt, user or padding tokens) and no re-tokenization can shift them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ppg.generation import (
    Sampling,
    TurnByTurnSampler,
    left_pad,
    sample_continuations,
    stop_token_ids,
)
from ppg.judges.base import Judge, JudgeRequest
from ppg.memory import trim_heap
from ppg.problems.base import Context
from ppg.users import ScriptedUser, UserSimulator

_MARK = "\x00PPG-TURN\x00"


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


@dataclass
class RolloutBatch:
    """Padded tensors for a list of rollouts (left padding).

    ``action_mask[b, t, j]`` is True where token j of row b was sampled by the agent at turn t.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, n, L] bool
    rewards: torch.Tensor  # [B, n]
    turn_mask: torch.Tensor  # [B, n] bool
    group_ids: torch.Tensor  # [B]
    rollouts: list[Rollout] = field(default_factory=list, repr=False)
    temperature: float = 1.0  # the sampling temperature, so log-probs match what was sampled

    @property
    def n_turns(self) -> int:
        return self.rewards.shape[1]

    def select(self, rows: list[int]) -> RolloutBatch:
        """The sub-batch of ``rows`` (padding kept)."""
        index = torch.tensor(rows, dtype=torch.long)
        picked = {name: getattr(self, name)[index.to(getattr(self, name).device)] for name in
                  ("input_ids", "attention_mask", "action_mask", "rewards", "turn_mask", "group_ids")}
        return RolloutBatch(**picked, rollouts=[self.rollouts[r] for r in rows if r < len(self.rollouts)],
                            temperature=self.temperature)

    def to(self, device) -> RolloutBatch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "attention_mask", "action_mask", "rewards", "turn_mask", "group_ids")}
        return RolloutBatch(**moved, rollouts=self.rollouts, temperature=self.temperature)


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
    )


def turn_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """``[B, n]`` sums of the log-probabilities of each turn's sampled tokens, with gradients.

    One forward pass over the batch; the vocabulary projection runs on action positions only.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=position_ids, use_cache=False).last_hidden_state
    # Token j is predicted from position j - 1.
    acted = batch.action_mask[:, :, 1:].any(dim=1)  # [B, L-1]
    rows, cols = acted.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols])
    targets = batch.input_ids[rows, cols + 1]
    with torch.autocast(logits.device.type, enabled=False):  # fp32 sums under mixed precision
        token_logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        token_logp = token_logp.gather(1, targets.unsqueeze(1)).squeeze(1)
        per_token = torch.zeros(acted.shape, dtype=token_logp.dtype, device=token_logp.device)
        per_token = per_token.index_put((rows, cols), token_logp)
        return torch.einsum("bl,btl->bt", per_token, batch.action_mask[:, :, 1:].to(per_token.dtype))


@dataclass
class RolloutStats:
    """Token counts and seconds spent, for throughput metrics."""

    agent_tokens: int = 0
    agent_seconds: float = 0.0
    user_tokens: int = 0
    user_seconds: float = 0.0
    judge_seconds: float = 0.0

    def tokens_per_s(self) -> dict[str, float]:
        def rate(tokens: int, seconds: float) -> float:
            return tokens / seconds if seconds > 0 else 0.0

        return {"agent": rate(self.agent_tokens, self.agent_seconds),
                "user": rate(self.user_tokens, self.user_seconds),
                "total": rate(self.agent_tokens + self.user_tokens,
                              self.agent_seconds + self.user_seconds + self.judge_seconds)}


class ChatTemplateSegments:
    """Token pieces of a chat template around free text, found by rendering with a marker."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def opening(self, context: Context) -> list[int]:
        messages = [{"role": "system", "content": context.agent_system_prompt},
                    {"role": "user", "content": context.opening}]
        return self.encode(self._render(messages, generation_prompt=True))

    def after_agent(self, user_text: str | None, stop_text: str | None) -> list[int]:
        """Tokens between an agent turn and the next one: the turn's closing, the user's reply,
        and the next generation prompt (only the closing if the user said nothing)."""
        base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": _MARK}]
        if user_text is None:
            text = self._render(base, generation_prompt=False).split(_MARK, 1)[1]
        else:
            text = self._render(base + [{"role": "user", "content": user_text}],
                                generation_prompt=True).split(_MARK, 1)[1]
        # The sampled stop token already closed the turn: don't add it twice.
        if stop_text and text.startswith(stop_text):
            text = text[len(stop_text):]
        return self.encode(text)

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class RolloutEngine:
    """Plays ``n_turns`` agent turns for a batch of contexts (``group_size`` rollouts each).

    All live conversations generate together each turn; conversations whose user ended them, or
    that would exceed ``max_context_tokens``, drop out and their later turns are masked. With
    ``reuse_cache`` the agent's KV cache is kept from turn to turn, so each turn encodes only the
    new user reply instead of the whole history.
    """

    def __init__(self, policy, tokenizer, judge: Judge, user: UserSimulator | None = None,
                 n_turns: int = 4, sampling: Sampling | None = None, group_size: int = 4,
                 batch_size: int = 32, max_context_tokens: int = 2048, progress: bool = True,
                 reuse_cache: bool = True):
        if n_turns < 1:
            raise ValueError(f"n_turns must be >= 1, got {n_turns}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.policy, self.tokenizer, self.judge = policy, tokenizer, judge
        self.user = user or ScriptedUser()
        self.user.bind(policy, tokenizer)
        self.n_turns, self.group_size, self.batch_size = n_turns, group_size, batch_size
        self.sampling = sampling or Sampling()
        self.max_context_tokens = max_context_tokens
        self.progress, self.reuse_cache = progress, reuse_cache
        self.segments = ChatTemplateSegments(tokenizer)
        self.stats = RolloutStats()

    def run(self, contexts: Sequence[Context], seed: int | None = None, first_group_id: int = 0) -> list[Rollout]:
        """Roll out every context ``group_size`` times; rollouts of a context share a group id."""
        if seed is not None:
            torch.manual_seed(seed)
        jobs = [(context, first_group_id + g) for g, context in enumerate(contexts)
                for _ in range(self.group_size)]
        total = -(-len(jobs) // self.batch_size) * self.n_turns
        bar = tqdm(total=total, desc="rollouts", unit="turn", disable=not self.progress, leave=False)
        rollouts = []
        was_training = self.policy.training
        self.policy.eval()
        try:
            for start in range(0, len(jobs), self.batch_size):
                rollouts += self._run_chunk(jobs[start:start + self.batch_size], bar)
        finally:
            self.policy.train(was_training)
            bar.close()
            trim_heap()  # the KV caches of a rollout phase are large and short-lived
        return rollouts

    def _run_chunk(self, jobs, bar) -> list[Rollout]:
        n = self.n_turns
        states = [Rollout(context=c, group_id=g, token_ids=[], action_turn=[], rewards=[0.0] * n,
                          turn_mask=[False] * n, messages=[("user", c.opening)]) for c, g in jobs]
        for state in states:
            state.token_ids = self.segments.opening(state.context)
            state.action_turn = [-1] * len(state.token_ids)
        sampler = TurnByTurnSampler(self.policy, self.tokenizer, self.sampling) if self.reuse_cache else None
        additions = {i: state.token_ids for i, state in enumerate(states)}
        live = list(range(len(states)))
        for turn in range(n):
            live = [i for i in live if len(states[i].token_ids) + self.sampling.max_new_tokens
                    <= self.max_context_tokens]
            if not live:
                bar.update(n - turn)
                break
            actions = self._agent_turn(states, live, turn, additions, sampler)
            self._score(states, live, turn)
            replies = self._user_turn(states, live, turn) if turn < n - 1 else [None] * len(live)
            additions = self._close_turn(states, live, actions, replies)
            live = [i for i, reply in zip(live, replies) if reply is not None]
            bar.update(1)
        return states

    def _agent_turn(self, states, live, turn: int, additions, sampler) -> list[list[int]]:
        """Sample the agent's tokens for the live conversations and record them."""
        started = time.perf_counter()
        if sampler is not None:
            sampled = sampler.sample([additions.get(i, []) for i in range(len(states))])
            actions = [sampled[i] for i in live]
        else:
            actions = sample_continuations(self.policy, self.tokenizer,
                                           [states[i].token_ids for i in live], self.sampling)
        self.stats.agent_seconds += time.perf_counter() - started
        self.stats.agent_tokens += sum(len(a) for a in actions)
        for i, tokens in zip(live, actions):
            state = states[i]
            state.token_ids = state.token_ids + tokens
            state.action_turn = state.action_turn + [turn] * len(tokens)
            state.messages.append(("assistant", self.tokenizer.decode(tokens, skip_special_tokens=True).strip()))
            state.turn_mask[turn] = True
        return actions

    def _score(self, states, live, turn: int) -> None:
        requests = [JudgeRequest(states[i].context, states[i].messages[:-1], states[i].messages[-1][1], turn)
                    for i in live]
        started = time.perf_counter()
        scores = self.judge.score(requests)
        self.stats.judge_seconds += time.perf_counter() - started
        for i, score in zip(live, scores):
            if not 0.0 <= float(score) <= 1.0:
                raise ValueError(f"{type(self.judge).__name__} returned reward {score}, outside [0, 1]")
            states[i].rewards[turn] = float(score)

    def _user_turn(self, states, live, turn: int) -> list[str | None]:
        started = time.perf_counter()
        replies = self.user.respond([states[i].context for i in live], [states[i].messages for i in live], turn)
        self.stats.user_seconds += time.perf_counter() - started
        return replies

    def _close_turn(self, states, live, actions, replies) -> dict[int, list[int]]:
        """Append each turn's closing and the user's reply; returns the tokens added per row."""
        stops = set(stop_token_ids(self.tokenizer))
        additions = {}
        for i, tokens, reply in zip(live, actions, replies):
            state = states[i]
            stop_text = self.tokenizer.decode(tokens[-1:]) if tokens and tokens[-1] in stops else None
            piece = self.segments.after_agent(reply, stop_text)
            state.token_ids = state.token_ids + piece
            state.action_turn = state.action_turn + [-1] * len(piece)
            additions[i] = piece
            if reply is not None:
                self.stats.user_tokens += len(self.segments.encode(reply))
                state.messages.append(("user", reply))
        return additions

def rollout_from_messages(tokenizer, context: Context, messages: list[tuple[str, str]],
                          rewards: list[float], turn_mask: list[bool] | None = None,
                          group_id: int = 0) -> Rollout:
    """Rebuild a rollout's tokens from logged texts, each agent line closed by the stop token."""
    roles = [role for role, _ in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(messages))]
    if roles != expected:
        raise ValueError("messages must alternate user/assistant starting with the user")
    agent_lines = [text for role, text in messages if role == "assistant"]
    if len(agent_lines) > len(rewards):
        raise ValueError(f"{len(agent_lines)} agent turns but {len(rewards)} rewards")
    turn_mask = list(turn_mask) if turn_mask is not None else [i < len(agent_lines) for i in range(len(rewards))]
    segments = ChatTemplateSegments(tokenizer)
    stop = stop_token_ids(tokenizer)[0]
    stop_text = tokenizer.decode([stop])
    tokens = segments.opening(context)
    turns = [-1] * len(tokens)
    for turn, line in enumerate(agent_lines):
        action = segments.encode(line) + [stop]
        reply_index = 2 * turn + 2
        reply = messages[reply_index][1] if reply_index < len(messages) else None
        piece = segments.after_agent(reply, stop_text)
        tokens += action + piece
        turns += [turn] * len(action) + [-1] * len(piece)
    return Rollout(context=context, group_id=group_id, token_ids=tokens, action_turn=turns,
                   rewards=[float(r) for r in rewards], turn_mask=turn_mask, messages=list(messages))
