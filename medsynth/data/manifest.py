"""The dataset model: cases, label table, splits, and how a dataset folder is read.

A dataset is one of
  * an nnU-Net v2 folder (``dataset.json`` with ``channel_names``; ``imagesTr/CASE_0000.nii.gz``,
    ``labelsTr/CASE.nii.gz``, ``imagesTs/`` and optional ``labelsTs/``),
  * a Medical Segmentation Decathlon folder (``dataset.json`` with ``modality`` and a
    ``training`` list),
  * a CSV manifest (columns ``image``, ``label``, optional ``prompt``, ``case_id``, ``split``,
    anything else is per-case metadata; relative paths are relative to the CSV's folder).

Folders may carry medsynth sidecars: ``prompts.jsonl`` (per-case text and metadata),
``splits.json`` (fixed train/val/test with the held-out test split, see
:mod:`medsynth.data.splits`) and ``preprocessing.json`` (what :func:`prepare_dataset` did to
each case). ``docs/dataset_layout.md`` describes every file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.splits import GENERATIVE_SPLITS, HELD_OUT, SPLIT_NAMES, SPLITS_FILE, read_splits
from medsynth.data.transforms import IntensityMapping
from medsynth.errors import ConfigError, GeometryError, InputError

LAYOUTS: tuple[str, ...] = ("nnunetv2", "msd", "csv")
DATASET_JSON = "dataset.json"
PROMPTS_FILE = "prompts.jsonl"
PREPROCESSING_FILE = "preprocessing.json"
PENDING_DIR = ".medsynth_pending"
"""Present while a :class:`~medsynth.data.writer.DatasetWriter` run has not been finalised."""

# Case ids become file names (CASE_0000.nii.gz), so keep them portable.
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Longest first, so "x.nii.gz" loses ".nii.gz" and not just ".gz".
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mgz", ".mgh", ".mha", ".mhd", ".nrrd",
                                      ".nhdr", ".dcm")


@dataclass
class Case:
    """One scan with its (optional) label map, text and metadata.

    Attributes:
        case_id: unique id; file names derive from it.
        image: the image file (channel 0 for multi-channel datasets), or a DICOM folder.
        label: the label map file, or None (unlabelled test cases).
        prompt: free-text description used for text conditioning.
        metadata: per-case values (modality, age, sex, has_lesion, ...), JSON-friendly.
        split: "train", "val", "test", or None when the dataset has no splits.
        channels: every channel file in channel order (``channels[0] == image``).
        preprocessing: what prepare did to this case (source geometry, intensity record, ...).
    """

    case_id: str
    image: Path
    label: Path | None = None
    prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    channels: tuple[Path, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.label = None if self.label is None else Path(self.label)
        if not self.channels:
            self.channels = (self.image,)


@dataclass
class Dataset:
    """A labelled dataset: its label table, its cases and its fixed splits.

    Attributes:
        root: the dataset folder (for CSV manifests, the CSV's folder).
        name: dataset name.
        layout: "nnunetv2", "msd" or "csv".
        labels: label name -> integer value, ``background`` is 0. Empty when unknown (CSV).
        channel_names: channel index (as string) -> modality name, e.g. ``{"0": "CT"}``.
        file_ending: image file extension (".nii.gz"); "" when mixed (CSV).
        cases: every case, sorted by id.
        splits: ``{"train": [...], "val": [...], "test": [...]}``; empty when none is fixed.
        description: the parsed ``dataset.json`` (empty for CSV), including a ``medsynth`` block
            for prepared datasets.
    """

    root: Path
    name: str
    layout: str
    labels: dict[str, int]
    channel_names: dict[str, str]
    file_ending: str
    cases: list[Case]
    splits: dict[str, list[str]] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def case_ids(self) -> list[str]:
        """Ids of all cases, in order."""
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> Case:
        """The case with this id (ConfigError listing a few known ids otherwise)."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise ConfigError(f"no case {case_id!r} in dataset {self.name!r} ({self.root}); "
                          f"known ids include {self.case_ids[:5]}")

    def cases_for(self, split: str) -> list[Case]:
        """Cases of one split ("train", "val" or "test"), in id order.

        Raises:
            ConfigError: unknown split name.
            InputError: the dataset has no fixed splits (no ``splits.json``).
        """
        if split not in SPLIT_NAMES:
            raise ConfigError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
        if not self.splits:
            raise InputError(f"dataset has no {SPLITS_FILE}; run `medsynth prepare` (or "
                             f"make_splits + write_splits) to fix train/val/test first", self.root)
        wanted = set(self.splits.get(split, []))
        return [c for c in self.cases if c.case_id in wanted]

    def generative_cases(self) -> list[Case]:
        """Train + val cases: the only real cases a generative stage may read.

        The held-out ``test`` split is never returned, so evaluation against it stays honest.
        """
        cases = self.cases_for("train") + self.cases_for("val")
        held_out = set(self.splits.get(HELD_OUT, []))
        leaked = [c.case_id for c in cases if c.case_id in held_out or c.split == HELD_OUT]
        if leaked:  # splits are checked on read, so this means the object was edited in memory
            raise InputError(f"held-out test cases {leaked[:5]} are listed in train/val", self.root)
        return sorted(cases, key=lambda c: c.case_id)

    @property
    def medsynth(self) -> dict[str, Any]:
        """The ``medsynth`` block of ``dataset.json`` (preprocessing settings); {} if absent."""
        return dict(self.description.get("medsynth", {}))

    def intensity_mapping(self, case_id: str) -> IntensityMapping | None:
        """How to map this case's stored image (HU / a.u.) to the model range and back.

        Returns None for datasets that were not prepared by medsynth.
        """
        record = self.case(case_id).preprocessing.get("intensity")
        return None if record is None else IntensityMapping.from_dict(record)

    def validate(self, check_labels: bool = False) -> None:
        """Check that every listed file exists; optionally read labels and check their values.

        Args:
            check_labels: also read each label map (slow) and check that its values are in
                ``labels`` and that its grid matches the image's.

        Raises:
            InputError / GeometryError: naming the first file that does not match.
        """
        for case in self.cases:
            for path in (*case.channels, *([case.label] if case.label else [])):
                if not path.exists():
                    raise InputError(f"case {case.case_id!r}: file is missing", path)
            if case.label is None and case.split in GENERATIVE_SPLITS:
                raise InputError(f"case {case.case_id!r} is in split {case.split!r} but has no label",
                                 case.image)
        if check_labels:
            self._check_label_files()

    def _check_label_files(self) -> None:
        from medsynth.io import read_volume  # the IO stack is only needed for this deep check

        allowed = set(self.labels.values())
        for case in self.cases:
            if case.label is None:
                continue
            label = read_volume(case.label, kind="label")
            values = {int(v) for v in np.unique(label.array)}
            if allowed and not values <= allowed:
                raise InputError(f"label values {sorted(values - allowed)} are not in the dataset's "
                                 f"labels {self.labels}", case.label)
            image = read_volume(case.image, kind="image")
            if not image.same_grid(label, atol=1e-3):
                raise GeometryError(f"case {case.case_id!r}: label grid {label.shape} does not match "
                                    f"image grid {image.shape} (or their affines differ)", case.label)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_dataset(path: str | Path) -> Dataset:
    """Read a dataset folder or CSV manifest; the layout is detected.

    Args:
        path: an nnU-Net v2 or MSD folder (or its ``dataset.json``), or a ``.csv`` file.

    Returns:
        The dataset with prompts, splits and preprocessing records attached when the folder has
        ``prompts.jsonl`` / ``splits.json`` / ``preprocessing.json``.

    Raises:
        InputError: unknown layout, missing keys, or a ``dataset.json`` that does not match its
            folder (the message names the file and the mismatch).
    """
    # Imported here: the layout readers build Case/Dataset objects defined above.
    from medsynth.data import layouts

    path = Path(path)
    if not path.exists():
        raise InputError("dataset not found: expected a dataset folder with dataset.json or a .csv "
                         "manifest", path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return layouts.read_csv_manifest(path)
    if path.is_file() and path.name == DATASET_JSON:
        path = path.parent
    if not path.is_dir():
        raise InputError("not a dataset: expected a folder with dataset.json or a .csv manifest", path)
    if (path / PENDING_DIR).exists():
        raise InputError(f"dataset is incomplete: a run was interrupted before it finished "
                         f"({PENDING_DIR}/ exists); rerun the same command to complete it", path)
    json_path = path / DATASET_JSON
    if not json_path.is_file():
        raise InputError(f"no {DATASET_JSON}: expected an nnU-Net v2 or Medical Segmentation "
                         f"Decathlon folder (or pass a .csv manifest)", path)
    meta = read_json_object(json_path)
    if "channel_names" in meta:
        dataset = layouts.read_nnunet_folder(path, meta)
    elif "modality" in meta or "training" in meta:
        dataset = layouts.read_msd_folder(path, meta)
    else:
        raise InputError(f"unknown dataset.json: nnU-Net v2 needs keys {list(layouts.NNUNET_REQUIRED)}, "
                         f"MSD needs {list(layouts.MSD_REQUIRED)}; found {sorted(meta)}", json_path)
    attach_sidecars(dataset)
    return dataset


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (InputError naming the file otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read JSON: {err}", path) from err
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {type(data).__name__}", path)
    return data


def attach_sidecars(dataset: Dataset) -> None:
    """Fill prompts, metadata, preprocessing records and splits from the folder's sidecars."""
    by_id = {c.case_id: c for c in dataset.cases}
    prompts_path = dataset.root / PROMPTS_FILE
    if prompts_path.is_file():
        for record in read_prompts(prompts_path, by_id):
            case = by_id[record["case_id"]]
            case.prompt = record.get("prompt")
            case.metadata = {**case.metadata, **record.get("metadata", {})}
    prep_path = dataset.root / PREPROCESSING_FILE
    if prep_path.is_file():
        records = read_json_object(prep_path).get("cases", {})
        for case_id, record in records.items():
            if case_id in by_id and isinstance(record, dict):
                by_id[case_id].preprocessing = record
    splits_path = dataset.root / SPLITS_FILE
    if splits_path.is_file():
        record = read_splits(splits_path, by_id)
        apply_splits(dataset, record, splits_path)


def apply_splits(dataset: Dataset, record: Mapping[str, Any], source: Path) -> None:
    """Set ``dataset.splits`` and each case's ``split``, refusing to move held-out cases.

    Cases the layout itself holds out (``imagesTs/``, the MSD ``test`` list) must not appear in
    train or val: that would leak held-out scans into generative training.
    """
    by_id = {c.case_id: c for c in dataset.cases}
    for name in GENERATIVE_SPLITS:
        leaked = [i for i in record[name] if by_id[i].split == HELD_OUT]
        if leaked:
            raise InputError(f"cases {leaked[:5]} are held-out test cases in the folder layout "
                             f"but listed in {name!r}", source)
    dataset.splits = {name: list(record[name]) for name in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        for case_id in record[name]:
            by_id[case_id].split = name


def read_prompts(path: Path, known: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Read ``prompts.jsonl``: one ``{"case_id", "prompt", "metadata"}`` object per line.

    Args:
        path: the file.
        known: when given, every ``case_id`` must be a key of it.

    Raises:
        InputError: a line that is not such an object, a duplicate or unknown case id (the
            message gives the line number).
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read prompts: {err}", path) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"line {number} is not JSON ({err.msg})", path) from err
        if not isinstance(record, dict) or not isinstance(record.get("case_id"), str):
            raise InputError(f"line {number}: expected an object with a string 'case_id' "
                             f"(and 'prompt', 'metadata')", path)
        prompt, metadata = record.get("prompt"), record.get("metadata", {})
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"line {number}: 'prompt' must be a string or null", path)
        if not isinstance(metadata, dict):
            raise InputError(f"line {number}: 'metadata' must be an object", path)
        case_id = record["case_id"]
        if case_id in seen:
            raise InputError(f"line {number}: case {case_id!r} appears twice", path)
        if known is not None and case_id not in known:
            raise InputError(f"line {number}: case {case_id!r} is not in the dataset", path)
        seen.add(case_id)
        records.append({"case_id": case_id, "prompt": prompt, "metadata": metadata})
    return records


def prompts_text(cases: list[Case]) -> str:
    """``prompts.jsonl`` content for ``cases`` (one line each, in the given order)."""
    lines = [json.dumps({"case_id": c.case_id, "prompt": c.prompt, "metadata": c.metadata},
                        sort_keys=False, default=json_value) for c in cases]
    return "".join(line + "\n" for line in lines)


def json_value(value: Any) -> Any:
    """``json.dumps`` default for metadata: numpy scalars, paths and tuples become JSON values."""
    # Metadata often carries numpy scalars (flags computed from arrays, values from pandas).
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def check_case_id(case_id: str, source: str | Path | None = None) -> str:
    """Return ``case_id`` if it is a portable file-name stem, else raise ConfigError."""
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.match(case_id):
        raise ConfigError(f"case id {case_id!r} must start with a letter or digit and contain only "
                          f"letters, digits, '.', '_' and '-'" + (f" (in {source})" if source else ""))
    return case_id


def strip_volume_extension(name: str) -> str:
    """File name without its volume extension: ``liver_3.nii.gz`` -> ``liver_3``."""
    lower = name.lower()
    for ext in VOLUME_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem if "." in name else name


def label_table(raw: Mapping[str, Any], source: Path) -> dict[str, int]:
    """Check a ``name -> int`` label table: integer values, unique, ``background`` (0) present."""
    table: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise InputError(f"label {name!r} is a region {list(value)}; region-based label tables "
                             f"are not supported, give each label one integer value", source)
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not (integer or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise InputError(f"label {name!r} must have an integer value, got {value!r}", source)
        table[str(name)] = int(value)
    values = list(table.values())
    if len(set(values)) != len(values):
        raise InputError(f"label values must be unique, got {table}", source)
    if 0 not in values or any(v < 0 for v in values):
        raise InputError(f"labels need background = 0 and non-negative values, got {table}", source)
    return dict(sorted(table.items(), key=lambda item: item[1]))
