"""Importable from configs in tests (pytest puts tests/ on sys.path)."""

from ppg.judges import JudgeError
from ppg.judges.base import Judge


class FailingJudge(Judge):
    """Fails like an unreachable judge server."""

    def score(self, requests):
        raise JudgeError("judge server http://127.0.0.1:9/v1 unreachable after 3 tries")


class LengthJudge(Judge):
    """Reward = fraction of a 40-character line: varies between rollouts, so gradients are nonzero."""

    def score(self, requests):
        return [min(len(r.line) / 40, 1.0) for r in requests]


class BlockingJudge(Judge):
    """Writes ``started_file`` and then waits for ``seconds``: a judge stuck mid-rollout."""

    def __init__(self, started_file: str, seconds: float = 300.0):
        self.started_file, self.seconds = started_file, seconds

    def score(self, requests):
        import time
        from pathlib import Path

        Path(self.started_file).write_text("scoring\n")
        time.sleep(self.seconds)
        return [0.0 for _ in requests]
