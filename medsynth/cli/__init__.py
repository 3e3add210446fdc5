"""The ``medsynth`` command line: one entry point, one module per command group.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
sub-commands and sets ``func`` (a callable taking the parsed namespace and returning an exit
code) on each. :func:`main` turns :class:`~medsynth.errors.MedsynthError` (and the usual
user-caused OS errors) into a one-line ``error: ...`` on stderr and exit code 2, with no
traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from medsynth.errors import MedsynthError

COMMAND_MODULES: tuple[str, ...] = (
    "medsynth.cli.info",
    "medsynth.cli.data",
    "medsynth.cli.evaluate",
    "medsynth.cli.autoencoder",
    "medsynth.cli.dit",
    "medsynth.cli.generate",
    "medsynth.cli.benchmark",
    "medsynth.cli.controlnet",
    "medsynth.cli.labels",
    "medsynth.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command."""
    from medsynth import __version__

    parser = argparse.ArgumentParser(
        prog="medsynth",
        description="Synthetic 3D CT/MRI volumes with paired labels, and proof of what they are worth.",
    )
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    # An output folder this run creates is removed again if the run fails, so a failed command
    # leaves nothing behind; an existing one (a resumed run) keeps its finished, atomically
    # written files.
    out = getattr(args, "out", None)
    created_out = isinstance(out, Path) and not out.exists()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Finished cases stay: every command that writes many files resumes on a rerun.
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as err:
        if created_out and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        message = _user_error_message(err)
        if debug or message is None:  # --debug, or a bug in medsynth: show the traceback
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _user_error_message(err: BaseException) -> str | None:
    """One-line message for errors the user caused; None for anything else (a bug)."""
    if isinstance(err, MedsynthError):
        return str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
