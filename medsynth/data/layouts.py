"""Readers for the three dataset layouts medsynth accepts: nnU-Net v2, MSD, CSV.

Each reader checks that the description matches the files (every image has its label, counts
agree, listed files exist) and raises :class:`~medsynth.errors.InputError` naming the file and the
mismatch, so a broken dataset fails at read time rather than hours into training.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsynth.data.manifest import (
    DATASET_JSON,
    Case,
    Dataset,
    check_case_id,
    label_table,
    strip_volume_extension,
)
from medsynth.data.splits import HELD_OUT, SPLIT_NAMES
from medsynth.errors import InputError

NNUNET_REQUIRED: tuple[str, ...] = ("channel_names", "labels", "numTraining", "file_ending")
MSD_REQUIRED: tuple[str, ...] = ("modality", "labels", "training")
CSV_RESERVED: tuple[str, ...] = ("image", "label", "prompt", "case_id", "split")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ---------------------------------------------------------------------------------------------
# nnU-Net v2
# ---------------------------------------------------------------------------------------------


def read_nnunet_folder(root: Path, meta: Mapping[str, Any]) -> Dataset:
    """Read an nnU-Net v2 raw dataset folder described by ``meta`` (its ``dataset.json``).

    ``imagesTr/CASE_XXXX{file_ending}`` (one file per channel) must each have
    ``labelsTr/CASE{file_ending}`` and vice versa; ``numTraining`` must equal the number of
    training cases. ``imagesTs/`` cases are held out (split "test"); their labels in
    ``labelsTs/`` are optional.
    """
    json_path = root / DATASET_JSON
    missing = [key for key in NNUNET_REQUIRED if key not in meta]
    if missing:
        raise InputError(f"dataset.json misses keys {missing}; nnU-Net v2 needs {list(NNUNET_REQUIRED)}",
                         json_path)
    if "dataset" in meta:
        raise InputError("the 'dataset' key (explicit file lists) is not supported; use the "
                         "imagesTr/labelsTr folder layout", json_path)
    channels = _channel_table(meta["channel_names"], json_path)
    labels = label_table(_mapping(meta["labels"], "labels", json_path), json_path)
    file_ending = str(meta["file_ending"])
    if not file_ending.startswith("."):
        raise InputError(f"file_ending must start with '.', like '.nii.gz', got {file_ending!r}", json_path)

    train = _scan_channels(root / "imagesTr", file_ending, len(channels))
    if not train:
        raise InputError(f"imagesTr/ has no CASE_0000{file_ending} images", root)
    label_files = _scan_labels(root / "labelsTr", file_ending)
    without_label = sorted(set(train) - set(label_files))
    if without_label:
        raise InputError(f"imagesTr/ cases without a label in labelsTr/: {without_label[:5]} "
                         f"(expected labelsTr/{without_label[0]}{file_ending})", root)
    orphans = sorted(set(label_files) - set(train))
    if orphans:
        raise InputError(f"labelsTr/ files without an image in imagesTr/: {orphans[:5]} "
                         f"(expected imagesTr/{orphans[0]}_0000{file_ending})", root)
    if _as_int(meta["numTraining"], "numTraining", json_path) != len(train):
        raise InputError(f"numTraining is {meta['numTraining']} but imagesTr/ has {len(train)} cases",
                         json_path)
    test = _scan_channels(root / "imagesTs", file_ending, len(channels))
    both = sorted(set(train) & set(test))
    if both:
        raise InputError(f"cases {both[:5]} are in both imagesTr/ and imagesTs/", root)
    test_labels = _scan_labels(root / "labelsTs", file_ending)
    orphans = sorted(set(test_labels) - set(test))
    if orphans:
        raise InputError(f"labelsTs/ files without an image in imagesTs/: {orphans[:5]}", root)

    cases = [Case(case_id=i, image=paths[0], label=label_files[i], channels=paths)
             for i, paths in train.items()]
    cases += [Case(case_id=i, image=paths[0], label=test_labels.get(i), channels=paths, split=HELD_OUT)
              for i, paths in test.items()]
    cases.sort(key=lambda c: c.case_id)
    return Dataset(root=root, name=str(meta.get("name", root.name)), layout="nnunetv2", labels=labels,
                   channel_names=channels, file_ending=file_ending, cases=cases, description=dict(meta))


def _scan_channels(folder: Path, file_ending: str, n_channels: int) -> dict[str, tuple[Path, ...]]:
    """``case_id -> channel files`` of an images folder; every channel must be present."""
    if not folder.is_dir():
        return {}
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        # Skip hidden files: macOS "._CASE_0000.nii.gz" resource forks ship inside MSD tarballs.
        if path.name.startswith(".") or not path.name.endswith(file_ending):
            continue
        match = _CHANNEL_SUFFIX.match(path.name[: -len(file_ending)])
        if match is None:
            raise InputError(f"image names must be CASE_XXXX{file_ending} (XXXX = channel, e.g. 0000)",
                             path)
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    out: dict[str, tuple[Path, ...]] = {}
    for case_id, by_channel in found.items():
        check_case_id(case_id, folder)
        absent = [c for c in range(n_channels) if c not in by_channel]
        extra = sorted(set(by_channel) - set(range(n_channels)))
        if absent or extra:
            problem = (f"misses channel file {case_id}_{absent[0]:04d}{file_ending}" if absent
                       else f"has channel {extra[0]:04d} but channel_names lists {n_channels} channel(s)")
            raise InputError(f"case {case_id!r} {problem}", folder)
        out[case_id] = tuple(by_channel[c] for c in range(n_channels))
    return out


def _scan_labels(folder: Path, file_ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(file_ending) and not p.name.startswith(".")}


def _channel_table(raw: Any, source: Path) -> dict[str, str]:
    table = _mapping(raw, "channel_names", source)
    try:
        order = sorted(table, key=int)
    except ValueError as err:
        raise InputError(f"channel_names keys must be channel indices '0', '1', ..., got {sorted(table)}",
                         source) from err
    if [int(k) for k in order] != list(range(len(order))) or not order:
        raise InputError(f"channel_names keys must be 0..N-1, got {order}", source)
    return {str(int(k)): str(table[k]) for k in order}


# ---------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon (and nnU-Net v1)
# ---------------------------------------------------------------------------------------------


def read_msd_folder(root: Path, meta: Mapping[str, Any]) -> Dataset:
    """Read a Medical Segmentation Decathlon folder (``labels``: value -> name, ``training`` list).

    Test entries (no labels) are held out (split "test"). Paths in the lists are relative to the
    folder (``./imagesTr/liver_0.nii.gz``).
    """
    json_path = root / DATASET_JSON
    missing = [key for key in MSD_REQUIRED if key not in meta]
    if missing:
        raise InputError(f"dataset.json misses keys {missing}; the MSD format needs {list(MSD_REQUIRED)}",
                         json_path)
    raw_labels = _mapping(meta["labels"], "labels", json_path)
    # MSD stores value -> name; invert it to the name -> value table used everywhere else.
    inverted: dict[str, Any] = {}
    for value, name in raw_labels.items():
        if str(name) in inverted:
            raise InputError(f"label name {name!r} is used for two values", json_path)
        inverted[str(name)] = value
    if "0" in raw_labels and str(raw_labels["0"]) != "background":
        inverted = {("background" if v in ("0", 0) else k): v for k, v in inverted.items()}
    labels = label_table(inverted, json_path)
    channels = _channel_table(meta["modality"], json_path)
    training = meta["training"]
    if not isinstance(training, list) or not training:
        raise InputError("'training' must be a non-empty list of {\"image\": ..., \"label\": ...}", json_path)

    cases: list[Case] = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(f"training[{index}] must be an object with 'image' and 'label'", json_path)
        image = _listed_file(root, entry["image"], f"training[{index}].image", json_path)
        label = _listed_file(root, entry["label"], f"training[{index}].label", json_path)
        cases.append(Case(case_id=check_case_id(strip_volume_extension(image.name), json_path),
                          image=image, label=label))
    num_training = meta.get("numTraining")
    if num_training is not None and _as_int(num_training, "numTraining", json_path) != len(training):
        raise InputError(f"numTraining is {num_training} but 'training' lists {len(training)} cases", json_path)
    test = meta.get("test", [])
    if not isinstance(test, list):
        raise InputError("'test' must be a list of image paths", json_path)
    for index, entry in enumerate(test):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        image = _listed_file(root, rel, f"test[{index}]", json_path)
        label = None
        if isinstance(entry, dict) and entry.get("label"):
            label = _listed_file(root, entry["label"], f"test[{index}].label", json_path)
        cases.append(Case(case_id=check_case_id(strip_volume_extension(image.name), json_path),
                          image=image, label=label, split=HELD_OUT))
    _refuse_duplicate_ids(cases, json_path)
    cases.sort(key=lambda c: c.case_id)
    ending = next((e for e in (".nii.gz", ".nii") if cases[0].image.name.endswith(e)), cases[0].image.suffix)
    return Dataset(root=root, name=str(meta.get("name", root.name)), layout="msd", labels=labels,
                   channel_names=channels, file_ending=ending, cases=cases, description=dict(meta))


def _listed_file(root: Path, rel: Any, where: str, json_path: Path) -> Path:
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{where} must be a relative path string, got {rel!r}", json_path)
    path = (root / rel).resolve()
    if not path.exists():
        raise InputError(f"{where} lists {rel!r} but {path} does not exist", json_path)
    return path


# ---------------------------------------------------------------------------------------------
# CSV manifest
# ---------------------------------------------------------------------------------------------


def read_csv_manifest(path: Path) -> Dataset:
    """Read a CSV manifest: one row per case.

    Columns: ``image`` (required), ``label``, ``prompt``, ``case_id`` (default: the image file
    name without extension), ``split`` (train/val/test); any other column (modality, age, sex,
    ...) goes into the case's metadata, with numbers parsed and empty cells left out. Relative
    paths are relative to the CSV's folder. The label table is unknown (``labels == {}``).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read CSV manifest: {err}", path) from err
    if "image" not in columns:
        raise InputError(f"CSV manifest needs an 'image' column (optional: label, prompt, case_id, "
                         f"split, metadata columns); found columns {columns}", path)
    folder = path.parent.resolve()
    cases: list[Case] = []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        if not row.get("image"):
            raise InputError(f"line {line}: empty 'image' cell", path)
        image = _csv_path(folder, row["image"], line, "image", path)
        label = _csv_path(folder, row["label"], line, "label", path) if row.get("label") else None
        case_id = check_case_id(row.get("case_id") or strip_volume_extension(image.name), f"{path} line {line}")
        split = row.get("split") or None
        if split is not None and split not in SPLIT_NAMES:
            raise InputError(f"line {line}: split must be one of {list(SPLIT_NAMES)}, got {split!r}", path)
        metadata = {k: _parse_cell(v) for k, v in row.items() if k not in CSV_RESERVED and k and v != ""}
        cases.append(Case(case_id=case_id, image=image, label=label, prompt=row.get("prompt") or None,
                          metadata=metadata, split=split))
    if not cases:
        raise InputError("CSV manifest has no rows", path)
    _refuse_duplicate_ids(cases, path)
    cases.sort(key=lambda c: c.case_id)
    splits: dict[str, list[str]] = {}
    if any(c.split for c in cases):
        splits = {name: [c.case_id for c in cases if c.split == name] for name in SPLIT_NAMES}
    modalities = {str(c.metadata["modality"]) for c in cases if "modality" in c.metadata}
    channels = {"0": modalities.pop()} if len(modalities) == 1 else {}
    return Dataset(root=folder, name=path.stem, layout="csv", labels={}, channel_names=channels,
                   file_ending="", cases=cases, splits=splits, description={})


