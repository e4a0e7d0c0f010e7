"""What a conversation is about: contexts for the agent and the user simulator."""

from __future__ import annotations

import random

from ppg.types import Context

__all__ = ["Context", "Problem"]


class Problem:
    """A source of contexts plus the default judge and horizon for them.

    Subclasses implement ``all_contexts(split)``; ``contexts`` samples from it reproducibly.
    """

    n_turns: int = 4

    def all_contexts(self, split: str) -> list[Context]:
        raise NotImplementedError

    def default_judge(self):
        """The judge that scores this problem when the config names none."""
        raise NotImplementedError(f"{type(self).__name__} has no default judge; configure one")

    def contexts(self, split: str, count: int, seed: int = 0) -> list[Context]:
        """``count`` contexts of ``split`` drawn without replacement (cycling if too few)."""
        pool = self.all_contexts(split)
        if not pool:
            raise ValueError(f"{type(self).__name__}: split {split!r} has no contexts")
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        return [pool[order[i % len(order)]] for i in range(count)]
