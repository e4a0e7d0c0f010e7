"""Policy classes named on the command line: ``greedy,k2,full`` -> subsets, and back to arguments."""

from __future__ import annotations

import json

from ppg.subsets import RewardSubset, Segment, subset_from_name

POLICY_FORMS = ("greedy, full, k<K> (e.g. k2), segment<L> (e.g. segment3), segment (the problem's "
                "block_length), discounted<gamma> (e.g. discounted0.9)")


def _problem_block_length(config: list[str], overrides: list[str]) -> int | None:
    """``block_length`` of the configured problem, resolved by ``ppg fit``'s own parser
    (stacked configs, interpolation, overrides, class defaults), if the problem has one."""
    from ppg.commands.compare.run import run_cli

    args = [arg for path in config for arg in ("--config", str(path))] + list(overrides)
    cli = run_cli(args, run=False)
    return getattr(getattr(cli.datamodule, "problem", None), "block_length", None)


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
