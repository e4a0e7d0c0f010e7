"""The ``ppg`` command: LightningCLI (fit, validate, test) plus the commands in ``COMMANDS``."""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading

from lightning.pytorch.cli import LightningCLI

from ppg.clients import EndpointError
from ppg.data import ConversationDataModule
from ppg.module import PartialPolicyGradientModule
from ppg.rollout.samplers.base import SamplerError

# name -> "module:function"; each function is exposed through jsonargparse (typed arguments).
COMMANDS = {
    "prepare-model": ("ppg.models.embedded:prepare_model", "convert and cache the embedded model"),
    "chat": ("ppg.commands.chat:chat", "one persona reply from a (quantized) model"),
    "rollout": ("ppg.commands.rollout:rollout", "write logged conversations (JSONL) from a policy and a problem"),
    "judge-eval": ("ppg.commands.judge_eval:judge_eval", "accuracy/AUROC of judges on the labelled sets"),
    "compare": ("ppg.commands.compare.run:compare", "train and compare policy classes on one problem"),
    "evaluate": ("ppg.commands.evaluate:evaluate", "a trained policy vs the base model on held-out contexts"),
    "export": ("ppg.commands.export:export", "a checkpoint's adapters as a peft folder (or a merged model)"),
}
assert all(target.startswith("ppg.") and ":" in target for target, _ in COMMANDS.values())
# Bad input and the failures a run stops on (judge or sampler server down, non-finite loss):
# one line, no traceback (set PPG_DEBUG=1 for the traceback). JudgeError is an EndpointError.
ONE_LINE_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, EndpointError, SamplerError)


def _commands_epilog() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "other commands (ppg COMMAND --help):\n" + "\n".join(lines)


class PPGCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation, stacked configs and ppg's defaults."""

    def __init__(self, args=None, run: bool = True):
        omegaconf = {"parser_mode": "omegaconf"}
        super().__init__(
            PartialPolicyGradientModule,
            ConversationDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "reload_dataloaders_every_n_epochs": 1,
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs"}},
                "callbacks": _always_on_callbacks(),
            },
            parser_kwargs={**omegaconf, "epilog": _commands_epilog(),
                           **{name: dict(omegaconf) for name in ("fit", "validate", "test")}},
            args=args,
            run=run,
        )

    def before_fit(self):
        # One checkpoint folder per run name (not per logger version), so that
        # `--ckpt_path last` finds the previous run's last.ckpt.
        logger = self.trainer.logger
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None and logger is not None and logger.save_dir is not None:
                callback.dirpath = os.path.join(logger.save_dir, logger.name or "", "checkpoints")

    def subcommands(self):
        return {name: kwargs for name, kwargs in super().subcommands().items()
                if name in ("fit", "validate", "test")}


def _always_on_callbacks():
    from ppg.callbacks.run_record import CheckpointOnException, RunRecord

    return [RunRecord(), CheckpointOnException()]


def run_command(name: str, argv: list[str]) -> None:
    import importlib

    from jsonargparse import auto_cli

    target, _ = COMMANDS[name]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    if "config" in inspect.signature(function).parameters:
        _run_config_command(name, function, argv)
        return
    auto_cli(function, args=_bare_flags_true(function, argv), parser_mode="omegaconf",
             as_positional=False)


def _bare_flags_true(function, argv: list[str]) -> list[str]:
    """``--merge`` alone means ``--merge=true`` for the function's bool parameters."""
    flags = {f"--{name}" for name, parameter in inspect.signature(function).parameters.items()
             if parameter.annotation in (bool, "bool")}
    args = []
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else "--"
        bare = arg in flags and following.startswith("--")
        args.append(f"{arg}=true" if bare else arg)
    return args


def _run_config_command(name: str, function, argv: list[str]) -> None:
    """Tools taking ``config: list[str]`` (compare, evaluate): ``--config`` stacks like in
    ``ppg fit`` (``--config a.yaml --config b.yaml``) and ``--overrides --key=value`` repeats.

    Not through ``auto_cli``: it reserves the name ``config`` for its own config-file option
    and drops a function parameter of that name.
    """
    from jsonargparse import ArgumentParser

    stacking = ("--config", "--overrides")
    args, index = [], 0
    while index < len(argv):
        arg = argv[index]
        if arg in stacking and index + 1 < len(argv):  # the value may itself start with --
            args.append(f"{arg}+={argv[index + 1]}")
            index += 2
            continue
        for flag in stacking:
            if arg.startswith(flag + "="):
                arg = f"{flag}+={arg[len(flag) + 1:]}"
        args.append(arg)
        index += 1
    parser = ArgumentParser(prog=f"ppg {name}", parser_mode="omegaconf",
                            description=(inspect.getdoc(function) or "").split("\n\n")[0])
    parser.add_function_arguments(function, as_group=False)
    values = parser.instantiate(parser.parse_args(args))
    function(**{key: values[key] for key in inspect.signature(function).parameters if key in values})


class Terminated(Exception):
    """SIGTERM arrived; raised where the program is, so work in progress stops now (Lightning
    alone would wait for the end of the batch, and rollouts are not batches)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)  # Lightning calls it after its own handler
    try:
        if args and args[0] in COMMANDS:
            run_command(args[0], args[1:])
        else:
            PPGCLI(args=argv)
    except ONE_LINE_ERRORS as error:
        if os.environ.get("PPG_DEBUG"):
            raise
        print(f"ppg: error: {_root_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Terminated:
        if os.environ.get("PPG_DEBUG"):
            raise
        raise SystemExit(128 + signal.SIGTERM) from None


def _root_message(error: BaseException) -> str:
    """The first line of the innermost cause (jsonargparse wraps the class's own error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    main()
