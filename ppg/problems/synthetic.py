"""Synthetic problems whose best policy class is known by construction.

Each reward is a pure function of the ``JudgeRequest`` (surface features of the agent's lines,
plus deterministic hashed noise), in [0, 1], chosen so that a 135M instruct model with LoRA can
shift it quickly on CPU. The users are scripted (``user_lines``), so no user model is needed.

Features (``feature=``), each scoring one agent line of ``n`` words:

- ``"question"``: 1 if the line contains ``?``, else 0 (the 135M model asks in about a fifth
  of its first replies, so there is room to move both ways);
- ``"short"``: 1 for 1..``words`` words, then ``words / n`` (graded even at the length cap,
  where sampled replies pile up), 0 for an empty line;
- ``"long"``: ``min(1, n / words)``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

from ppg.judges.base import Judge, JudgeRequest
from ppg.problems.base import Context, Problem
from ppg.problems.persona_chat import held_out

# Mentions brevity and questions without asking for them, so sampled replies vary in both
# (SmolLM2-135M, temperature 1, 48 new tokens: ~19% ask a question, 6 to ~45 words), so the
# rewards can move either way.
SYSTEM_PROMPT = ("You are a friendly assistant chatting with a user. Keep replies short, and feel "
                 "free to ask the user questions too.")

# Openings of the scripted conversations; every fifth one is held out for evaluation.
TOPICS = (
    "What's a good way to spend a rainy Sunday?",
    "I'm thinking about learning to cook. Where should I start?",
    "What do you think makes a good friend?",
    "Can you recommend a hobby that doesn't cost much?",
    "How do people stay motivated when they exercise?",
    "I have a job interview tomorrow. Any advice?",
    "What's the best way to learn a new language?",
    "Why do cats like to sit in boxes?",
    "How should I plan a small birthday party?",
    "What's something interesting about the ocean?",
    "I can't decide between a dog and a cat. Thoughts?",
    "How do I get better at waking up early?",
    "What should I pack for a weekend camping trip?",
    "Why is the sky blue?",
    "How can I keep my houseplants alive?",
    "What makes a story worth reading?",
    "How do I start saving money?",
    "What's a fun thing to do with kids on a weekend?",
    "How do I make a good cup of coffee at home?",
    "What's the point of learning history?",
)
FOLLOW_UPS = (
    "Interesting. Can you tell me more?",
    "Why do you think that is?",
    "Okay. What else should I know?",
    "Hmm, I'm not sure I agree. Why?",
    "That makes sense. Anything else?",
    "Could you give me an example?",
    "What would you do in my place?",
    "Thanks. Is there a downside?",
)


def word_count(line: str) -> int:
    return len(re.findall(r"[\w']+", line))


def feature_scorer(feature: str, words: int) -> Callable[[str], float]:
    """The line -> [0, 1] scorer named by ``feature`` (see the module docstring)."""
    if feature == "long":
        return lambda line: min(1.0, word_count(line) / words)
    if feature == "short":
        return lambda line: min(1.0, words / word_count(line)) if word_count(line) else 0.0
    if feature == "question":
        return lambda line: float("?" in line)
    raise ValueError(f"feature must be 'long', 'short' or 'question', got feature={feature!r}")


def hashed_uniform(*parts) -> float:
    """A deterministic pseudo-uniform number in [0, 1) from its arguments."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check(owner: str, name: str, value, low, high, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ValueError(f"{owner}: {name} must be {'an int' if integer else 'a number'} in "
                         f"[{low}, {high}], got {name}={value!r}")
    return value


def _line_at(request: JudgeRequest, turn: int) -> str:
    lines = request.agent_lines
    if len(lines) != request.turn + 1:
        raise ValueError(f"request for turn {request.turn} has {len(lines)} agent lines "
                         f"(expected {request.turn + 1}): history incomplete")
    return lines[turn]


