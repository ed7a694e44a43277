"""The `tinylm` command: argument parsing and one thin function per command.

Sub-packages add their own commands through `add_commands(subparsers)` in the modules listed in
`COMMAND_PROVIDERS`; heavy imports (torch, datasets) happen inside the command functions so that
`tinylm --help` and configuration errors are instant. Errors the user can fix (config, tokenizer,
data, checkpoint) are printed as one clear message and exit with status 2, without a traceback;
anything else is a bug, reported in one line with the traceback in a file (tinylm/crash.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

COMMAND_PROVIDERS = [
    "tinylm.train.commands",  # train, eval, generate
    "tinylm.data.tokenizer_cli",  # tokenizer train|encode|stats|import|export
    "tinylm.data.cli",  # prepare, datasets
    "tinylm.estimate",  # estimate
    "tinylm.runs",  # runs, plot
    "tinylm.serve.cli",  # serve
    "tinylm.export.cli",  # export
    "tinylm.sweep.cli",  # sweep
    "tinylm.scaling.cli",  # scaling
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="Train, evaluate, sample and export small GPT-style language models.",
    )
    from tinylm import __version__

    parser.add_argument("--version", action="version", version=f"tinylm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_PROVIDERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # provider not written yet: its commands are absent
                continue
            raise
        module.add_commands(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (printed without a traceback)."""
    from tinylm.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module_name, name in (
        ("tinylm.tokenizer.base", "TokenizerError"),
        ("tinylm.data.errors", "DataError"),
        ("tinylm.train.checkpoint", "CheckpointError"),
    ):
        # Only from modules already imported: an error class of a module that was never loaded
        # cannot have been raised, and importing them to find out (torch for checkpoint.py,
        # numpy for the tokenizer) cost ~7 s on this shared machine for every config error.
        if (module := sys.modules.get(module_name)) is not None:
            with contextlib.suppress(AttributeError):
                errors.append(getattr(module, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # `tinylm train tiny --dry-run train.max_steps=5`: argparse leaves overrides that follow
        # a flag unparsed; they are overrides all the same.
        if (
            extra
            and hasattr(args, "overrides")
            and all("=" in e and not e.startswith("-") for e in extra)
        ):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0), or a refused argument (2) whose message is printed
        return e.code if isinstance(e.code, int) else 2
    try:
        result = args.func(args)
    except user_errors() as e:
        print(f"tinylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ntinylm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line here, the traceback in a report file
        if "torch.distributed" in sys.modules:  # under torchrun, another rank may have died
            from tinylm.train.distributed import peer_lost_message

            if message := peer_lost_message(e):
                print(f"tinylm {args.command}: {message}", file=sys.stderr)
                return 1
        from tinylm.crash import report_internal_error

        return report_internal_error(args, argv, e)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
