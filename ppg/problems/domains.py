"""Persona-consistency domains written for ppg: education, therapy and open chit-chat.

Modeled on the Consistent-LLMs setup: the agent role-plays a persona (a student, a therapy
client, a person with a biography) against a simulated partner (teacher, therapist, a stranger)
and is rewarded for staying consistent with its persona. The personas live in
``ppg/problems/data/<domain>.jsonl``, one JSON object per line; every fifth persona (index
4, 9, ...) is held out, so train and test contexts never share a persona.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppg.jsonl import read_jsonl
from ppg.problems.base import Context, Problem
from ppg.problems.persona_chat import held_out
from ppg.types import check_n_turns

DATA_DIR = Path(__file__).parent / "data"
TEST_EVERY = 5

_STAY_IN_CHARACTER = ("Stay in character for the whole conversation, reply in 1-2 sentences per "
                      "turn, and never mention being an AI or a language model.")


def _bullets(facts: list[str]) -> str:
    return "\n".join(f"- {fact}" for fact in facts)


def load_personas(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """JSONL records from ``path``; a one-line error names the file, line and missing key."""
    records = []
    for number, record in read_jsonl(path, "persona"):
        missing = [key for key in required if not record.get(key)]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(map(repr, missing))}")
        records.append(record)
    return records


class PersonaDomain(Problem):
    """Contexts from a JSONL persona file; subclasses say how a record becomes prompts.

    ``personas`` overrides the packaged file with your own JSONL (same fields).
    Default judge: ``EmbeddingJudge`` (agent lines vs. ``persona`` facts).
    """

    domain = ""
    required: tuple[str, ...] = ("id", "name", "opening", "user_lines")

    def __init__(self, n_turns: int = 4, personas: str | None = None):
        check_n_turns(type(self).__name__, n_turns)
        self.n_turns = n_turns
        self.path = Path(personas) if personas else DATA_DIR / f"{self.domain}.jsonl"
        self._records: list[dict[str, Any]] | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = load_personas(self.path, self.required)
        return self._records

    def all_contexts(self, split: str) -> list[Context]:
        test = held_out(split)
        return [self.context(record) for index, record in enumerate(self.records)
                if (index % TEST_EVERY == TEST_EVERY - 1) == test]

    def context(self, record: dict[str, Any]) -> Context:
        facts = self.facts(record)
        return Context(
            context_id=record["id"], agent_system_prompt=self.agent_prompt(record, facts),
            user_system_prompt=self.user_prompt(record), opening=record["opening"],
            persona=facts, user_lines=list(record["user_lines"]),
            meta={"domain": self.domain, **record},
        )

    def facts(self, record: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def agent_prompt(self, record: dict[str, Any], facts: list[str]) -> str:
        raise NotImplementedError

    def user_prompt(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    def default_judge(self):
        from ppg.judges.embedding import EmbeddingJudge

        return EmbeddingJudge()


class Education(PersonaDomain):
    """The agent is a student (grade, learning style, topic, traits) tutored by a teacher."""

    domain = "education"
    required = PersonaDomain.required + ("grade", "subject", "topic", "learning_style", "traits")

    def facts(self, record):
        return [f"My name is {record['name']} and I'm in {record['grade']}.",
                f"In {record['subject']} we're working on {record['topic']}.",
                record["learning_style"], *record["traits"]]

    def agent_prompt(self, record, facts):
        return (f"You are role-playing {record['name']}, a {record['grade']} student, in a "
                f"{record['subject']} lesson with your teacher. About you:\n{_bullets(facts)}\n"
                "Answer the way this student really would, with their knowledge gaps, habits "
                f"and interests. {_STAY_IN_CHARACTER}")

    def user_prompt(self, record):
        return (f"You are a patient, encouraging {record['subject']} teacher tutoring "
                f"{record['name']}, a {record['grade']} student, on {record['topic']}. Teach "
                "through questions, one small step at a time. Reply in 1-2 sentences and end "
                "with a question for the student.")


class Therapy(PersonaDomain):
    """The agent is a therapy client (presenting problem, defensive habit, background)."""

    domain = "therapy"
    required = PersonaDomain.required + ("age", "problem", "defense", "background")

    def facts(self, record):
        return [f"My name is {record['name']} and I'm {record['age']} years old.",
                record["problem"], record["defense"], *record["background"]]

    def agent_prompt(self, record, facts):
        return (f"You are role-playing {record['name']}, a client in a session with a "
                f"therapist. About you:\n{_bullets(facts)}\nLet your defensive habit show the "
                "way it naturally would and don't resolve your problem all at once. "
                f"{_STAY_IN_CHARACTER}")

    def user_prompt(self, record):
        return (f"You are a warm, experienced therapist in a session with {record['name']}, "
                f"age {record['age']}. Listen, reflect feelings and ask one open question at a "
                "time; don't diagnose or lecture. Reply in 1-2 sentences.")


class Chatting(PersonaDomain):
    """Open chit-chat: the agent is a person with a biography meeting a stranger (the user)."""

    domain = "chatting"
    required = PersonaDomain.required + ("bio", "partner")

    def facts(self, record):
        return [f"My name is {record['name']}.", *record["bio"]]

    def agent_prompt(self, record, facts):
        partner = record["partner"]["name"]
        return (f"You are {record['name']}, chatting casually with {partner}, someone you just "
                f"met. About you:\n{_bullets(facts)}\nShare about your life when it fits. "
                f"{_STAY_IN_CHARACTER}")

    def user_prompt(self, record):
        partner = record["partner"]
        return (f"You are {partner['name']}, chatting casually with {record['name']}, someone "
                f"you just met. About you:\n{_bullets(partner['bio'])}\nBe friendly, share "
                "about yourself and ask about their life. Reply in 1-2 sentences.")
