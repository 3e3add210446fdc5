"""Reading the YAML run configs under ``configs/`` (autoencoder, DiT, ControlNet)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError


def read_config_sections(path: str | Path, sections: Sequence[str], examples: str) -> dict[str, Any]:
    """Parse a YAML run config whose top level may hold only ``sections``.

    Args:
        path: the YAML file.
        sections: the allowed top-level keys.
        examples: where valid configs live, for the error message (e.g. "configs/dit/ for tiny/s/b/l").

    Returns:
        The raw mapping (sections absent from the file are absent here too).

    Raises:
        ConfigError: a missing file, invalid YAML, a non-mapping or unknown sections, naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see {examples}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with sections {list(sections)}")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; valid sections are {list(sections)}")
    return raw
