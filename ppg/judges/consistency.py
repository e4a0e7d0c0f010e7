"""Persona-consistency judges: prompt-to-line, line-to-line and Q&A consistency.

The three metrics of the persona-simulation literature (Abdulhai et al. 2025, "Consistently
Simulating Human Personas with Multi-Turn Reinforcement Learning"), as per-turn rewards in
[0, 1]. The definitions follow that work; the prompts are written for ppg. Each judge asks a
judge model through a backend (``LocalBackend``: an HF causal LM, logits; ``OpenAIBackend``:
any OpenAI-compatible endpoint). See docs/judges.md for the exact definitions.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from ppg.clients import ReplyError
from ppg.judges.backends import JudgeBackend, JudgeError, LocalBackend
from ppg.judges.base import Judge, JudgeRequest
from ppg.judges.lm import check_template
from ppg.types import Context

__all__ = ["ConsistencyJudge", "LineToLineJudge", "PromptToLineJudge", "QAConsistencyJudge"]

SYSTEM = "You check role-play transcripts for consistency. Answer with one word: yes or no."
PARSE_POLICIES = ("raise", "nan")

PROMPT_TO_LINE = (
    "A speaker is playing this character:\n{persona}\n\n"
    "Their conversation partner said: \"{previous}\"\n"
    "The speaker replied: \"{line}\"\n\n"
    "Does the reply contradict the character description? New details that do not conflict "
    "with the description are not contradictions. Answer yes or no."
)
LINE_TO_LINE = (
    "In this conversation, every line marked Speaker is said by the same person.\n\n"
    "{history}\n\n"
    "The speaker's newest line: \"{line}\"\n\n"
    "Does the newest line contradict something the speaker said in an earlier line (a "
    "different name, age, job, family, place, event, plan or opinion)? Changing the subject "
    "or adding new details is not a contradiction. Answer yes or no."
)
QUESTIONS = (
    "Here is a description of a person:\n{persona}\n\n"
    "Write {count} short questions about this person that the description answers (their "
    "background, life, habits or views). One question per line, nothing else."
)
REFERENCE = (
    "Here is a description of a person:\n{persona}\n\n"
    "Answer this question as that person would, in one short sentence, using only the "
    "description: {question}"
)
ASK = "(A quick question outside our conversation; answer in one short sentence as yourself.) {question}"
GRADE = (
    "Question to a person: {question}\n"
    "The answer their description gives: \"{reference}\"\n"
    "The answer they gave: \"{answer}\"\n\n"
    "Does the answer they gave agree with the answer from the description? The same "
    "information in other words agrees. Answer yes or no."
)


def persona_text(context: Context) -> str:
    """The persona as "- fact" lines (the agent's system prompt when there are no facts)."""
    if context.persona:
        return "\n".join(f"- {fact}" for fact in context.persona)
    return context.agent_system_prompt or "(none given)"


def transcript(history: Sequence[tuple[str, str]]) -> str:
    """Numbered lines, the agent as "Speaker" and the user as "Partner"."""
    names = {"assistant": "Speaker", "user": "Partner"}
    return "\n".join(f"{i + 1}. {names.get(role, role)}: {text}" for i, (role, text) in enumerate(history))


def parse_questions(text: str, count: int) -> list[str]:
    """Up to ``count`` distinct questions, one per line (numbering and bullets dropped);
    ``ReplyError`` if the text holds none."""
    questions = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\(?\d{1,2}[.):])\s*", "", line).strip()
        if "?" in line:
            question = line[:line.index("?") + 1].strip()
            if len(question) > 1 and question not in questions:
                questions.append(question)
    if not questions:
        raise ReplyError("no question (a line with '?') in the reply")
    return questions[:count]


