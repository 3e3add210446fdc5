"""Writing a dataset folder in the nnU-Net v2 layout, resumably.

:class:`DatasetWriter` is shared by ``prepare`` (real scans) and the generation stages
(synthetic cohorts). A run can be killed at any moment and rerun: every file is written
atomically, a case's record is saved before its volumes and its label before its image, so an
existing image file means the whole case is there (:meth:`DatasetWriter.has_case`). Per-case
records of an unfinished run live in ``.medsynth_pending/`` until :meth:`DatasetWriter.finalize`
folds them into ``prompts.jsonl`` / ``preprocessing.json`` and removes the folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.manifest import (
    DATASET_JSON,
    PENDING_DIR,
    PREPROCESSING_FILE,
    PROMPTS_FILE,
    Case,
    Dataset,
    check_case_id,
    json_value,
    label_table,
    prompts_text,
    read_dataset,
    read_json_object,
    read_prompts,
)
from medsynth.data.splits import HELD_OUT, SPLIT_NAMES, SPLITS_FILE, read_splits, splits_record
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io import write_volume
from medsynth.io.atomic import write_text_atomic
from medsynth.io.volume import Volume

WRITABLE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
# Image and label affines that differ by less than this (mm / direction cosine) share a grid:
# real files often disagree in the 5th decimal after a round trip through float32 headers.
GRID_ATOL = 1e-3
_SETTINGS_FILE = "settings.json"


class DatasetWriter:
    """Writes cases into an nnU-Net v2 folder and, at the end, its description files.

    Layout written: ``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz`` for train/val
    cases, ``imagesTs/`` + ``labelsTs/`` for held-out test cases, then ``dataset.json``,
    ``prompts.jsonl``, ``splits.json`` and (if any case has one) ``preprocessing.json``.

    Args:
        root: the dataset folder (created if needed).
        name: dataset name for ``dataset.json``.
        labels: label name -> value, with ``background: 0``.
        channel_names: ``{"0": "CT"}`` style channel table (single channel is written).
        file_ending: ".nii.gz" (default) or ".nii".
        extra_json: more top-level ``dataset.json`` keys (e.g. the ``medsynth`` preprocessing
            block). Reopening a folder with different settings raises ConfigError, so a resumed
            run can never mix cases made with different settings.
    """

    def __init__(self, root: str | Path, name: str, labels: Mapping[str, int],
                 channel_names: Mapping[str, str], file_ending: str = ".nii.gz",
                 extra_json: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        if file_ending not in WRITABLE_ENDINGS:
            raise ConfigError(f"file_ending must be one of {WRITABLE_ENDINGS}, got {file_ending!r}")
        if len(channel_names) != 1:
            raise ConfigError(f"the writer stores one channel; channel_names must have one entry, "
                              f"got {dict(channel_names)}")
        self.name = str(name)
        try:
            self.labels = label_table(dict(labels), self.root / DATASET_JSON)
        except InputError as err:
            raise ConfigError(f"DatasetWriter labels: {err.problem}") from None
        self.channel_names = {str(k): str(v) for k, v in channel_names.items()}
        self.file_ending = file_ending
        self.extra_json = json.loads(json.dumps(dict(extra_json or {})))  # plain JSON types only
        reserved = {"name", "channel_names", "labels", "numTraining", "file_ending"} & set(self.extra_json)
        if reserved:
            raise ConfigError(f"extra_json must not set nnU-Net keys {sorted(reserved)}")
        self._pending = self.root / PENDING_DIR
        self._records: dict[str, dict[str, Any]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        self._load_records()

    # -- paths ---------------------------------------------------------------------------------

    def image_path(self, case_id: str, test: bool = False) -> Path:
        """Where a case's image goes (``imagesTr`` or ``imagesTs``)."""
        return self.root / ("imagesTs" if test else "imagesTr") / f"{case_id}_0000{self.file_ending}"

    def label_path(self, case_id: str, test: bool = False) -> Path:
        """Where a case's label map goes (``labelsTr`` or ``labelsTs``)."""
        return self.root / ("labelsTs" if test else "labelsTr") / f"{case_id}{self.file_ending}"

    def has_case(self, case_id: str) -> bool:
        """True when the case is completely written (in either the training or test folders).

        Labels are written before images, so an image file means its label (if any) is there.
        """
        for test in (False, True):
            if self.image_path(case_id, test).is_file():
                return test or self.label_path(case_id, test).is_file()
        return False

    # -- writing -------------------------------------------------------------------------------

    def add_case(self, case_id: str, image: Volume, label: Volume | None = None, prompt: str | None = None,
                 metadata: Mapping[str, Any] | None = None, test: bool = False,
                 preprocessing: Mapping[str, Any] | None = None, image_dtype: str | None = None,
                 overwrite: bool = False) -> None:
        """Write one case atomically.

        Args:
            case_id: unique id (letters, digits, '.', '_', '-').
            image: the image volume ``(X, Y, Z)``.
            label: its label map on the same grid; required unless ``test``.
            prompt: text description for ``prompts.jsonl``.
            metadata: per-case metadata for ``prompts.jsonl`` (JSON-serialisable).
            test: True for held-out test cases (``imagesTs``/``labelsTs``).
            preprocessing: per-case record for ``preprocessing.json``.
            image_dtype: "float32" or "int16" (see :func:`medsynth.io.write_volume`).
            overwrite: replace a complete case; otherwise that is refused.

        Raises:
            GeometryError: image and label grids differ.
            InputError: label values outside ``labels``.
            ConfigError: bad id, missing training label, or an existing case.
        """
        check_case_id(case_id)
        if image.kind != "image" or (label is not None and label.kind != "label"):
            raise ConfigError(f"case {case_id!r}: image must have kind 'image' and label kind 'label'")
        if label is None and not test:
            raise ConfigError(f"case {case_id!r}: training cases need a label (only test cases may omit it)")
        if self.has_case(case_id) and not overwrite:
            raise ConfigError(f"case {case_id!r} is already written in {self.root}; pass overwrite=True "
                              f"to replace it")
        if self.image_path(case_id, not test).exists() or self.label_path(case_id, not test).exists():
            raise ConfigError(f"case {case_id!r} already exists in the "
                              f"{'training' if test else 'test'} folders of {self.root}")
        if label is not None:
            _check_pair(case_id, image, label)
            values = {int(v) for v in np.unique(label.array)}
            unknown = sorted(values - set(self.labels.values()))
            if unknown:
                raise InputError(f"case {case_id!r}: label values {unknown[:10]} are not in the labels "
                                 f"{self.labels}", label.metadata.source)
        record = {"case_id": case_id, "prompt": prompt, "metadata": dict(metadata or {}), "test": bool(test),
                  "preprocessing": dict(preprocessing or {})}
        try:
            text = json.dumps(record, default=json_value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"case {case_id!r}: metadata/preprocessing must be JSON-serialisable ({err})") from None
        self._pending.mkdir(exist_ok=True)
        write_text_atomic(self._pending / f"{case_id}.json", text)
        self.image_path(case_id, test).unlink(missing_ok=True)  # stays "incomplete" until the end
        if label is not None:
            write_volume(label, self.label_path(case_id, test))
        write_volume(image, self.image_path(case_id, test), dtype=image_dtype)
        self._records[case_id] = record

    def finalize(self, splits: Mapping[str, Any] | None = None) -> Dataset:
        """Write ``dataset.json``, ``prompts.jsonl``, ``splits.json`` (and ``preprocessing.json``).

        Files whose content is unchanged are not rewritten, so a rerun that added nothing leaves
        every mtime as it was.

        Args:
            splits: ``{"train": [...], "val": [...], "test": [...]}`` plus optional extras
                (``seed``, ``fractions``, ...). Every written case must be in exactly one split and
                ``test`` must be exactly the cases written with ``test=True``. None keeps a valid
                existing ``splits.json`` or puts every training case in train.

        Returns:
            The dataset as read back from disk.
        """
        train_ids = self._written_ids(test=False)
        test_ids = self._written_ids(test=True)
        all_ids = sorted(train_ids + test_ids)
        record = self._splits_record(splits, train_ids, test_ids)
        dataset_json = {"name": self.name, "channel_names": self.channel_names, "labels": self.labels,
                        "numTraining": len(train_ids), "file_ending": self.file_ending, **self.extra_json}
        cases = [Case(case_id=i, image=self.image_path(i), prompt=self._records.get(i, {}).get("prompt"),
                      metadata=self._records.get(i, {}).get("metadata", {})) for i in all_ids]
        prep = {i: self._records[i]["preprocessing"] for i in all_ids
                if self._records.get(i, {}).get("preprocessing")}
        _write_if_changed(self.root / PROMPTS_FILE, prompts_text(cases))
        if prep:
            _write_if_changed(self.root / PREPROCESSING_FILE,
                              json.dumps({"cases": prep}, indent=2, default=json_value) + "\n")
        _write_if_changed(self.root / SPLITS_FILE, json.dumps(record, indent=2) + "\n")
        # dataset.json last: together with the pending folder's removal it marks completion.
        _write_if_changed(self.root / DATASET_JSON, json.dumps(dataset_json, indent=2) + "\n")
        shutil.rmtree(self._pending, ignore_errors=True)
        return read_dataset(self.root)

    # -- internals -----------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"name": self.name, "channel_names": self.channel_names, "labels": self.labels,
                "file_ending": self.file_ending, **self.extra_json}

    def _check_settings(self) -> None:
        """Refuse to resume into a folder written with other settings."""
        wanted = self._settings()
        for path in (self.root / DATASET_JSON, self._pending / _SETTINGS_FILE):
            if not path.is_file():
                continue
            existing = read_json_object(path)
            existing.pop("numTraining", None)
            if existing != wanted:
                keys = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
                was = {k: existing.get(k) for k in keys}
                now = {k: wanted.get(k) for k in keys}
                raise ConfigError(f"{path} was written with different settings ({was} there, {now} now); "
                                  f"use a new output folder or delete this one")
        self._pending.mkdir(exist_ok=True)
        write_text_atomic(self._pending / _SETTINGS_FILE, json.dumps(wanted, indent=2) + "\n")

    def _load_records(self) -> None:
        """Per-case records from a previous finalize, then from an interrupted run (newer)."""
        prompts = self.root / PROMPTS_FILE
        if prompts.is_file():
            for rec in read_prompts(prompts):
                self._records[rec["case_id"]] = {**rec, "preprocessing": {}}
        prep = self.root / PREPROCESSING_FILE
        if prep.is_file():
            for case_id, rec in read_json_object(prep).get("cases", {}).items():
                self._records.setdefault(case_id, {"case_id": case_id, "prompt": None, "metadata": {}})
                self._records[case_id]["preprocessing"] = rec
        for path in sorted(self._pending.glob("*.json")) if self._pending.is_dir() else []:
            if path.name != _SETTINGS_FILE:
                rec = read_json_object(path)
                self._records[str(rec.get("case_id", path.stem))] = rec

    def _written_ids(self, test: bool) -> list[str]:
        folder = self.root / ("imagesTs" if test else "imagesTr")
        suffix = f"_0000{self.file_ending}"
        ids = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if not p.name.startswith("."))
        return [i for i in ids if self.has_case(i)]

    def _splits_record(self, splits: Mapping[str, Any] | None, train_ids: list[str],
                       test_ids: list[str]) -> dict[str, Any]:
        if splits is None:
            existing = self.root / SPLITS_FILE
            if existing.is_file():
                try:
                    splits = read_splits(existing, train_ids + test_ids)
                except InputError:
                    splits = None
            listed = [] if splits is None else [i for n in SPLIT_NAMES for i in splits[n]]
            if sorted(listed) != sorted(train_ids + test_ids):
                splits = {"train": train_ids, "val": [], "test": test_ids, "seed": None}
        missing = [n for n in SPLIT_NAMES if n not in splits]
        if missing:
            raise ConfigError(f"splits need lists {list(SPLIT_NAMES)}; missing {missing}")
        listed = [i for n in SPLIT_NAMES for i in splits[n]]
        if len(listed) != len(set(listed)):
            raise ConfigError("splits list a case in more than one split")
        written = set(train_ids + test_ids)
        if sorted(listed) != sorted(written):
            extra, absent = sorted(set(listed) - written), sorted(written - set(listed))
            raise ConfigError(f"splits must list every written case once: not written {extra[:5]}, "
                              f"not listed {absent[:5]}")
        if sorted(splits[HELD_OUT]) != test_ids:
            raise ConfigError(f"the {HELD_OUT!r} split must be exactly the cases written with test=True "
                              f"({len(test_ids)} in imagesTs/), got {len(splits[HELD_OUT])} ids")
        extras = {k: v for k, v in splits.items() if k not in (*SPLIT_NAMES, "seed", "held_out")}
        return splits_record({n: splits[n] for n in SPLIT_NAMES}, splits.get("seed"), **extras)


def _check_pair(case_id: str, image: Volume, label: Volume) -> None:
    if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=GRID_ATOL):
        diff = float(np.abs(image.affine - label.affine).max()) if image.shape == label.shape else None
        detail = (f"shapes {image.shape} vs {label.shape}" if diff is None
                  else f"affines differ by up to {diff:.3g} mm")
        raise GeometryError(f"case {case_id!r}: image and label grids differ ({detail}); resample the "
                            f"label onto the image grid first", label.metadata.source or image.metadata.source)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)
