"""Synthetic-Persona-Chat: the agent keeps a PersonaChat persona while meeting a stranger.

Data: Jandaghi et al. 2023, "Faithful Persona-based Conversational Dataset Generation with Large
Language Models", arXiv:2312.10007 (google-research-datasets/Synthetic-Persona-Chat), licensed
CC BY 4.0. The CSV files are not shipped with ppg; point ``data_dir`` (or ``$PPG_DATA_DIR``) at
the folder that holds ``Synthetic-Persona-Chat_<split>.csv``.
"""

from __future__ import annotations

import csv
import os
import random
import re
import sys
from pathlib import Path

from ppg.problems.base import Context, Problem
from ppg.types import check_n_turns

COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
TRAIN_SPLITS = ("train",)
HELD_OUT_SPLITS = ("test", "validation", "val", "valid")
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "synthetic_persona_chat"

NAMES = (
    "Maya", "Daniel", "Priya", "Lucas", "Amara", "Jonah", "Sofia", "Mateo", "Hannah", "Kenji",
    "Leila", "Owen", "Chloe", "Tariq", "Grace", "Diego", "Nora", "Samuel", "Ines", "Malik",
    "Emily", "Ravi", "Zoe", "Marcus", "Aisha", "Felix", "Camila", "Theo", "Yuki", "Isaac",
    "Rosa", "Elijah", "Mei", "Gabriel", "Fatima", "Noah", "Clara", "Kofi", "Lena", "Andre",
)
# Filler for the few non-name placeholders ("[city]", "[user 1's hometown]", "[team]", ...).
FILLERS = (
    ("hometown", "Springfield"), ("city", "Portland"), ("town", "Springfield"),
    ("location", "Portland"), ("place", "the park"), ("state", "Oregon"), ("country", "Canada"),
    ("universit", "the state university"), ("college", "the community college"),
    ("school", "the high school"), ("team", "the Tigers"), ("job", "nurse"),
)
FALLBACK_USER_LINES = (
    "So tell me a bit about yourself.", "That's cool. What do you do for fun?",
    "Nice! What's something you're looking forward to?", "It was great chatting with you.",
)

