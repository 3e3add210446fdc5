"""Atomic file writes: nothing is ever left half-written.

Every writer in medsynth writes to a temporary file in the destination folder and renames it
into place only after the write succeeded, so an interrupted run leaves either the old file or
the complete new one, never a truncated one, and a rerun can trust any file that exists.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_suffix(dest: Path) -> str:
    # Keep the full extension (".nii.gz") so format-sniffing writers still recognise it.
    name = dest.name
    dot = name.find(".")
    return name[dot:] if dot > 0 else ""


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` when the block succeeds.

    On any exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name.split('.')[0]}.", suffix=_temp_suffix(dest),
                                    dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(dest: str | Path, text: str) -> None:
    """Write ``text`` to ``dest`` atomically (UTF-8)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``dest`` atomically."""
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")