class SyntheticJudge(Judge):
    """Base: ``reward(request)`` per request; ``score`` maps it over a batch."""

    def reward(self, request: JudgeRequest) -> float:
        raise NotImplementedError

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        return [self.reward(request) for request in requests]


class DelayedPayoffJudge(SyntheticJudge):
    """Turn 0 pays ``0.5 + cost * (1 - x)``, middle turns 0.5, the last turn ``x``,
    where ``x = feature(a_0)``."""

    def __init__(self, n_turns: int = 3, cost: float = 0.25, feature: str = "question",
                 words: int = 25):
        owner = type(self).__name__
        self.n_turns = _check(owner, "n_turns", n_turns, 2, 64, integer=True)
        self.cost = _check(owner, "cost", cost, 0.0, 0.5)
        if cost == 0:
            raise ValueError(f"{owner}: cost must be > 0 (otherwise greedy has no wrong way)")
        self.feature = feature_scorer(feature, _check(owner, "words", words, 1, 1000, True))

    def reward(self, request):
        x = self.feature(_line_at(request, 0))
        if request.turn == 0:
            return 0.5 + self.cost * (1.0 - x)
        return x if request.turn == self.n_turns - 1 else 0.5


class NoisyIndependentJudge(SyntheticJudge):
    """``(1 - noise) * feature(a_t) + noise * u``, u pseudo-uniform in [0, 1) hashed from
    (seed, context id, turn, line)."""

    def __init__(self, noise: float = 0.5, feature: str = "short", words: int = 10,
                 seed: int = 0):
        owner = type(self).__name__
        self.noise = _check(owner, "noise", noise, 0.0, 1.0)
        self.feature = feature_scorer(feature, _check(owner, "words", words, 1, 1000, True))
        self.seed = seed

    def reward(self, request):
        signal = self.feature(_line_at(request, request.turn))
        u = hashed_uniform(self.seed, request.context.context_id, request.turn, request.line)
        return (1.0 - self.noise) * signal + self.noise * u


class BlockStructuredJudge(SyntheticJudge):
    """Blocks of ``block_length`` turns; inside a block the first turn pays
    ``0.5 + cost * (1 - x)`` and the later ones ``x`` (x = feature of the block's first line),
    each mixed with hashed noise as in ``NoisyIndependentJudge``."""

    def __init__(self, block_length: int = 3, cost: float = 0.25, noise: float = 0.3,
                 feature: str = "question", words: int = 25, seed: int = 0):
        owner = type(self).__name__
        self.block_length = _check(owner, "block_length", block_length, 2, 64, integer=True)
        self.cost = _check(owner, "cost", cost, 0.0, 0.5)
        if cost == 0:
            raise ValueError(f"{owner}: cost must be > 0 (otherwise greedy has no wrong way)")
        self.noise = _check(owner, "noise", noise, 0.0, 1.0)
        self.feature = feature_scorer(feature, _check(owner, "words", words, 1, 1000, True))
        self.seed = seed

    def reward(self, request):
        start = request.turn - request.turn % self.block_length
        x = self.feature(_line_at(request, start))
        clean = 0.5 + self.cost * (1.0 - x) if request.turn == start else x
        u = hashed_uniform(self.seed, request.context.context_id, request.turn, request.line)
        return (1.0 - self.noise) * clean + self.noise * u


