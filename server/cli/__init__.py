"""The `hmem` command line: one parser, every command registered the same way.

`hmem serve` serves a bank over HTTP (with no arguments, the demo bank). `hmem build` trains a
memory bank from a corpus; `hmem bank push` copies its blocks to their
tiers and `hmem bank verify` checks them there. `hmem synth` writes a synthetic long-tail
corpus and `hmem eval` measures a bank's accuracy on it by frequency bucket. `hmem pretrain`
pretrains a general-English anchor on open text that packages install, for `hmem build --anchor`.
`hmem tiers profiles` lists the device profiles a tier can emulate; `hmem tiers check` opens
the configured storage hierarchy and reports, per tier, whether it answers and what it holds.

Each module of this package holds one command group and adds it with `register(commands)`,
`commands` being the `hmem` subparsers. Every command's parser sets `run` (a function of the
parsed arguments that returns the exit status) and may set `user_errors` (its own exceptions
that are the user's to fix) and `on_interrupt` (what to add to "interrupted" when its work
survives Ctrl-C). Nothing else: `main` runs `run` and reports every failure itself.

`main` is the one place where failures meet the user: an error the user can fix (bad input, a
missing or unreadable file, a taken port) is printed as one line, `hmem: error: ...`, with exit
status 2, and Ctrl-C as `hmem: interrupted`, with 130. This module imports nothing heavy at the
top, so that even a Ctrl-C while torch is still loading ends in that one line; the command
modules are imported while the parser is built, inside `main`'s handling.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from server import __version__

# The training commands (`server.cli.training`) are registered in full only when one of them
# runs: `hmem serve` and the other serving commands never import the training package.
TRAINING_COMMANDS = {
    "build": "train a memory bank from a corpus",
    "synth": "write a long-tail knowledge corpus, synthetic or GeoNames (corpus, facts)",
    "eval": "long-tail accuracy by frequency bucket, with memory and without",
    "demo": "build the demo bank from the synthetic corpus (fixed seeds) and evaluate it",
    "pretrain": "pretrain a general-English anchor on open text that packages install here",
}


def user_errors(args: argparse.Namespace | None = None) -> tuple[type[BaseException], ...]:
    """Errors that describe something the user can fix: reported in one line, never a traceback.

    Bad input is a `ValueError` (house style) and a missing, unreadable or misplaced file an
    `OSError`; a command may add its own as the `user_errors` default of its parser.
    """
    from server.bank.errors import BankError
    from server.model.errors import ModelError
    from server.routing.errors import RouterError
    from tiers.errors import TierError

    extra: tuple[type[BaseException], ...] = getattr(args, "user_errors", ())
    return (ValueError, OSError, TierError, ModelError, BankError, RouterError, *extra)


def describe(exc: BaseException) -> str:
    """`exc` as one line: an OSError as "PATH: reason", anything else as its message."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        text = f"{' -> '.join(paths)}: {exc.strerror}" if paths else exc.strerror
    return " ".join(text.split()) or type(exc).__name__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `hmem` parser; the training commands in full only when `command` is one of them."""
    from server.cli import bank, serve, tiers

    parser = argparse.ArgumentParser(
        prog="hmem", description="Tiered memory-serving inference server."
    )
    parser.add_argument("--version", action="version", version=f"hmem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    if command in TRAINING_COMMANDS:
        from server.cli import training

        training.register(commands)
    else:
        for name, help_text in TRAINING_COMMANDS.items():
            commands.add_parser(name, help=help_text)  # listed in `hmem --help`, never run
    bank.register(commands)
    serve.register(commands)
    tiers.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args: argparse.Namespace | None = None
    try:
        # The top level takes no option with a value, so the first word is the command.
        command = next((word for word in argv if not word.startswith("-")), None)
        args = build_parser(command).parse_args(argv)
        return int(args.run(args))
    except KeyboardInterrupt:
        # A command whose work survives an interrupt says how to pick it up (`on_interrupt`).
        print(f"hmem: interrupted{getattr(args, 'on_interrupt', '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hmem eval | head`): stop quietly, as other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not isinstance(exc, user_errors(args)):
            raise  # a bug: its traceback is what a report needs
        print(f"hmem: error: {describe(exc)}", file=sys.stderr)
        return 2
