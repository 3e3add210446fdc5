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
    "medsynth.cli.refiner",
    "medsynth.cli.labels",
    "medsynth.cli.demo",
    "medsynth.cli.cohort",
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
    if not debug:
        _quiet_library_chatter()
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


# Warnings that libraries raise about their own internals on every run; they say nothing about
# the user's data or settings, and they bury medsynth's own output. `--debug` shows them.
_LIBRARY_WARNINGS: tuple[str, ...] = (
    r".*isinstance\(treespec, LeafSpec\)",       # Lightning vs newer torch pytree
    r"Found \d+ module\(s\) in eval mode",         # frozen DiT/text encoder branches, by design
    r"Starting from v1\.9\.0, `tensorboardX`",     # Lightning's CSV-logger fallback notice
    r".*does not have many workers",               # num_workers=0 is deliberate (cached data)
    # The VQ-GAN steps its two optimisers by hand; a checkpoint after the step is what resuming needs.
    r"Using ModelCheckpoint with manual optimization",
    # Small in-memory datasets have short epochs; logging goes by global step, so nothing is lost.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


class _WarningHandlersLogger(logging.Logger):
    """A logger whose handlers print warnings and errors only (for Lightning's own console handler)."""

    def addHandler(self, handler: logging.Handler) -> None:  # noqa: N802 - logging's name
        handler.setLevel(max(handler.level, logging.WARNING))
        super().addHandler(handler)


def _drop_lightning_info(record: logging.LogRecord) -> bool:
    """Root-handler filter: False for Lightning's records below WARNING (its own handler prints the rest)."""
    return not (record.name.startswith("lightning") and record.levelno < logging.WARNING)


def _quiet_library_chatter() -> None:
    """Lightning's start-up banner (devices, tips) at WARNING, and known library-internal warnings off.

    Lightning attaches its own handler to its loggers *and* propagates to the root handler, so
    without this every banner line is printed twice.
    """
    import warnings

    # Lightning sets its loggers to INFO when it is imported (later, lazily), so a level set here
    # would be undone: a filter on the root handlers drops its info lines instead.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_lightning_info)
    # ... and the `lightning` package adds a console handler of its own at INFO when it is
    # imported (lazily, by the training commands): whatever it adds is raised to WARNING.
    existing = logging.Logger.manager.loggerDict.get("lightning")
    if isinstance(existing, logging.Logger):
        for handler in existing.handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
    else:
        logging.setLoggerClass(_WarningHandlersLogger)
        try:
            logging.getLogger("lightning")
        finally:
            logging.setLoggerClass(logging.Logger)
    for pattern in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


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
