"""The rollout engine: a batch of conversations advanced turn by turn, then scored.

The policy sees each conversation through its chat template. Token ids are built piece by
piece, the agent's sampled tokens kept verbatim, so the action mask marks exactly the tokens the
policy produced (never prompt, user or padding tokens) and no re-tokenization can shift them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ppg.judges.base import Judge
from ppg.models.cpu.memory import trim_heap
from ppg.rollout.batch import Rollout
from ppg.rollout.samplers.base import SampledTurn, Sampler, Sampling, stop_token_ids
from ppg.rollout.samplers.hf import HFSampler
from ppg.rollout.users import ScriptedUser, UserSimulator
from ppg.types import Context, JudgeRequest, check_n_turns

_MARK = "\x00PPG-TURN\x00"


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
    that would exceed ``max_context_tokens``, leave the generation batch and their later turns
    are masked. The ``sampler`` (default: ``HFSampler`` on the policy) produces the agent's
    tokens and their log-probs; with ``reuse_cache`` it may keep per-conversation state between
    turns (the HF sampler's KV cache: each turn encodes only the new user reply). A judge with
    ``needs_reply`` scores turn t after the user's answer to it.
    """

    def __init__(self, policy, tokenizer, judge: Judge, user: UserSimulator | None = None,
                 n_turns: int = 4, sampling: Sampling | None = None, group_size: int = 4,
                 batch_size: int = 32, max_context_tokens: int = 2048, progress: bool = True,
                 reuse_cache: bool = True, sampler: Sampler | None = None):
        check_n_turns("RolloutEngine", n_turns)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.policy, self.tokenizer, self.judge = policy, tokenizer, judge
        self.user = user or ScriptedUser()
        self.user.bind(policy, tokenizer)
        self.sampler = sampler or HFSampler()
        self.sampler.bind(policy, tokenizer)
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
            self.sampler.reset()
            self.user.reset()  # a model user's cache is not needed until the next phase
            # The KV caches of a rollout phase are large and short-lived; they are freed by
            # reference counting (no cycles, tested), so no garbage collection is needed.
            trim_heap(collect=False)
        return rollouts

    def _run_chunk(self, jobs, bar) -> list[Rollout]:
        n = self.n_turns
        states = [Rollout(context=c, group_id=g, token_ids=[], action_turn=[], rewards=[0.0] * n,
                          turn_mask=[False] * n, messages=[("user", c.opening)]) for c, g in jobs]
        for state in states:
            state.token_ids = self.segments.opening(state.context)
            state.action_turn = [-1] * len(state.token_ids)
            state.sampler_logprobs = [0.0] * len(state.token_ids)
        self.sampler.reset()
        live = list(range(len(states)))
        try:
            for turn in range(n):
                live = [i for i in live if len(states[i].token_ids) + self.sampling.max_new_tokens
                        <= self.max_context_tokens]
                if not live:
                    bar.update(n - turn)
                    break
                actions = self._agent_turn(states, live, turn)
                if getattr(self.judge, "needs_reply", False):
                    replies = self._user_turn(states, live, turn) if turn < n - 1 else [None] * len(live)
                    self._score(states, live, turn, replies)
                else:
                    self._score(states, live, turn)
                    replies = self._user_turn(states, live, turn) if turn < n - 1 else [None] * len(live)
                self._close_turn(states, live, actions, replies)
                live = [i for i, reply in zip(live, replies) if reply is not None]
                bar.update(1)
        finally:
            self.sampler.reset()  # frees the sampler's per-conversation state (KV caches)
        return states

    def _agent_turn(self, states, live, turn: int) -> list[SampledTurn]:
        """Sample the agent's tokens for the live conversations and record them verbatim."""
        started = time.perf_counter()
        actions = self.sampler.sample([states[i].token_ids for i in live], self.sampling,
                                      keys=live if self.reuse_cache else None)
        self.stats.agent_seconds += time.perf_counter() - started
        self.stats.agent_tokens += sum(len(a.token_ids) for a in actions)
        for i, action in zip(live, actions):
            state, tokens = states[i], action.token_ids
            if len(action.logprobs) != len(tokens):
                raise ValueError(f"{type(self.sampler).__name__} returned {len(action.logprobs)} "
                                 f"log-probs for {len(tokens)} tokens")
            state.token_ids = state.token_ids + tokens
            state.action_turn = state.action_turn + [turn] * len(tokens)
            state.sampler_logprobs = state.sampler_logprobs + [float(x) for x in action.logprobs]
            state.messages.append(("assistant", self.tokenizer.decode(tokens, skip_special_tokens=True).strip()))
            state.turn_mask[turn] = True
        return actions

    def _score(self, states, live, turn: int, replies: list[str | None] | None = None) -> None:
        replies = replies or [None] * len(live)
        requests = [JudgeRequest(states[i].context, states[i].messages[:-1], states[i].messages[-1][1], turn,
                                 reply=reply) for i, reply in zip(live, replies)]
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

    def _close_turn(self, states, live, actions, replies) -> None:
        """Append each turn's closing and the user's reply (prompt tokens for the next turn)."""
        stops = set(stop_token_ids(self.tokenizer))
        for i, action, reply in zip(live, actions, replies):
            state, tokens = states[i], action.token_ids
            stop_text = self.tokenizer.decode(tokens[-1:]) if tokens and tokens[-1] in stops else None
            piece = self.segments.after_agent(reply, stop_text)
            state.token_ids = state.token_ids + piece
            state.action_turn = state.action_turn + [-1] * len(piece)
            state.sampler_logprobs = state.sampler_logprobs + [0.0] * len(piece)
            if reply is not None:
                self.stats.user_tokens += len(self.segments.encode(reply))
                state.messages.append(("user", reply))


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
