"""The cohort spec: what a user wants generated, as a validated dataclass.

A spec is a YAML file (reference: ``docs/cohort.md``; example: ``configs/cohort/example.yaml``)::

    name: liver_lesions_300
    total: 300
    modality: CT
    pipeline: ../pipeline            # paths are relative to the spec file
    data: ../data                    # the real dataset: statistics, prompts, audit
    classes:
      liver_lesion: {share: 0.4, host: liver, count: [1, 3],
                     size_bins: [{range_mm: [5, 15], share: 0.5}, {range_mm: [15, 30], share: 0.5}]}
      healthy: {share: 0.6}
    spacing: real                    # default | real | [x, y, z]
    demographics: {sex: real, age: real}
    masks: {source: bank}            # bank | user | generator | none
    quality: {gate: true, max_retries: 2}

Every error names the offending key path (``classes.liver_lesion.share``) and what is valid.
Checks that need the real data (is ``liver_lesion`` a label? does the data record ``sex``?)
happen when the spec is planned (:mod:`medsynth.cohort.plan`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError

HEALTHY = "healthy"
"""Reserved class name: cases without lesions."""
REAL = "real"
"""Value meaning "match the real dataset's distribution"."""
SECTIONS: tuple[str, ...] = ("name", "total", "modality", "seed", "pipeline", "data", "out", "region", "classes",
                             "spacing", "size", "demographics", "masks", "quality", "sampling", "prompt_template",
                             "format")
CLASS_KEYS: tuple[str, ...] = ("share", "host", "count", "size_bins")
BIN_KEYS: tuple[str, ...] = ("range_mm", "share")
MASK_KEYS: tuple[str, ...] = ("source", "file", "labels", "bank")
MASK_SOURCES: tuple[str, ...] = ("bank", "user", "generator", "none")
QUALITY_KEYS: tuple[str, ...] = ("gate", "max_retries", "keep_failed", "min_dice")
SAMPLING_KEYS: tuple[str, ...] = ("steps", "guidance", "mask_guidance")
DEMOGRAPHIC_KEYS: tuple[str, ...] = ("sex", "age")
MODALITIES: tuple[str, ...] = ("CT", "MR")
FORMATS: tuple[str, ...] = ("nifti", "dicom", "both")
MAX_TOTAL = 1_000_000
SHARE_TOLERANCE = 1e-6
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _where(key: str, allowed: Sequence[str], name: str) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown key {name!r}{hint}; valid keys are {list(allowed)}"


def _mapping(value: Any, key: str, allowed: Sequence[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expects a mapping, got {value!r}")
    out = {str(k): v for k, v in value.items()}
    if allowed is not None:
        for name in out:
            if name not in allowed:
                raise ConfigError(_where(f"{key}.{name}", allowed, name))
    return out


def _number(value: Any, key: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{key}: expects a number, got {value!r}")
    value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        raise ConfigError(f"{key}: {value:g} is outside the valid range {bounds}")
    return value


def _integer(value: Any, key: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expects an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{key}: {value} is outside the valid range [{low}, {'inf' if high is None else high}]")
    return int(value)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expects true or false, got {value!r}")
    return value


def _path(value: Any, key: str, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expects a path (text), got {value!r}")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


@dataclass(frozen=True)
class SizeBin:
    """Lesion diameters drawn uniformly from ``min_mm..max_mm`` for ``share`` of a class's cases."""

    min_mm: float
    max_mm: float
    share: float

    @property
    def label(self) -> str:
        return f"{self.min_mm:g}-{self.max_mm:g}mm"


@dataclass(frozen=True)
class ClassSpec:
    """One cohort class: its share of the cases and, for lesion classes, how many lesions of what size.

    Attributes:
        name: a lesion label of the dataset, or ``healthy`` (no lesions).
        share: fraction of all cases, in [0, 1].
        host: organ label holding the lesions (None: the class name without ``_lesion``).
        count: lesions per case: ``(n, n)``, an inclusive range ``(lo, hi)`` spread evenly, or
            ``"real"`` (the real lesion-bearing cases' count distribution).
        size_bins: diameter bins with shares of the class's cases, or ``"real"`` (diameters of
            the real lesions, +-10 %).
    """

    name: str
    share: float
    host: str | None = None
    count: tuple[int, int] | str = (1, 1)
    size_bins: tuple[SizeBin, ...] | str = ()

    @property
    def is_lesion(self) -> bool:
        return self.name != HEALTHY

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"share": self.share}
        if self.is_lesion:
            out.update(host=self.host, count=self.count if isinstance(self.count, str) else list(self.count),
                       size_bins=self.size_bins if isinstance(self.size_bins, str) else
                       [{"range_mm": [b.min_mm, b.max_mm], "share": b.share} for b in self.size_bins])
        return out