class LaggedPayoffJudge(SyntheticJudge):
    """``r_t = (1 - noise) * (cost * (1 - x_t) + payoff * x_{t-delay}) + noise * u_t`` with
    ``x_t = feature(a_t)`` (the payoff term is 0 for ``t < delay``) and u pseudo-uniform in
    [0, 1) hashed from (seed, context id, turn, line)."""

    def __init__(self, delay: int = 1, cost: float = 0.25, payoff: float = 0.75,
                 noise: float = 0.5, feature: str = "question", words: int = 25, seed: int = 0):
        owner = type(self).__name__
        self.delay = _check(owner, "delay", delay, 1, 63, integer=True)
        self.cost = _check(owner, "cost", cost, 0.0, 1.0)
        if cost == 0:
            raise ValueError(f"{owner}: cost must be > 0 (otherwise greedy has no wrong way)")
        self.payoff = _check(owner, "payoff", payoff, 0.0, 1.0 - cost)
        self.noise = _check(owner, "noise", noise, 0.0, 1.0)
        self.feature = feature_scorer(feature, _check(owner, "words", words, 1, 1000, True))
        self.seed = seed

    def reward(self, request):
        turn = request.turn
        clean = self.cost * (1.0 - self.feature(_line_at(request, turn)))
        if turn >= self.delay:
            clean += self.payoff * self.feature(request.agent_lines[turn - self.delay])
        u = hashed_uniform(self.seed, request.context.context_id, turn, request.line)
        return (1.0 - self.noise) * clean + self.noise * u


class SyntheticProblem(Problem):
    """Scripted conversations over ``TOPICS``; subclasses set the judge and the script."""

    prefix = "synthetic"

    def __init__(self, n_turns: int):
        self.n_turns = _check(type(self).__name__, "n_turns", n_turns, 2, 64, integer=True)

    def user_lines(self, index: int) -> list[str]:
        """The scripted user's replies after agent turns 0 .. n-1 (follow-ups, rotated)."""
        return [FOLLOW_UPS[(index + t) % len(FOLLOW_UPS)] for t in range(self.n_turns)]

    def all_contexts(self, split: str) -> list[Context]:
        test = held_out(split)
        return [
            Context(context_id=f"{self.prefix}-{i:02d}", agent_system_prompt=SYSTEM_PROMPT,
                    user_system_prompt="You are a curious user asking an assistant for ideas.",
                    opening=topic, user_lines=self.user_lines(i), meta={"problem": self.prefix})
            for i, topic in enumerate(TOPICS) if (i % 5 == 4) == test
        ]


class DelayedPayoff(SyntheticProblem):
    """An early commitment that costs a little now and pays only at the last turn.

    With x = feature(a_0) in [0, 1] (default: the first reply asks a question), r_0 =
    0.5 + cost*(1 - x), r_1..r_{n-2} = 0.5, r_{n-1} = x. Greedy and any K-step with K < n see
    only d(credit_0)/dx = -cost and learn NOT to ask at turn 0; full planning (or K >= n) sees
    1 - cost > 0 and learns to ASK. With the defaults (n=3, cost=0.25), turn-0 credit for
    no-question/question is 0.75/0.50 under greedy and 1.25/2.00 under full: they disagree,
    and full's choice earns 0.75 more per conversation.
    """

    prefix = "delayed"

    def __init__(self, n_turns: int = 3, cost: float = 0.25, feature: str = "question",
                 words: int = 25):
        super().__init__(n_turns)
        self.judge_args = {"n_turns": n_turns, "cost": cost, "feature": feature, "words": words}
        self.default_judge()  # validate the arguments now

    def default_judge(self):
        return DelayedPayoffJudge(**self.judge_args)


class NoisyIndependent(SyntheticProblem):
    """Each turn's reward depends only on that turn's line, plus heavy zero-mean noise.

    r_t = (1 - noise)*feature(a_t) + noise*u_t (default: replies of at most 10 words). All
    classes share the optimum, but full planning credits a_t with the noise of every later
    turn (the noise part of its credit has n - t times greedy's variance), so greedy learns
    the same thing from fewer samples.
    """

    prefix = "noisy"

    def __init__(self, n_turns: int = 6, noise: float = 0.5, feature: str = "short",
                 words: int = 10, seed: int = 0):
        super().__init__(n_turns)
        self.judge_args = {"noise": noise, "feature": feature, "words": words, "seed": seed}
        self.default_judge()

    def default_judge(self):
        return NoisyIndependentJudge(**self.judge_args)


