"""Policy classes named on the command line: ``greedy,k2,full`` -> subsets, and back to arguments."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

from ppg.subsets import RewardSubset, Segment, subset_from_name

POLICY_FORMS = ("greedy, full, k<K> (e.g. k2), segment<L> (e.g. segment3), segment (the problem's "
                "block_length), discounted<gamma> (e.g. discounted0.9)")
def _merged_yaml(config: list[str]) -> dict:
    """The configs merged key by key (no interpolation), for a few look-ups before training."""
    import yaml

    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    merged: dict = {}
    for path in config:
        merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def _problem_block_length(config: list[str], overrides: list[str]) -> int | None:
    """``block_length`` of the configured problem (explicit, or its class default), if it has one."""
    for arg in reversed(overrides):
        if m := re.fullmatch(r"--(?:data\.init_args\.)?problem\.init_args\.block_length=(\d+)", arg):
            return int(m.group(1))
    problem = _merged_yaml(config).get("data", {}).get("init_args", {}).get("problem")
    if isinstance(problem, str):
        problem = {"class_path": problem}
    if not isinstance(problem, dict):
        return None
    if "block_length" in (problem.get("init_args") or {}):
        return int(problem["init_args"]["block_length"])
    class_path = problem.get("class_path", "")
    if "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get("block_length")
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if parameter is None or not isinstance(parameter.default, int):
        return None
    return parameter.default


def parse_policies(policies: str, config: list[str] | None = None,
                   overrides: list[str] | None = None) -> list[tuple[str, RewardSubset]]:
    """``"greedy,k2,full"`` -> ``[(label, subset), ...]``; a bad name is a one-line ValueError.

    A bare ``segment`` takes the configured problem's ``block_length`` (``segment<L>`` otherwise).
    """
    names = [name.strip().lower() for name in str(policies).split(",") if name.strip()]
    if not names:
        raise ValueError(f"--policies is empty; give a comma-separated list of: {POLICY_FORMS}")
    parsed = []
    for name in names:
        if name == "segment":
            length = _problem_block_length(config or [], overrides or [])
            if length is None:
                raise ValueError("policy 'segment' needs a segment length and the problem has no "
                                 "block_length; use segment<L> (e.g. segment2)")
            subset, label = Segment(length=length), f"segment{length}"
        else:
            try:
                subset = subset_from_name(name)
            except ValueError:
                raise ValueError(f"unknown policy {name!r}; valid forms: {POLICY_FORMS}") from None
            label = name
        if any(label == seen for seen, _ in parsed):
            raise ValueError(f"policy {label!r} is listed twice in --policies")
        parsed.append((label, subset))
    return parsed


def subset_args(subset: RewardSubset) -> list[str]:
    """``--model.subset=...`` command-line arguments that rebuild ``subset``."""
    cls = type(subset)
    args = [f"--model.subset={cls.__module__}.{cls.__qualname__}"]
    for key, value in vars(subset).items():
        if not key.startswith("_") and value is not None:
            args.append(f"--model.subset.init_args.{key}={json.dumps(value)}")
    return args