class ConsistencyJudge(Judge):
    """Base of the consistency judges: a backend and what to do with unreadable verdicts.

    ``backend`` defaults to ``LocalBackend()`` (the embedded model). A verdict the judge model
    never gave in a readable form (after the backend's retries) is counted in
    ``stats["parse_failures"]`` (every failed attempt) and ``stats["unscored"]`` (items left
    without a verdict), and then ``on_parse_failure="raise"`` (default) raises ``JudgeError``
    and ``"nan"`` gives the reward NaN (for evaluation, which leaves NaN turns out of its means
    and reports how many; the rollout engine refuses NaN rewards). Never a default value.
    """

    metric = ""

    def __init__(self, backend: JudgeBackend | None = None, on_parse_failure: str = "raise"):
        if on_parse_failure not in PARSE_POLICIES:
            raise ValueError(f"on_parse_failure must be one of {', '.join(PARSE_POLICIES)}, "
                             f"got {on_parse_failure!r}")
        self.backend = backend if backend is not None else LocalBackend()
        self.on_parse_failure = on_parse_failure
        self.unscored = 0

    @property
    def stats(self) -> dict:
        """The backend's counters plus ``unscored`` (items that got no verdict)."""
        return {**self.backend.stats, "unscored": self.unscored}

    @property
    def parse_failures(self) -> int:
        return self.backend.stats["parse_failures"]

    def _unscored(self, missing: int, total: int, what: str) -> None:
        if missing:
            self.unscored += missing
            if self.on_parse_failure == "raise":
                raise JudgeError(f"{type(self).__name__}: {missing} of {total} {what} got no "
                                 f"readable verdict ({self.parse_failures} parse failures so far); "
                                 "set on_parse_failure: nan to leave them out instead")

    def _checked(self, values: list[float | None], what: str) -> list[float]:
        self._unscored(sum(v is None for v in values), len(values), what)
        return [math.nan if v is None else float(v) for v in values]


class PromptToLineJudge(ConsistencyJudge):
    """Prompt-to-line consistency: r_t = P(no) for "does line t contradict the persona?".

    The judge model sees the persona (facts, or the agent's system prompt), the partner's last
    line and the agent's line; the reward is 1 - P(yes) / (P(yes) + P(no)).
    """

    metric = "prompt_to_line"

    def __init__(self, backend: JudgeBackend | None = None, on_parse_failure: str = "raise",
                 question: str = PROMPT_TO_LINE):
        super().__init__(backend, on_parse_failure)
        self.question = check_template(question, "question", ("persona", "previous", "line"))

    def prompt(self, request: JudgeRequest) -> list[dict]:
        previous = next((text for role, text in reversed(request.history) if role == "user"), "")
        content = self.question.format(persona=persona_text(request.context), previous=previous,
                                       line=request.line)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        p_yes = self.backend.yes_probability([self.prompt(r) for r in requests])
        return self._checked([None if p is None else 1.0 - p for p in p_yes], "lines")


class LineToLineJudge(ConsistencyJudge):
    """Line-to-line consistency: r_t = P(no) for "does line t contradict the agent's own earlier
    lines in this conversation?".

    The judge model sees the whole conversation before the line (both sides, numbered). A line
    with no earlier agent line (turn 0) has nothing to contradict: r = 1 by definition, and the
    judge model is not asked.
    """

    metric = "line_to_line"

    def __init__(self, backend: JudgeBackend | None = None, on_parse_failure: str = "raise",
                 question: str = LINE_TO_LINE):
        super().__init__(backend, on_parse_failure)
        self.question = check_template(question, "question", ("history", "line"))

    def prompt(self, request: JudgeRequest) -> list[dict]:
        content = self.question.format(history=transcript(request.history), line=request.line)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        asked = [i for i, r in enumerate(requests) if any(role == "assistant" for role, _ in r.history)]
        p_yes = self.backend.yes_probability([self.prompt(requests[i]) for i in asked])
        rewards: list[float | None] = [1.0] * len(requests)
        for i, p in zip(asked, p_yes):
            rewards[i] = None if p is None else 1.0 - p
        return self._checked(rewards, "lines")


