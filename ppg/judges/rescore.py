"""Judges applied after the fact: score finished conversations with a judge from a config file.

Used by ``ppg evaluate`` to grade held-out conversations with EVALUATION judges configured
apart from the training judge (a policy is not graded by the judge it was trained on).
"""

from __future__ import annotations

import math
from pathlib import Path

from ppg.judges.base import Judge
from ppg.types import JudgeRequest


def load_judge(path: str | Path) -> Judge:
    """The judge in a YAML file: a stackable config (``data.init_args.judge``, as
    ``configs/judge/*.yaml``) or a bare ``{class_path, init_args}``."""
    import yaml
    from jsonargparse import ArgumentParser

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"judge config {str(path)!r} does not exist")
    spec = yaml.safe_load(file.read_text()) or {}
    if isinstance(spec, dict) and "class_path" not in spec:
        spec = ((spec.get("data") or {}).get("init_args") or {}).get("judge")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{path}: no judge found (expected data.init_args.judge or class_path)")
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--judge", type=Judge)
    return parser.instantiate_classes(parser.parse_object({"judge": spec})).judge


def turn_requests(rollout) -> list[JudgeRequest | None]:
    """One request per agent turn of a finished conversation (``None`` where the turn did not
    happen): the history before the line, the line, and the user's reply to it."""
    messages, requests = list(rollout.messages), []
    for turn, happened in enumerate(rollout.turn_mask):
        index = 2 * turn + 1
        if not happened or index >= len(messages):
            requests.append(None)
            continue
        reply = messages[index + 1][1] if index + 1 < len(messages) else None
        requests.append(JudgeRequest(rollout.context, [tuple(m) for m in messages[:index]],
                                     messages[index][1], turn, reply))
    return requests


def score_transcripts(judge: Judge, rollouts) -> list[list[float]]:
    """``[conversation][turn]`` rewards of ``judge`` in one batched call; NaN where the turn did
    not happen or the judge gave no verdict."""
    per_rollout = [turn_requests(r) for r in rollouts]
    asked = [request for requests in per_rollout for request in requests if request is not None]
    scores = iter(judge.score(asked))
    return [[math.nan if request is None else float(next(scores)) for request in requests]
            for requests in per_rollout]
