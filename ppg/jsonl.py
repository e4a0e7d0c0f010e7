"""JSON Lines files: one record per non-blank line, errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, what: str = "records") -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of ``path``.

    One-line errors: a missing file, a line that is not a JSON object, a file with no records
    (``what`` names them in the message, e.g. "personas").
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    count = 0
    with file.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):  # bad input, reported like bad JSON
                raise ValueError(  # noqa: TRY004
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield number, record
    if not count:
        raise ValueError(f"{what} file {str(path)!r} is empty")
