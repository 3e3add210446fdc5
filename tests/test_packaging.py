"""Packaging: every package folder is importable from a built wheel, the CLI is declared."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_folder_is_a_package() -> None:
    # setuptools' find_packages skips folders without __init__.py: they would vanish from wheels
    # (and Docker images) while an editable install still works.
    missing = [str(d.relative_to(ROOT)) for d in (ROOT / "medsynth").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    assert not missing, f"folders without __init__.py: {missing}"


def test_console_script_and_licence() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["medsynth"] == "medsynth.cli:main"
    assert meta["license"]["text"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert not any("torchvision" in d for d in meta["dependencies"])
