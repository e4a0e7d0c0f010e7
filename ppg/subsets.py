"""Reward subsets: which future rewards each turn's action is credited with.

A subset family ``S = (S_0, ..., S_{n-1})`` with ``S_t ⊆ {t, ..., n-1}`` is stored as an
upper-triangular ``[n, n]`` matrix whose row ``t`` marks ``S_t``. Set classes use 0/1 weights;
``Discounted`` and ``CustomMask`` may use real weights. Turns are 0-indexed.

Every class takes plain typed ``__init__`` arguments, so LightningCLI / jsonargparse can build it
from YAML::

    model:
      subset:
        class_path: ppg.subsets.KStepLookahead
        init_args: {k: 3}
"""

from __future__ import annotations

import itertools
import math
import re
from abc import ABC, abstractmethod

import torch

from ppg.types import check_n_turns

__all__ = [
    "CustomMask",
    "Discounted",
    "FullPlanning",
    "Greedy",
    "KStepLookahead",
    "RewardSubset",
    "Segment",
    "subset_from_name",
]


class RewardSubset(ABC):
    """Base class: a family of reward subsets, one per turn, for any number of turns."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name used in metric keys, e.g. ``"k3"``."""

    @abstractmethod
    def mask(self, n_turns: int) -> torch.Tensor:
        """Bool ``[n, n]``: ``mask[t, i]`` is True iff reward ``i`` is in ``S_t``."""

    def weights(self, n_turns: int) -> torch.Tensor:
        """Float ``[n, n]`` weight of reward ``i`` in turn ``t``'s credit (0/1 for set classes)."""
        return self.mask(n_turns).float()

    def credit(self, rewards: torch.Tensor) -> torch.Tensor:
        """``credit[b, t] = Σ_i weights[t, i] * rewards[b, i]`` for rewards ``[B, n]``."""
        if rewards.dim() != 2:
            raise ValueError(
                f"{type(self).__name__}.credit: rewards must be [B, n_turns], "
                f"got shape {tuple(rewards.shape)}"
            )
        w = self.weights(rewards.shape[1]).to(device=rewards.device, dtype=rewards.dtype)
        return rewards @ w.T

    def ascii(self, n_turns: int) -> str:
        """Text picture of the mask: row ``t`` lists which rewards turn ``t`` is credited with."""
        m = self.mask(n_turns)
        w = len(f"r{n_turns - 1}")
        label = f"{{:<{w}}} |"
        header = label.format("") + "".join(f" {'r' + str(i):<{w}}" for i in range(n_turns))
        rows = [
            label.format(f"a{t}")
            + "".join(f" {'x' if m[t, i] else '.':<{w}}" for i in range(n_turns))
            for t in range(n_turns)
        ]
        return "\n".join([f"{self.name} (n={n_turns})", header, *(r.rstrip() for r in rows)])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def _band(n_turns: int, width: int) -> torch.Tensor:
    """Bool [n, n] with mask[t, i] = t <= i < t + width."""
    idx = torch.arange(n_turns)
    offset = idx[None, :] - idx[:, None]
    return (offset >= 0) & (offset < width)


class FullPlanning(RewardSubset):
    """S_t = {t, ..., n-1}: every turn is credited with all later rewards (standard REINFORCE)."""

    @property
    def name(self) -> str:
        return "full"

    def mask(self, n_turns: int) -> torch.Tensor:
        n = check_n_turns("FullPlanning", n_turns)
        return torch.ones(n, n, dtype=torch.bool).triu()


class Greedy(RewardSubset):
    """S_t = {t}: each turn is credited only with its own reward."""

    @property
    def name(self) -> str:
        return "greedy"

    def mask(self, n_turns: int) -> torch.Tensor:
        n = check_n_turns("Greedy", n_turns)
        return torch.eye(n, dtype=torch.bool)


