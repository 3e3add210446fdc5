"""``prepare``: any readable dataset -> a canonical, resumable nnU-Net v2 dataset folder.

Per case: read image (+ label), check they share a grid, remap labels by name, reorient to RAS
(exact), resample to the target spacing (cubic B-spline with anti-aliasing for images, nearest
for labels, one shared grid), crop/pad to a multiple of the latent downsampling, write. Images
stay in physical units (HU for CT, scanner units for MR); the intensity mapping to ``[-1, 1]``
is recorded in ``dataset.json`` (``medsynth.intensity``) and per case in ``preprocessing.json``
so that training applies it on the fly and generated volumes map back to HU.

Splits are fixed once, before any case is written, so held-out test cases go to ``imagesTs/``
and no generative stage that reads ``imagesTr/`` can see them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medsynth.data.manifest import Case, Dataset, read_dataset
from medsynth.data.splits import HELD_OUT, SPLIT_NAMES, make_splits
from medsynth.data.transforms import (
    CROP_POLICIES,
    DEFAULT_CT_WINDOW,
    DEFAULT_MR_PERCENTILES,
    IntensityMapping,
    apply_window,
    crop_pad_window,
    label_remapping,
    remap_label_array,
    reorient_to_ras,
    resample_to_grid,
    target_grid,
)
from medsynth.data.writer import GRID_ATOL, DatasetWriter
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io import Volume, read_volume

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("CT", "MR")
PREPARE_FORMAT_VERSION = 1
# Fraction of the model range above its minimum that counts as "not background" for the
# "foreground" crop: CT above -900 HU with the default window, i.e. the body and the table,
# not the air around them (whose noise reaches a few tens of HU above -1000).
FOREGROUND_LEVEL = 0.1
PREPARE_FILE_HINT = "preprocessing.json: cases.<case_id>.intensity"


def prepare_dataset(input: str | Path | Dataset, out: str | Path, *,
                    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
                    modality: str | None = None,
                    crop_pad: str = "none",
                    crop_margin_mm: float = 10.0,
                    multiple_of: int = 8,
                    label_map: Mapping[str, str] | None = None,
                    splits_seed: int = 0,
                    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                    stratify_by: str | None = None,
                    channel: int | str = 0,
                    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
                    mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
                    name: str | None = None,
                    progress: bool = True) -> Dataset:
    """Build a canonical dataset folder from any dataset :func:`read_dataset` accepts.

    Rerunning with the same arguments skips finished cases (their files are not rewritten);
    rerunning into the same folder with different settings raises ConfigError.

    Args:
        input: nnU-Net v2 / MSD folder, CSV manifest, or an already-read :class:`Dataset`.
        out: output folder (nnU-Net v2 layout + prompts.jsonl, splits.json, preprocessing.json).
        spacing: target voxel size in mm ``(x, y, z)`` in RAS, or None to keep each case's grid.
        modality: "CT" or "MR"; None takes it from ``channel_names`` (nnU-Net convention: "CT"
            means CT, any other name MR-like) or, failing that, each case's ``modality`` metadata.
        crop_pad: "none" (keep the field of view), "foreground" (crop to the body: image above
            the background level, plus labels) or "label" (crop to the labelled region); each
            followed by symmetric padding up to ``multiple_of``.
        crop_margin_mm: margin kept around the crop box.
        multiple_of: every output dimension is a multiple of this (latent downsampling factor).
        label_map: source label name -> target label name (merge, rename, drop with
            "background"); unlisted source labels become background.
        splits_seed: seed for :func:`make_splits`.
        split_fractions: train/val/test fractions. Cases the source already holds out (its
            test split, ``imagesTs/``, unlabelled cases) stay test, and the rest is split into
            train/val only.
        stratify_by: a metadata key (e.g. "has_lesion") to stratify the splits by.
        channel: for multi-channel sources, the channel index or name to keep.
        ct_window: CT HU window mapped to ``[-1, 1]`` (recorded, not applied).
        mr_percentiles: MR percentiles mapped to ``[-1, 1]`` (recorded per case, not applied).
        name: output dataset name (default: the source's).
        progress: show a tqdm progress bar.

    Returns:
        The prepared dataset, read back from ``out``.

    Raises:
        InputError: unreadable input, NaN/Inf images, undeclared label values.
        GeometryError: image and label grids differ in the input (the message names the case).
        ConfigError: invalid options, unknown label names, or ``out`` prepared differently.
    """
    source = input if isinstance(input, Dataset) else read_dataset(input)
    out = Path(out)
    if out.resolve() == source.root.resolve():
        raise ConfigError(f"output folder {out} is the input dataset's folder; choose a new folder")
    if crop_pad not in CROP_POLICIES:
        raise ConfigError(f"crop_pad must be one of {list(CROP_POLICIES)}, got {crop_pad!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ConfigError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    if crop_margin_mm < 0:
        raise ConfigError(f"crop_margin_mm must be >= 0, got {crop_margin_mm!r}")
    spacing_list = None if spacing is None else [float(s) for s in spacing]
    if spacing_list is not None and (len(spacing_list) != 3 or not all(s > 0 for s in spacing_list)):
        raise ConfigError(f"spacing must be three positive numbers in mm, got {list(spacing)!r}")
    low_p, high_p = (float(p) for p in mr_percentiles)
    if not 0 <= low_p < high_p <= 100:
        raise ConfigError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {list(mr_percentiles)}")
    channel_index, channel_name = _channel(source, channel)
    dataset_modality = _dataset_modality(modality, channel_name)
    ct_mapping = IntensityMapping.ct_window(ct_window)
    source_labels = source.labels or _scan_label_values(source)
    target_labels, lookup = label_remapping(source_labels, label_map)
    splits = plan_splits(source, fractions=split_fractions, seed=splits_seed, stratify_by=stratify_by)

    settings = {
        "format_version": PREPARE_FORMAT_VERSION,
        "source": {"name": source.name, "layout": source.layout, "channel": channel_name},
        "orientation": "RAS",
        "spacing": spacing_list,
        "interpolation": {"image": "bspline3 (gaussian anti-aliasing when downsampling)",
                          "label": "nearest"},
        "crop_pad": {"policy": crop_pad, "margin_mm": float(crop_margin_mm), "multiple_of": multiple_of},
        "label_map": dict(label_map) if label_map else None,
        "intensity": {
            "applied": False,
            "note": "stored images are in physical units (CT: HU, MR: scanner units); apply "
                    "IntensityMapping.forward when loading, inverse on generated volumes",
            "range": [ct_mapping.out_low, ct_mapping.out_high],
            "CT": ct_mapping.to_dict(),
            "MR": {"kind": "mr_percentiles", "percentiles": [float(p) for p in mr_percentiles],
                   "per_case": PREPARE_FILE_HINT},
        },
    }
    # Resolved for every case before anything is written, so a missing modality fails fast.
    modalities = {c.case_id: dataset_modality or _case_modality(c) for c in source.cases}
    out_channel = channel_name or dataset_modality or "mixed"
    writer = DatasetWriter(out, name=name or source.name, labels=target_labels,
                           channel_names={"0": out_channel}, extra_json={"medsynth": settings})
    test_ids = set(splits[HELD_OUT])
    skipped = 0
    with tqdm(source.cases, desc=f"prepare {source.name}", unit="case", disable=not progress) as bar:
        for case in bar:
            is_test = case.case_id in test_ids
            if writer.has_case(case.case_id):
                if not writer.image_path(case.case_id, is_test).is_file():
                    raise ConfigError(f"case {case.case_id!r} was written as {'train/val' if is_test else 'test'} "
                                      f"by an earlier run but is now {'test' if is_test else 'train/val'} (the "
                                      f"source or split settings changed); use a new output folder")
                skipped += 1
                bar.set_postfix(skipped=skipped)
                continue
            case_modality = modalities[case.case_id]
            image, label, record = prepare_case(
                case, channel_index=channel_index, modality=case_modality, spacing=spacing_list,
                crop_pad=crop_pad, crop_margin_mm=crop_margin_mm, multiple_of=multiple_of, lookup=lookup,
                ct_mapping=ct_mapping, mr_percentiles=mr_percentiles)
            metadata = {**case.metadata, "modality": case_modality}
            writer.add_case(case.case_id, image, label, prompt=case.prompt, metadata=metadata, test=is_test,
                            preprocessing=record, image_dtype=_image_dtype(case_modality, record))
    if skipped:
        logger.info("prepare: %d of %d cases were already done in %s", skipped, len(source.cases), out)
    return writer.finalize({**splits, "seed": splits_seed, "fractions": [float(f) for f in split_fractions],
                            "stratify_by": stratify_by})


def prepare_case(case: Case, *, channel_index: int, modality: str, spacing: Sequence[float] | None,
                 crop_pad: str, crop_margin_mm: float, multiple_of: int, lookup: Mapping[int, int],
                 ct_mapping: IntensityMapping, mr_percentiles: Sequence[float]
                 ) -> tuple[Volume, Volume | None, dict[str, Any]]:
    """Canonicalise one case (see module docstring); nothing is written.

    Returns:
        ``(image, label, record)``: the RAS image ``(X, Y, Z)`` in physical units (float32 once
        resampled), the label map on the same grid (or None) and the JSON record for ``preprocessing.json``.
    """
    image_path = case.channels[channel_index]
    image = read_volume(image_path, kind="image", modality=modality)
    label = read_volume(case.label, kind="label") if case.label is not None else None
    if label is not None:
        if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=GRID_ATOL):
            raise GeometryError(
                f"case {case.case_id!r}: image {image_path.name} (shape {image.shape}, spacing "
                f"{_round(image.spacing)}, orientation {''.join(image.orientation)}) and label "
                f"{case.label.name} (shape {label.shape}, spacing {_round(label.spacing)}, orientation "
                f"{''.join(label.orientation)}) are on different grids; they must share shape and affine",
                case.label)
        label = label.with_array(remap_label_array(label.array, lookup, str(case.label)))
    record: dict[str, Any] = {
        "source_image": str(image_path),
        "source_label": None if case.label is None else str(case.label),
        "source_shape": list(image.shape),
        "source_spacing": _round(image.spacing),
        "source_orientation": "".join(image.orientation),
        "source_dtype": str(image.array.dtype),
        "modality": modality,
    }

    image = reorient_to_ras(image)
    grid = target_grid(image, spacing)
    image = resample_to_grid(image, grid)
    if label is not None:
        label = resample_to_grid(reorient_to_ras(label), grid)

    if modality == "CT":
        mapping = ct_mapping
        image.metadata.intensity_unit = "HU"
    else:
        mapping = IntensityMapping.mr_percentiles(image.array, mr_percentiles, source=str(image_path))
        image.metadata.intensity_unit = "a.u."
    image.metadata.modality = modality

    mask = None
    if crop_pad == "foreground":
        mask = mapping.forward(image.array) > mapping.out_low + FOREGROUND_LEVEL * (mapping.out_high - mapping.out_low)
        if label is not None:
            mask |= label.array > 0
    elif crop_pad == "label" and label is not None:
        mask = label.array > 0
    margin = [math.ceil(crop_margin_mm / s) for s in image.spacing]
    window = crop_pad_window(mask, image.shape, margin=margin, multiple_of=multiple_of)
    # Pad images with their own minimum (air for CT, background for MR), never with 0, which
    # would be water in HU.
    image = apply_window(image, window, fill=float(image.array.min()))
    if label is not None:
        label = apply_window(label, window, fill=0)

    record.update({
        "shape": list(image.shape),
        "spacing": _round(image.spacing),
        "window": [list(w) for w in window],
        "intensity": mapping.to_dict(),
        "label_values": [] if label is None else [int(v) for v in np.unique(label.array)],
    })
    return image, label, record


def plan_splits(source: Dataset, *, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                stratify_by: str | None = None) -> dict[str, list[str]]:
    """Train/val/test ids for prepare.

    Cases the source holds out (split "test", ``imagesTs/``, the MSD test list) and unlabelled
    cases are always test. A source whose splits are complete, with non-empty val and test, is
    kept as it is. Otherwise the remaining cases are split with :func:`make_splits`: into
    train/val only when the source already had a test split, else into train/val/test.
    """
    unlabelled = {c.case_id for c in source.cases if c.label is None}
    held_out = sorted({c.case_id for c in source.cases if c.split == HELD_OUT} | unlabelled)
    complete = all(c.split in SPLIT_NAMES for c in source.cases)
    if complete and any(c.split == "val" for c in source.cases) and any(c.split == HELD_OUT for c in source.cases):
        misplaced = sorted(unlabelled - {c.case_id for c in source.cases if c.split == HELD_OUT})
        if misplaced:
            raise InputError(f"cases {misplaced[:5]} have no label but are in train/val", source.root)
        return {name: sorted(c.case_id for c in source.cases if c.split == name) for name in SPLIT_NAMES}
    rest = [c for c in source.cases if c.case_id not in set(held_out)]
    if not rest:
        raise InputError("no labelled training cases: every case is held out or unlabelled", source.root)
    strata = None
    if stratify_by is not None:
        keys = sorted({k for c in source.cases for k in c.metadata})
        if not any(stratify_by in c.metadata for c in rest):
            raise ConfigError(f"stratify_by={stratify_by!r} is not a metadata key of the cases; "
                              f"available keys: {keys}")
        strata = {c.case_id: c.metadata.get(stratify_by) for c in rest}
    weights = [float(f) for f in fractions]
    if held_out:
        total = weights[0] + weights[1]
        weights = [weights[0] / total, weights[1] / total, 0.0]
    splits = make_splits([c.case_id for c in rest], weights, seed=seed, strata=strata)
    splits[HELD_OUT] = sorted(set(splits[HELD_OUT]) | set(held_out))
    return splits


def _channel(source: Dataset, channel: int | str) -> tuple[int, str | None]:
    names = source.channel_names
    if isinstance(channel, str) and not channel.isdigit():
        matches = [int(k) for k, v in names.items() if v == channel]
        if not matches:
            raise ConfigError(f"channel {channel!r} is not in channel_names {names}")
        index = matches[0]
    else:
        index = int(channel)
    n_channels = max((len(c.channels) for c in source.cases), default=1)
    if not 0 <= index < n_channels:
        raise ConfigError(f"channel {channel!r} is out of range: the dataset has {n_channels} channel(s) {names}")
    return index, names.get(str(index))


def _normalise_modality(value: str, where: str) -> str:
    upper = value.strip().upper()
    if upper == "CT":
        return "CT"
    if upper in ("MR", "MRI"):
        return "MR"
    raise ConfigError(f"{where} must be 'CT' or 'MR', got {value!r}")


def _dataset_modality(modality: str | None, channel_name: str | None) -> str | None:
    if modality is not None:
        return _normalise_modality(modality, "modality")
    if channel_name is None:
        return None
    # nnU-Net's convention: the channel name "CT" selects CT handling; T1, T2, FLAIR, ADC,
    # "MRI", "noNorm"... are treated as MR-like (per-case percentile scaling).
    return "CT" if channel_name.strip().upper() == "CT" else "MR"


def _case_modality(case: Case) -> str:
    value = case.metadata.get("modality")
    if value is None:
        raise ConfigError(f"cannot tell the modality of case {case.case_id!r} ({case.image}): the dataset "
                          f"has no channel_names and the case no 'modality' metadata; pass modality='CT' or 'MR'")
    return _normalise_modality(str(value), f"modality of case {case.case_id!r}")


def _image_dtype(modality: str, record: Mapping[str, Any]) -> str:
    # Whole HU fit int16 at half the size; rounding interpolated values to 1 HU is far below CT noise.
    integer_source = np.issubdtype(np.dtype(record["source_dtype"]), np.integer)
    return "int16" if modality == "CT" and integer_source else "float32"


def _scan_label_values(source: Dataset) -> dict[str, int]:
    """A label table for sources without one (CSV): every value found, named ``label_<value>``."""
    values: set[int] = {0}
    for case in source.cases:
        if case.label is not None:
            values |= {int(v) for v in np.unique(read_volume(case.label, kind="label").array)}
    return {("background" if v == 0 else f"label_{v}"): v for v in sorted(values)}


def _round(values: Sequence[float]) -> list[float]:
    return [round(float(v), 6) for v in values]