def _csv_path(folder: Path, cell: str, line: int, column: str, csv_path: Path) -> Path:
    path = Path(cell).expanduser()
    path = path if path.is_absolute() else (folder / path)
    if not path.exists():
        raise InputError(f"line {line}: {column} {cell!r} does not exist ({path})", csv_path)
    return path.resolve()


def _parse_cell(value: str) -> Any:
    """Numbers become int/float (so ``age`` can condition a model); the rest stays text."""
    for parse in (int, float):
        try:
            number = parse(value)
        except ValueError:
            continue
        # "nan"/"inf" parse as floats but are not valid JSON; keep them as text.
        return number if math.isfinite(number) else value
    return value


# ---------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------


def _refuse_duplicate_ids(cases: list[Case], source: Path) -> None:
    first: dict[str, Path] = {}
    for case in cases:
        if case.case_id in first:
            raise InputError(f"case id {case.case_id!r} is used twice ({first[case.case_id]} and "
                             f"{case.image}); give rows a unique case_id", source)
        first[case.case_id] = case.image


def _mapping(value: Any, key: str, source: Path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not value:
        raise InputError(f"{key!r} must be a non-empty object, got {value!r}", source)
    return value


def _as_int(value: Any, key: str, source: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{key!r} must be an integer, got {value!r}", source)
    return value