class KStepLookahead(RewardSubset):
    """S_t = {t, ..., min(t+k-1, n-1)}: the next k rewards. k=1 is greedy, k>=n is full."""

    def __init__(self, k: int = 2):
        """
        Args:
            k: number of rewards (this turn's included) credited to each turn; k >= 1.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"KStepLookahead: k must be an int >= 1, got k={k!r}")
        self.k = k

    @property
    def name(self) -> str:
        return f"k{self.k}"

    def mask(self, n_turns: int) -> torch.Tensor:
        return _band(check_n_turns("KStepLookahead", n_turns), self.k)


class Segment(RewardSubset):
    """Turns are split into segments; S_t = {t, ..., last turn of t's segment}.

    Give exactly one of ``length`` (consecutive segments of that many turns, the last one may be
    shorter) or ``boundaries`` (0-indexed start turn of each segment: first 0, strictly
    increasing, all < n_turns).
    """

    def __init__(self, length: int | None = None, boundaries: list[int] | None = None):
        """
        Args:
            length: turns per segment (>= 1); the last segment may be shorter.
            boundaries: start turn of each segment, e.g. ``[0, 2, 3]``.
        """
        if (length is None) == (boundaries is None):
            raise ValueError(
                f"Segment: give exactly one of length or boundaries, "
                f"got length={length!r}, boundaries={boundaries!r}"
            )
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 1
        ):
            raise ValueError(f"Segment: length must be an int >= 1, got length={length!r}")
        if boundaries is not None:
            boundaries = list(boundaries)
            if (
                not boundaries
                or any(isinstance(b, bool) or not isinstance(b, int) for b in boundaries)
                or boundaries[0] != 0
                or any(b >= c for b, c in itertools.pairwise(boundaries))
            ):
                raise ValueError(
                    "Segment: boundaries must be ints starting at 0 and strictly increasing, "
                    f"got boundaries={boundaries!r}"
                )
        self.length = length
        self.boundaries = boundaries

    @property
    def name(self) -> str:
        return "segment"

    def segment_ids(self, n_turns: int) -> torch.Tensor:
        """Long ``[n]``: index of the segment that holds each turn."""
        n = check_n_turns("Segment", n_turns)
        if self.length is not None:
            return torch.arange(n) // self.length
        if self.boundaries[-1] >= n:
            raise ValueError(
                f"Segment: boundaries must all be < n_turns={n}, got boundaries={self.boundaries!r}"
            )
        starts = torch.zeros(n, dtype=torch.long)
        starts[torch.tensor(self.boundaries)] = 1
        return starts.cumsum(0) - 1

    def mask(self, n_turns: int) -> torch.Tensor:
        seg = self.segment_ids(n_turns)
        return (seg[:, None] == seg[None, :]).triu()


class Discounted(RewardSubset):
    """Weights gamma^(i-t) on rewards i >= t (gamma=1 is full planning with 0/1 weights)."""

    def __init__(self, gamma: float = 0.9):
        """
        Args:
            gamma: discount factor in (0, 1].
        """
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"Discounted: gamma must be in (0, 1], got gamma={gamma!r}")
        self.gamma = float(gamma)

    @property
    def name(self) -> str:
        return f"discounted{self.gamma:g}"

    def mask(self, n_turns: int) -> torch.Tensor:
        n = check_n_turns("Discounted", n_turns)
        return torch.ones(n, n, dtype=torch.bool).triu()

    def weights(self, n_turns: int) -> torch.Tensor:
        n = check_n_turns("Discounted", n_turns)
        idx = torch.arange(n, dtype=torch.float64)
        offset = idx[None, :] - idx[:, None]
        # Computed in float64 then cast, so gamma^(i-t) matches math.pow to float32 precision.
        w = torch.where(offset >= 0, self.gamma ** offset.clamp(min=0), 0.0)
        return w.float()


class CustomMask(RewardSubset):
    """A fixed ``[n, n]`` upper-triangular weight matrix (0/1 or real weights); n is fixed."""

    def __init__(self, matrix: list[list[float]]):
        """
        Args:
            matrix: square upper-triangular matrix, row t = weights of rewards in turn t's
                credit (nested lists; a tensor also works from Python).
        """
        m = torch.as_tensor(matrix, dtype=torch.float32)
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
            raise ValueError(
                f"CustomMask: matrix must be square [n, n], got shape {tuple(m.shape)}"
            )
        if not torch.isfinite(m).all():
            raise ValueError("CustomMask: matrix must be finite, got NaN or inf entries")
        if m.tril(-1).ne(0).any():
            bad = m.tril(-1).nonzero()[0].tolist()
            raise ValueError(
                f"CustomMask: matrix must be upper-triangular, got nonzero entry at {bad}"
            )
        self.matrix = m.tolist()
        self._weights = m

    @property
    def name(self) -> str:
        return "custom"

    def _check_size(self, n_turns: int) -> None:
        n = check_n_turns("CustomMask", n_turns)
        if n != self._weights.shape[0]:
            raise ValueError(
                f"CustomMask: n_turns must equal the matrix size {self._weights.shape[0]}, "
                f"got n_turns={n}"
            )

    def mask(self, n_turns: int) -> torch.Tensor:
        self._check_size(n_turns)
        return self._weights != 0

    def weights(self, n_turns: int) -> torch.Tensor:
        self._check_size(n_turns)
        return self._weights.clone()


_NAME_FORMS = "full, greedy, k<K> (e.g. k3), segment<L> (e.g. segment2), discounted<gamma> (e.g. discounted0.9)"


def subset_from_name(name: str) -> RewardSubset:
    """Parse a short name: ``full``, ``greedy``, ``k<K>``, ``segment<L>``, ``discounted<gamma>``."""
    s = name.strip().lower() if isinstance(name, str) else ""
    if s == "full":
        return FullPlanning()
    if s == "greedy":
        return Greedy()
    if m := re.fullmatch(r"k(\d+)", s):
        return KStepLookahead(int(m.group(1)))
    if m := re.fullmatch(r"segment(\d+)", s):
        return Segment(length=int(m.group(1)))
    if m := re.fullmatch(r"discounted(\d*\.?\d+(?:e-?\d+)?)", s):
        gamma = float(m.group(1))
        if math.isfinite(gamma):
            return Discounted(gamma)
    raise ValueError(f"subset_from_name: unknown name={name!r}; valid forms: {_NAME_FORMS}")