class BlockStructured(SyntheticProblem):
    """Independent blocks of ``block_length`` turns, each a small delayed payoff.

    Inside a block starting at s, r_s = 0.5 + cost*(1 - x) and r_{s+1..} = x with x =
    feature(a_s) (default: the block's first reply asks a question), each mixed with hashed
    noise; nothing crosses a block boundary. Greedy sees only the cost and learns the wrong
    first line; ``Segment(length=block_length)`` credits exactly the block's rewards; full
    planning has the same expectation as Segment but adds the later blocks' noise (and their
    policy randomness) to the credit. With the defaults (block 3, noise 0), turn-0 credit for
    no-question/question is 0.75/0.50 under greedy and 0.75/2.50 under Segment. The scripted
    user opens a new topic at every block start.
    """

    prefix = "block"

    def __init__(self, n_turns: int = 6, block_length: int = 3, cost: float = 0.25,
                 noise: float = 0.3, feature: str = "question", words: int = 25, seed: int = 0):
        super().__init__(n_turns)
        if not isinstance(block_length, int) or not 2 <= block_length <= n_turns:
            raise ValueError(f"BlockStructured: block_length must be an int in [2, n_turns="
                             f"{n_turns}], got block_length={block_length!r}")
        self.block_length = block_length
        self.judge_args = {"block_length": block_length, "cost": cost, "noise": noise,
                           "feature": feature, "words": words, "seed": seed}
        self.default_judge()

    def user_lines(self, index):
        lines = super().user_lines(index)
        for t in range(self.block_length - 1, self.n_turns, self.block_length):
            # This reply precedes a block's first turn. Stepping by 5 through the 20 topics
            # keeps index % 5, so train contexts never quote a held-out topic.
            block = (t + 1) // self.block_length
            lines[t] = "New question: " + TOPICS[(index + 5 * block) % len(TOPICS)]
        return lines

    def default_judge(self):
        return BlockStructuredJudge(**self.judge_args)


class LaggedPayoff(SyntheticProblem):
    """Every turn's move costs a little now and pays ``delay`` turns later: K-step's problem.

    With x_t = feature(a_t) (default: reply t asks a question), r_t = (1 - noise) *
    (cost*(1 - x_t) + payoff*x_{t-delay}) + noise*u_t, u_t hashed noise as in
    ``NoisyIndependent``; a payoff due at or after turn n is lost. Greedy credits a_t with
    -cost per question and learns not to ask. ``KStepLookahead(delay + 1)`` sees the payoff:
    its expected gradient equals full planning's, but its credit sums delay + 1 rewards where
    full's sums n - t, and every added reward brings its hashed noise and the randomness of a
    later turn's own question. So K = delay + 1 should learn to ask fastest.

    On paper (one shared ask probability p; this is ``ppg.theory.DelayedAsk`` with cost and
    payoff scaled by 1 - noise and sigma = noise / sqrt(12)): with the defaults (n=6, delay 1,
    cost 0.25, payoff 0.75, noise 0.5) at p = 0.1, the expected gradient is -0.068 (greedy)
    and +0.101 (k2 and full); the leave-one-out variance per rollout 0.029 / 0.052 / 0.095, so
    a batch of 16 has SNR 2.6 / 3.2 / 1.7, and the credit variance summed over turns (the
    noise an LLM's high-dimensional gradient multiplies) 0.20 / 0.33 / 0.59 (docs/problems.md).
    """

    prefix = "lagged"

    def __init__(self, n_turns: int = 6, delay: int = 1, cost: float = 0.25,
                 payoff: float = 0.75, noise: float = 0.5, feature: str = "question",
                 words: int = 25, seed: int = 0):
        super().__init__(n_turns)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 1 <= delay < n_turns:
            raise ValueError(f"LaggedPayoff: delay must be an int in [1, n_turns - 1 = "
                             f"{n_turns - 1}], got delay={delay!r}")
        self.delay = delay
        self.judge_args = {"delay": delay, "cost": cost, "payoff": payoff, "noise": noise,
                           "feature": feature, "words": words, "seed": seed}
        self.default_judge()

    def default_judge(self):
        return LaggedPayoffJudge(**self.judge_args)