class QAConsistencyJudge(ConsistencyJudge):
    """Q&A consistency: the fraction of persona questions answered in agreement with the persona
    after the conversation so far.

    Once per persona (cached in memory; an ``OpenAIBackend`` with ``cache_dir`` also on disk)
    the judge model writes ``n_questions`` questions about the persona and their reference
    answers from the persona alone. At agent turn t the judge model then plays the agent — the
    agent's own system prompt and the conversation through line t — and answers each question
    in character; a yes/no grade asks whether that answer agrees with the reference.
    r_t = mean over questions of P(agree). Questions or answers the model never wrote readably,
    and unreadable grades, are parse failures (see ``ConsistencyJudge``); with ``"nan"`` the
    mean is over the graded questions only (NaN if none).
    """

    metric = "qa"

    def __init__(self, backend: JudgeBackend | None = None, on_parse_failure: str = "raise",
                 n_questions: int = 3, answer_tokens: int = 40, question_tokens: int = 120):
        super().__init__(backend, on_parse_failure)
        for key, value in (("n_questions", n_questions), ("answer_tokens", answer_tokens),
                           ("question_tokens", question_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        self.n_questions, self.answer_tokens, self.question_tokens = n_questions, answer_tokens, question_tokens
        self.tests: dict[str, list[tuple[str, str]]] = {}

    @staticmethod
    def persona_key(context: Context) -> str:
        return hashlib.sha256(persona_text(context).encode()).hexdigest()[:16]

    def persona_tests(self, contexts: Sequence[Context]) -> dict[str, list[tuple[str, str]]]:
        """(question, reference answer) pairs per persona key, written once per persona."""
        new = {}
        for context in contexts:
            key = self.persona_key(context)
            if key not in self.tests and key not in new:
                new[key] = persona_text(context)
        if not new:
            return self.tests
        keys = list(new)
        prompts = [[{"role": "user", "content": QUESTIONS.format(persona=new[k], count=self.n_questions)}]
                   for k in keys]
        written = self.backend.generate(prompts, self.question_tokens,
                                        parse=lambda text: parse_questions(text, self.n_questions))
        pairs = [(k, q) for k, questions in zip(keys, written) for q in questions or []]
        references = self.backend.generate(
            [[{"role": "user", "content": REFERENCE.format(persona=new[k], question=q)}] for k, q in pairs],
            self.answer_tokens)
        for key, questions in zip(keys, written):
            if questions is None and self.on_parse_failure == "raise":
                raise JudgeError(f"QAConsistencyJudge: the judge model wrote no readable questions "
                                 f"for a persona ({self.parse_failures} parse failures so far)")
            self.tests[key] = [(q, ref) for (k, q), ref in zip(pairs, references) if k == key]
        return self.tests

    def answer_prompt(self, request: JudgeRequest, question: str) -> list[dict]:
        """The agent's system prompt, the conversation through this line, then the question."""
        messages = [{"role": "system", "content": request.context.agent_system_prompt}]
        messages += [{"role": role, "content": text} for role, text in request.history]
        messages.append({"role": "assistant", "content": request.line})
        messages.append({"role": "user", "content": ASK.format(question=question)})
        return messages

    def score(self, requests: Sequence[JudgeRequest]) -> list[float]:
        tests = self.persona_tests([r.context for r in requests])
        items = [(i, question, reference) for i, r in enumerate(requests)
                 for question, reference in tests[self.persona_key(r.context)]]
        answers = self.backend.generate([self.answer_prompt(requests[i], q) for i, q, _ in items],
                                        self.answer_tokens)
        graded = [(i, q, ref, answer) for (i, q, ref), answer in zip(items, answers)
                  if answer is not None and ref is not None]
        p_agree = self.backend.yes_probability([
            [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": GRADE.format(question=q, reference=ref, answer=answer)}]
            for _, q, ref, answer in graded])
        verdicts: list[list[float]] = [[] for _ in requests]
        for (i, *_), p in zip(graded, p_agree):
            if p is not None:
                verdicts[i].append(p)
        asked = [sum(i == j for j, *_ in items) for i in range(len(requests))]
        missing = sum(max(1, n) - len(row) for n, row in zip(asked, verdicts))
        self._unscored(missing, sum(max(1, n) for n in asked), "questions")
        return [sum(row) / len(row) if row else math.nan for row in verdicts]