_SPEAKER = re.compile(r"^[\s*]*user\s*([12])\s*:\s*", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[([^\[\]\n]{1,60})\]")
_USER_REF = re.compile(r"user\s*_?([12])", re.IGNORECASE)
_BARE_USER = re.compile(r"\buser\s?([12])\b(?!\s*:)", re.IGNORECASE)
_SELF_INTRO = re.compile(r"(i'm|i am|name is|name's|call me|this is|it's)\s*$", re.IGNORECASE)
_rows_cache: dict[str, list[dict[str, str]]] = {}


def held_out(split: str) -> bool:
    """``False`` for the training split, ``True`` for a held-out one; shared by all problems."""
    if split in TRAIN_SPLITS:
        return False
    if split in HELD_OUT_SPLITS:
        return True
    raise ValueError(f"unknown split {split!r}; use 'train' or one of {', '.join(HELD_OUT_SPLITS)}")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$PPG_DATA_DIR`` (or its ``synthetic_persona_chat/`` folder), else
    ``../shared/data/synthetic_persona_chat`` relative to the working directory."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("PPG_DATA_DIR")
    if env:
        root = Path(env).expanduser()
        nested = root / "synthetic_persona_chat"
        return nested if nested.is_dir() else root
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    raise FileNotFoundError(
        f"Synthetic-Persona-Chat data not found at {DEFAULT_DATA_DIR.resolve()}; "
        "set data_dir (problem init_args) or $PPG_DATA_DIR to the folder holding the CSV files")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV rows at ``path`` (cached per path), checked for the expected columns."""
    key = str(path.resolve())
    if key in _rows_cache:
        return _rows_cache[key]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; set data_dir (problem init_args) or $PPG_DATA_DIR to the "
            "folder holding Synthetic-Persona-Chat_<split>.csv")
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in COLUMNS:
            if column not in header:
                raise ValueError(f"{path}: missing column {column!r} (found {header})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    _rows_cache[key] = rows
    return rows


def _facts(cell: str) -> list[str]:
    return [line.strip() for line in cell.splitlines() if line.strip()]


def _is_stage_direction(line: str) -> bool:
    """Narration such as ``[Later]``, ``(They walk together.)`` or ``* * *``."""
    text = line.strip().rstrip(".")
    if not text.strip("*-_ "):
        return True
    return (text[0] in "[(" and text[-1] in "])") or (text[0] == "[" and "]" not in text)


def split_turns(conversation: str) -> list[tuple[int, str]]:
    """``[(speaker 1|2, utterance), ...]`` with prefixes removed and same-speaker runs merged.

    Unprefixed lines continue the previous utterance; text before the first prefix is User 1's
    if User 2 speaks first; a conversation without any prefix alternates by paragraph.
    """
    lines = [line for line in conversation.splitlines() if not _is_stage_direction(line)]
    turns: list[list] = []
    if not any(_SPEAKER.match(line) for line in lines):
        paragraphs = [p for p in re.split(r"\n\s*\n", conversation) if not _is_stage_direction(p)]
        turns = [[1 + i % 2, p] for i, p in enumerate(paragraphs)]
    else:
        preamble: list[str] = []
        for line in lines:
            match = _SPEAKER.match(line)
            if match:
                turns.append([int(match.group(1)), line[match.end():]])
            elif turns:
                turns[-1][1] += " " + line
            else:
                preamble.append(line)
        if preamble and turns[0][0] == 2:
            turns.insert(0, [1, " ".join(preamble)])
    merged: list[tuple[int, str]] = []
    for speaker, text in turns:
        text = " ".join(text.split())
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, merged[-1][1] + " " + text)
        else:
            merged.append((speaker, text))
    return merged


def fill_placeholders(text: str, speaker: int, names: dict[int, str]) -> str:
    """Replace ``[User 1's name]``, ``[name]``, ``[city]``, bare ``User 2``, ... with plausible
    words; ``speaker`` (1 or 2) says whose ``[name]`` follows "I'm"."""
    other = 3 - speaker

    def replace(match: re.Match) -> str:
        inner = match.group(1).strip().lower()
        ref = _USER_REF.search(inner)
        rest = _USER_REF.sub("", inner).replace("'s", "").strip(" _'")
        if ref and rest in ("", "name"):
            return names[int(ref.group(1))]
        for key, filler in FILLERS:
            if key in rest:
                return filler
        if "name" in inner or ref:
            if ref:
                return names[int(ref.group(1))]
            # "[name]" right after "I'm"/"my name is" is the speaker's own name.
            before = text[:match.start()]
            return names[speaker if _SELF_INTRO.search(before) else other]
        return match.group(0)

    text = _PLACEHOLDER.sub(replace, text)
    return _BARE_USER.sub(lambda m: names[int(m.group(1))], text)


def _names(tag: str) -> dict[int, str]:
    first, second = random.Random(tag).sample(NAMES, 2)
    return {1: first, 2: second}


def _bullets(facts: list[str]) -> str:
    return "\n".join(f"- {fact}" for fact in facts)


def build_context(row: dict[str, str], tag: str, agent: int) -> Context:
    """One context from a CSV row; ``agent`` (1 or 2) is the side the policy plays."""
    other = 3 - agent
    names = _names(tag)
    personas = {1: _facts(row["user 1 personas"]), 2: _facts(row["user 2 personas"])}
    turns = [(s, fill_placeholders(t, s, names)) for s, t in
             split_turns(row["Best Generated Conversation"])]
    other_lines = [text for speaker, text in turns if speaker == other]
    opening = other_lines[0] if other_lines else f"Hi, I'm {names[other]}! How are you today?"
    user_lines = other_lines[1:] or list(FALLBACK_USER_LINES)
    agent_prompt = (
        f"You are {names[agent]}, chatting with someone you just met. Stay in character as "
        f"this person for the whole conversation. About you:\n{_bullets(personas[agent])}\n"
        "Reply naturally in 1-2 sentences per turn, let your persona show, and never say "
        "that you are an AI.")
    user_prompt = (
        f"You are {names[other]}, chatting with someone you just met. About you:\n"
        f"{_bullets(personas[other])}\n"
        "Reply naturally in 1-2 sentences, share about yourself and ask the other person "
        "about their life.")
    return Context(
        context_id=f"spc-{tag}-u{agent}", agent_system_prompt=agent_prompt,
        user_system_prompt=user_prompt, opening=opening, persona=personas[agent],
        user_lines=user_lines,
        meta={"source": "synthetic_persona_chat", "tag": tag, "agent_name": names[agent],
              "user_name": names[other], "user_persona": personas[other]},
    )


class SyntheticPersonaChat(Problem):
    """The agent plays one side of a Synthetic-Persona-Chat pair; the other side is the user.

    ``split`` names the CSV file used for training contexts (``"valid"``: 1000 rows, or
    ``"test"``: 968 rows); held-out contexts (``all_contexts("test" | "validation" | "val" |
    "valid")``) come from the other file, so the two never share a persona pair.
    ``agent_side`` is ``"user 1"`` or ``"user 2"``; ``user_lines`` are the other side's lines
    from the reference conversation (for ``ScriptedUser``). Default judge: ``EmbeddingJudge``.
    """

    FILES = ("valid", "test")

    def __init__(self, split: str = "valid", data_dir: str | None = None,
                 agent_side: str = "user 2", n_turns: int = 4):
        if split not in self.FILES:
            raise ValueError(
                f"SyntheticPersonaChat: split must be 'valid' or 'test', got split={split!r}")
        side = agent_side.strip().lower().replace("user", "").strip()
        if side not in ("1", "2"):
            raise ValueError(f"SyntheticPersonaChat: agent_side must be 'user 1' or 'user 2', "
                             f"got {agent_side!r}")
        check_n_turns("SyntheticPersonaChat", n_turns)
        self.split, self.agent, self.n_turns = split, int(side), n_turns
        self.data_dir = resolve_data_dir(data_dir)
        self._contexts: dict[Path, list[Context]] = {}

    def path(self, split: str) -> Path:
        """The CSV file that serves ``split`` ("train" or a held-out name)."""
        train, other = self.split, next(f for f in self.FILES if f != self.split)
        return self.data_dir / f"Synthetic-Persona-Chat_{other if held_out(split) else train}.csv"

    def all_contexts(self, split: str) -> list[Context]:
        path = self.path(split)
        if path not in self._contexts:
            stem = path.stem.rsplit("_", 1)[-1]
            self._contexts[path] = [build_context(row, f"{stem}-{i:04d}", self.agent)
                                    for i, row in enumerate(read_rows(path))]
        return list(self._contexts[path])

    def default_judge(self):
        from ppg.judges.embedding import EmbeddingJudge

        return EmbeddingJudge()