@dataclass(frozen=True)
class CohortSpec:
    """A parsed, validated cohort spec (see the module docstring and ``docs/cohort.md``).

    Paths are absolute (resolved against the spec file's folder).
    """

    name: str
    total: int
    classes: dict[str, ClassSpec]
    modality: str | None = None
    seed: int = 0
    pipeline: Path | None = None
    data: Path | None = None
    out: Path | None = None
    region: str | None = REAL
    spacing: str | tuple[float, float, float] = "default"
    size: tuple[int, int, int] | None = None
    sex: str | dict[str, float] | None = None
    age: str | tuple[float, float] | None = None
    mask_source: str = "bank"
    mask_file: Path | None = None
    mask_labels: Path | None = None
    bank: Path | None = None
    quality_gate: bool = True
    max_retries: int = 2
    keep_failed: bool = False
    min_dice: float = 0.5
    steps: int | None = None
    guidance: float | None = None
    mask_guidance: float | None = None
    prompt_template: str | None = None
    format: str = "nifti"
    source: Path | None = field(default=None, compare=False)

    @property
    def lesion_classes(self) -> list[ClassSpec]:
        return [c for c in self.classes.values() if c.is_lesion]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what determines the cohort; ``out``, ``format`` and the source file are left out)."""
        text = lambda p: None if p is None else str(p)  # noqa: E731
        return {"name": self.name, "total": self.total, "modality": self.modality, "seed": self.seed,
                "pipeline": text(self.pipeline), "data": text(self.data), "region": self.region,
                "classes": {n: c.to_dict() for n, c in self.classes.items()},
                "spacing": self.spacing if isinstance(self.spacing, str) else list(self.spacing),
                "size": None if self.size is None else list(self.size),
                "demographics": {"sex": self.sex, "age": self.age if not isinstance(self.age, tuple)
                                 else list(self.age)},
                "masks": {"source": self.mask_source, "file": text(self.mask_file),
                          "labels": text(self.mask_labels), "bank": text(self.bank)},
                "quality": {"gate": self.quality_gate, "max_retries": self.max_retries,
                            "keep_failed": self.keep_failed, "min_dice": self.min_dice},
                "sampling": {"steps": self.steps, "guidance": self.guidance, "mask_guidance": self.mask_guidance},
                "prompt_template": self.prompt_template}


def _count(value: Any, key: str) -> tuple[int, int] | str:
    from medsynth.pipelines.lesions import MAX_COUNT

    if value == REAL:
        return REAL
    if isinstance(value, int) and not isinstance(value, bool):
        n = _integer(value, key, 1, MAX_COUNT)
        return (n, n)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = (_integer(v, f"{key}[{i}]", 1, MAX_COUNT) for i, v in enumerate(value))
        if lo > hi:
            raise ConfigError(f"{key}: range [{lo}, {hi}] needs MIN <= MAX")
        return (lo, hi)
    raise ConfigError(f"{key}: expects an integer, a range [MIN, MAX] or 'real', got {value!r}")


def _size_bins(value: Any, key: str) -> tuple[SizeBin, ...] | str:
    if value == REAL:
        return REAL
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expects a list of {{range_mm: [MIN, MAX], share: S}} or 'real', got {value!r}")
    bins = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        item = _mapping(item, where, BIN_KEYS)
        if "range_mm" not in item:
            raise ConfigError(f"{where}.range_mm: missing; give the diameter range, e.g. [5, 15]")
        rng = item["range_mm"]
        if isinstance(rng, (int, float)) and not isinstance(rng, bool):
            rng = [rng, rng]
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise ConfigError(f"{where}.range_mm: expects [MIN, MAX] in mm, got {rng!r}")
        lo, hi = (_number(v, f"{where}.range_mm[{j}]", low=0.0) for j, v in enumerate(rng))
        if not 0 < lo <= hi:
            raise ConfigError(f"{where}.range_mm: [{lo:g}, {hi:g}] needs 0 < MIN <= MAX")
        share = _number(item.get("share", 1.0 / len(value)), f"{where}.share", 0.0, 1.0)
        bins.append(SizeBin(lo, hi, share))
    _check_sum([b.share for b in bins], key, [f"{b.label}" for b in bins])
    return tuple(bins)


def _check_sum(shares: Sequence[float], key: str, names: Sequence[str]) -> None:
    total = sum(shares)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        parts = " + ".join(f"{n} {s:g}" for n, s in zip(names, shares))
        raise ConfigError(f"{key}: shares sum to {total:.6g} ({parts}); they must sum to 1")


def _class(name: str, value: Any, key: str) -> ClassSpec:
    if not _NAME.match(name):
        raise ConfigError(f"{key}: class name {name!r} must be a label name (letters, digits, '.', '_', '-')")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"share": value}
    item = _mapping(value, key, CLASS_KEYS)
    if "share" not in item:
        raise ConfigError(f"{key}.share: missing; give the fraction of cases in [0, 1]")
    share = _number(item["share"], f"{key}.share", 0.0, 1.0)
    if name == HEALTHY:
        extra = sorted(set(item) - {"share"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: the {HEALTHY!r} class has no lesions; it takes only 'share'")
        return ClassSpec(name, share)
    host = item.get("host")
    if host is not None and (not isinstance(host, str) or not host.strip()):
        raise ConfigError(f"{key}.host: expects a label name, got {host!r}")
    count = _count(item.get("count", 1), f"{key}.count")
    if "size_bins" not in item:
        raise ConfigError(f"{key}.size_bins: missing; give [{{range_mm: [MIN, MAX], share: S}}, ...] or 'real'")
    return ClassSpec(name, share, host, count, _size_bins(item["size_bins"], f"{key}.size_bins"))


def _spacing(value: Any) -> str | tuple[float, float, float]:
    if value in ("default", REAL):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(_number(v, f"spacing[{i}]", low=1e-3) for i, v in enumerate(value))  # type: ignore[return-value]
    raise ConfigError(f"spacing: expects 'default' (the pipeline's), 'real' (match the real set) or [x, y, z] mm, "
                      f"got {value!r}")


def _size(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(_integer(v, f"size[{i}]", 1, 4096) for i, v in enumerate(value))  # type: ignore[return-value]
    raise ConfigError(f"size: expects [X, Y, Z] voxels (default: the pipeline's training size), got {value!r}")


def _demographics(value: Any) -> tuple[Any, Any]:
    item = _mapping(value, "demographics", DEMOGRAPHIC_KEYS)
    sex, age = item.get("sex"), item.get("age")
    if sex is not None and sex != REAL:
        table = _mapping(sex, "demographics.sex")
        if not table:
            raise ConfigError("demographics.sex: expects 'real' or shares such as {female: 0.5, male: 0.5}")
        sex = {str(k).lower(): _number(v, f"demographics.sex.{k}", 0.0, 1.0) for k, v in table.items()}
        _check_sum(list(sex.values()), "demographics.sex", list(sex))
    if age is not None and age != REAL:
        if not isinstance(age, (list, tuple)) or len(age) != 2:
            raise ConfigError(f"demographics.age: expects 'real' or a range [MIN, MAX] in years, got {age!r}")
        lo, hi = (_number(v, f"demographics.age[{i}]", 0.0, 130.0) for i, v in enumerate(age))
        if lo > hi:
            raise ConfigError(f"demographics.age: [{lo:g}, {hi:g}] needs MIN <= MAX")
        age = (lo, hi)
    return sex, age


def parse_spec(raw: Mapping[str, Any], base: str | Path = ".", source: Path | None = None) -> CohortSpec:
    """Validate a spec mapping; relative paths are resolved against ``base``.

    Raises:
        ConfigError: naming the key path of the first problem and what is valid.
    """
    base = Path(base).resolve()
    raw = _mapping(raw, "spec", SECTIONS)
    for required in ("total", "classes"):
        if required not in raw:
            raise ConfigError(f"{required}: missing; a cohort spec needs {required!r} (see docs/cohort.md)")
    name = raw.get("name", source.stem if source is not None else "cohort")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"name: {name!r} must start with a letter or digit and hold only letters, digits, "
                          f"'.', '_', '-'")
    total = _integer(raw["total"], "total", 1, MAX_TOTAL)
    modality = raw.get("modality")
    if modality is not None:
        if not isinstance(modality, str) or modality.upper() not in MODALITIES:
            raise ConfigError(f"modality: {modality!r} is not valid; valid modalities are {list(MODALITIES)}")
        modality = modality.upper()
    classes_raw = _mapping(raw["classes"], "classes")
    if not classes_raw:
        raise ConfigError("classes: expects at least one class, e.g. {healthy: {share: 1.0}}")
    classes = {n: _class(n, v, f"classes.{n}") for n, v in classes_raw.items()}
    _check_sum([c.share for c in classes.values()], "classes", list(classes))
    region = raw.get("region", REAL)
    if region is not None and (not isinstance(region, str) or not region.strip()):
        raise ConfigError(f"region: expects a body region name or 'real', got {region!r}")
    sex, age = _demographics(raw.get("demographics") or {})
    masks = _mapping(raw.get("masks") or {}, "masks", MASK_KEYS)
    source_kind = masks.get("source", "bank")
    if source_kind not in MASK_SOURCES:
        raise ConfigError(f"masks.source: {source_kind!r} is not valid; valid sources are {list(MASK_SOURCES)}")
    mask_file = _path(masks.get("file"), "masks.file", base)
    if source_kind == "user" and mask_file is None:
        raise ConfigError("masks.file: missing; masks.source 'user' needs the label map file")
    if source_kind != "user" and (mask_file is not None or masks.get("labels") is not None):
        raise ConfigError(f"masks.file: only with masks.source 'user' (source is {source_kind!r})")
    if source_kind == "none" and any(c.is_lesion and c.share > 0 for c in classes.values()):
        lesion = next(n for n, c in classes.items() if c.is_lesion and c.share > 0)
        raise ConfigError(f"classes.{lesion}: lesions are painted into masks, but masks.source is 'none'; use "
                          f"masks.source bank, user or generator")
    quality = _mapping(raw.get("quality") or {}, "quality", QUALITY_KEYS)
    sampling = _mapping(raw.get("sampling") or {}, "sampling", SAMPLING_KEYS)
    template = raw.get("prompt_template")
    if template is not None:
        if not isinstance(template, str) or not template.strip():
            raise ConfigError(f"prompt_template: expects text such as '{{modality}} {{region}}, {{finding}}', "
                              f"got {template!r}")
        try:
            template.format(modality="CT", region="abdomen", finding="no lesion", sex="female", age=50,
                            cls=HEALTHY)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"prompt_template: unknown field {err}; valid fields are "
                              f"{{modality}} {{region}} {{finding}} {{sex}} {{age}} {{cls}}") from None
    fmt = raw.get("format", "nifti")
    if fmt not in FORMATS:
        raise ConfigError(f"format: {fmt!r} is not valid; valid formats are {list(FORMATS)}")
    steps = sampling.get("steps")
    return CohortSpec(
        name=name, total=total, classes=classes, modality=modality,
        seed=_integer(raw.get("seed", 0), "seed", 0, 2 ** 62),
        pipeline=_path(raw.get("pipeline"), "pipeline", base), data=_path(raw.get("data"), "data", base),
        out=_path(raw.get("out"), "out", base), region=None if region is None else str(region),
        spacing=_spacing(raw.get("spacing", "default")), size=_size(raw.get("size")), sex=sex, age=age,
        mask_source=source_kind, mask_file=mask_file, mask_labels=_path(masks.get("labels"), "masks.labels", base),
        bank=_path(masks.get("bank"), "masks.bank", base),
        quality_gate=_boolean(quality.get("gate", True), "quality.gate"),
        max_retries=_integer(quality.get("max_retries", 2), "quality.max_retries", 0, 100),
        keep_failed=_boolean(quality.get("keep_failed", False), "quality.keep_failed"),
        min_dice=_number(quality.get("min_dice", 0.5), "quality.min_dice", 0.0, 1.0),
        steps=None if steps is None else _integer(steps, "sampling.steps", 1, 10_000),
        guidance=None if sampling.get("guidance") is None else _number(sampling["guidance"], "sampling.guidance", 0.0),
        mask_guidance=None if sampling.get("mask_guidance") is None else
        _number(sampling["mask_guidance"], "sampling.mask_guidance", 0.0),
        prompt_template=template, format=str(fmt), source=source)


def load_spec(path: str | Path) -> CohortSpec:
    """Read and validate a cohort spec YAML file (paths inside are relative to its folder).

    Raises:
        ConfigError: a missing file, invalid YAML, or an invalid key (the message names its path).
    """
    from medsynth.io.config_files import read_config_sections

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/cohort/example.yaml and docs/cohort.md")
    try:
        return parse_spec(raw, path.parent, source=path.resolve())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


__all__ = ["CohortSpec", "ClassSpec", "SizeBin", "parse_spec", "load_spec", "HEALTHY", "REAL", "SECTIONS"]
