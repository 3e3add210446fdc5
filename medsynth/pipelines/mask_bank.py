"""Mask bank: training label maps, augmented, as a source of new conditioning masks.

``medsynth labels bank`` collects the label maps of the *training* split into a folder
(``bank.json`` + ``labels/CASE.nii.gz``). Generation then draws a map, deforms it and asks the
ControlNet for a matching image, so each synthetic case has a plausible, never-seen layout.
Only training labels go in: the held-out test split must never reach a generative stage (its
layouts would leak into synthetic data that is later compared against it), so a bank asked for
the test split is refused, and a loaded bank is checked against its own record.

Augmentation keeps labels crisp: every warp is a backward map sampled nearest-neighbour, so the
output holds only values of the input; no interpolated "in-between" labels appear.

* affine: rotation (degrees about each axis) and isotropic scaling about the volume centre, in
  millimetres (so anisotropic voxels rotate correctly);
* elastic: a smooth random displacement field (Gaussian-filtered noise, ``elastic_sigma`` mm
  smoothness, ``elastic_magnitude`` mm amplitude);
* organ scaling: one organ (with whatever it encloses, e.g. its lesions) grows or shrinks about
  its centroid. Freed voxels take the nearest surrounding label; a growing organ only takes
  voxels of the body's filler label (the most common foreground label), so it stays inside the
  body and never eats another organ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medsynth.data.manifest import Dataset
from medsynth.data.splits import HELD_OUT
from medsynth.data.transforms import reorient_to_ras, resample_to_grid
from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import write_json_atomic
from medsynth.io.volume import Volume

BANK_FILE = "bank.json"
BANK_FORMAT = "medsynth.mask_bank"
BANK_VERSION = 1
BANK_SPLITS: tuple[str, ...] = ("train", "val")


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _filler_label(label: np.ndarray) -> int:
    """The most common foreground value (CT: "body"), or 0 when there is no foreground."""
    counts = np.bincount(label[label > 0].ravel().astype(np.int64))
    return int(np.argmax(counts)) if counts.size else 0


def scale_organ(label: np.ndarray, value: int, factor: float) -> np.ndarray:
    """Grow/shrink one organ (with what it encloses) about its centroid; see module docstring.

    Args:
        label: ``(X, Y, Z)`` integer label map.
        value: the organ's label value.
        factor: linear scale (1.2 = 20 % larger along every axis, ~1.73x the volume).

    Returns:
        A new ``(X, Y, Z)`` map with the same dtype and no new values.
    """
    organ = label == value
    if not organ.any() or factor == 1.0:
        return label.copy()
    region = ndimage.binary_fill_holes(organ)  # organ + enclosed structures (lesions)
    centre = np.argwhere(region).mean(axis=0)
    coords = np.indices(label.shape, dtype=np.float32)
    source = [(coords[d] - centre[d]) / factor + centre[d] for d in range(3)]
    inner = np.where(region, label, 0)
    moved = ndimage.map_coordinates(inner, source, order=0, mode="constant", cval=0)  # (X, Y, Z)
    out = label.copy()
    # Freed voxels take the label of the nearest voxel outside the old region.
    _, nearest = ndimage.distance_transform_edt(region, return_indices=True)
    out[region] = label[tuple(idx[region] for idx in nearest)]
    filler = _filler_label(np.where(region, 0, label))
    claim = (moved > 0) & (region | (out == filler)) & (label > 0)  # inside the body, never another organ
    out[claim] = moved[claim]
    return out


def augment_mask(label: np.ndarray, rng: np.random.Generator, *, affine_deg: float = 10.0,
                 scale: tuple[float, float] = (0.9, 1.1), elastic_sigma: float = 12.0,
                 elastic_magnitude: float = 3.0, organ_scale: Mapping[str, float] | None = None,
                 labels: Mapping[str, int] | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Randomly deform a label map, keeping labels crisp (nearest-neighbour sampling).

    Args:
        label: ``(X, Y, Z)`` integer label map.
        rng: randomness (same seed -> same result).
        affine_deg: rotations are drawn uniformly in ``+/- affine_deg`` about each axis.
        scale: isotropic scale drawn uniformly in this range.
        elastic_sigma: smoothness of the displacement field, mm (0 disables elastic).
        elastic_magnitude: typical displacement, mm (0 disables elastic).
        organ_scale: organ name -> linear factor, or name -> ``[lo, hi]`` range to draw from;
            needs ``labels``.
        labels: the label table (name -> value), for ``organ_scale``.
        spacing: voxel size (mm) of ``label``'s axes.

    Returns:
        ``(X, Y, Z)`` map of the same dtype whose values are a subset of the input's.

    Raises:
        ConfigError: bad ranges or unknown organ names (the message lists the labels).
    """
    if not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"expects 0 < scale[0] <= scale[1], but got scale={tuple(scale)}")
    if affine_deg < 0 or elastic_sigma < 0 or elastic_magnitude < 0:
        raise ConfigError(f"expects affine_deg, elastic_sigma, elastic_magnitude >= 0, but got {affine_deg}, "
                          f"{elastic_sigma}, {elastic_magnitude}")
    out = np.asarray(label)
    for name, factor in (organ_scale or {}).items():
        if labels is None or name not in labels or name == "background":
            known = [] if labels is None else sorted(n for n in labels if n != "background")
            raise ConfigError(f"organ_scale names {name!r}, which is not a label; known labels are {known}")
        lo, hi = (factor, factor) if np.isscalar(factor) else tuple(factor)
        if not 0 < lo <= hi:
            raise ConfigError(f"organ_scale[{name!r}] must be a factor > 0 or a range [lo, hi], got {factor!r}")
        out = scale_organ(out, int(labels[name]), float(rng.uniform(lo, hi)))

    spacing_arr = np.asarray(spacing, dtype=np.float64)
    rot = _rotation(rng.uniform(-affine_deg, affine_deg, size=3))
    zoom = float(rng.uniform(*scale))
    centre = (np.asarray(out.shape, dtype=np.float64) - 1) / 2
    # Backward map in mm: source = R^T (target - c) / zoom + c, then back to voxels.
    matrix = (rot.T / zoom) * spacing_arr[None, :] / spacing_arr[:, None]
    coords = np.indices(out.shape, dtype=np.float32).reshape(3, -1)
    source = matrix @ (coords - centre[:, None]) + centre[:, None]
    source = source.reshape(3, *out.shape)
    if elastic_sigma > 0 and elastic_magnitude > 0:
        sigma_vox = elastic_sigma / spacing_arr
        for d in range(3):
            noise = ndimage.gaussian_filter(rng.standard_normal(out.shape).astype(np.float32), sigma_vox, mode="wrap")
            noise /= max(float(noise.std()), 1e-6)
            source[d] += noise * (elastic_magnitude / spacing_arr[d])
    return ndimage.map_coordinates(out, source, order=0, mode="constant", cval=0).astype(out.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The bank
# ---------------------------------------------------------------------------------------------


@dataclass
class MaskBank:
    """Label maps of training cases (RAS, as stored) with their label table.

    Attributes:
        labels: label name -> value.
        case_ids: one id per map.
        volumes: ``label`` Volumes ``(X, Y, Z)`` in RAS orientation.
        splits: the dataset splits the maps came from.
        source: the dataset folder, for the record.
    """

    labels: dict[str, int]
    case_ids: list[str]
    volumes: list[Volume]
    splits: tuple[str, ...] = ("train",)
    source: str = ""
    augment_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.case_ids) != len(self.volumes) or not self.volumes:
            raise InputError(f"a mask bank needs one label map per case id and at least one, got "
                             f"{len(self.volumes)} maps for {len(self.case_ids)} ids")
        bad = sorted(set(self.splits) - set(BANK_SPLITS))
        if bad:
            raise ConfigError(f"a mask bank is built from splits {list(BANK_SPLITS)} only, but got {bad}: the "
                              f"held-out test split must never reach a generative stage")

    def __len__(self) -> int:
        return len(self.volumes)

    @classmethod
    def build(cls, dataset: Dataset, split_names: Sequence[str] = ("train",)) -> "MaskBank":
        """Read the label maps of ``split_names`` (train and/or val) of a dataset.

        Raises:
            ConfigError: a split outside train/val (the test split is held out).
            InputError: no labelled case in those splits, or a test case listed in them.
        """
        split_names = tuple(split_names)
        bad = sorted(set(split_names) - set(BANK_SPLITS))
        if bad or not split_names:
            raise ConfigError(f"a mask bank is built from splits {list(BANK_SPLITS)} only, but got "
                              f"{list(split_names)}: the held-out test split must never reach a generative stage")
        from medsynth.io.reader import read_volume

        held_out = set(dataset.splits.get(HELD_OUT, []))
        cases = [c for split in split_names for c in dataset.cases_for(split)]
        leaked = sorted(c.case_id for c in cases if c.case_id in held_out or c.split == HELD_OUT)
        if leaked:
            raise InputError(f"held-out test cases {leaked[:5]} are listed in {list(split_names)}", dataset.root)
        ids, volumes = [], []
        for case in sorted(cases, key=lambda c: c.case_id):
            if case.label is None:
                continue
            volume = reorient_to_ras(read_volume(case.label, kind="label"))
            ids.append(case.case_id)
            volumes.append(volume)
        if not volumes:
            raise InputError(f"no labelled cases in splits {list(split_names)}", dataset.root)
        return cls(dict(dataset.labels), ids, volumes, split_names, str(dataset.root))

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write ``labels/CASE.nii.gz`` and then ``bank.json`` (last, so a bank.json means complete)."""
        from medsynth.io.nifti import write_volume

        folder = Path(folder)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        for case_id, volume in zip(self.case_ids, self.volumes):
            write_volume(volume, folder / "labels" / f"{case_id}.nii.gz")
        record = {"format": BANK_FORMAT, "version": BANK_VERSION, "source": self.source,
                  "splits": list(self.splits), "labels": self.labels, "case_ids": self.case_ids,
                  "grids": {cid: {"shape": list(v.shape), "spacing": [round(s, 6) for s in v.spacing]}
                            for cid, v in zip(self.case_ids, self.volumes)},
                  "augment_defaults": self.augment_defaults}
        write_json_atomic(folder / BANK_FILE, record)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "MaskBank":
        """Read a bank written by :meth:`save` (InputError naming what is missing or inconsistent)."""
        from medsynth.io.reader import read_volume

        folder = Path(folder)
        path = folder / BANK_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"not a mask bank (no {BANK_FILE}); build one with `medsynth labels bank`",
                             folder) from None
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read the mask bank record ({err})", path) from None
        if not isinstance(record, dict) or record.get("format") != BANK_FORMAT:
            raise InputError(f"not a mask bank record (format should be {BANK_FORMAT!r})", path)
        ids = [str(c) for c in record.get("case_ids", [])]
        volumes = []
        for case_id in ids:
            file = folder / "labels" / f"{case_id}.nii.gz"
            if not file.is_file():
                raise InputError(f"bank.json lists case {case_id!r}, but its label map is missing", file)
            volumes.append(read_volume(file, kind="label"))
        return cls({str(k): int(v) for k, v in record.get("labels", {}).items()}, ids, volumes,
                   tuple(record.get("splits", ("train",))), str(record.get("source", "")),
                   dict(record.get("augment_defaults") or {}))

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, augment: bool = True, target_shape: Sequence[int] | None = None,
               target_spacing: Sequence[float] | None = None, **augment_options: Any) -> Volume:
        """Draw one map, augment it, and put it on a generation grid.

        Args:
            rng: randomness (which case and which deformation).
            augment: apply :func:`augment_mask` (with ``augment_options`` over the bank defaults).
            target_shape: ``(X, Y, Z)`` of the output grid, centred on the map's centre (crop or
                pad); None keeps the field of view.
            target_spacing: output voxel size in mm; None keeps the map's spacing.

        Returns:
            A ``label`` Volume; ``metadata.extra["mask_source"]`` names the bank case.
        """
        index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[index]
        array = volume.array
        if augment:
            options = {**self.augment_defaults, **augment_options}
            array = augment_mask(array, rng, labels=self.labels, spacing=volume.spacing, **options)
        out = volume.with_array(np.ascontiguousarray(array), kind="label")
        if target_shape is not None or target_spacing is not None:
            out = resample_to_grid(out, centred_grid(out, target_shape, target_spacing))
        out.metadata.extra["mask_source"] = {"kind": "bank", "case_id": self.case_ids[index], "augmented": augment}
        return out


def centred_grid(volume: Volume, shape: Sequence[int] | None,
                 spacing: Sequence[float] | None) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with the volume's axis directions and centre, and the given shape and/or spacing.

    A missing spacing is kept; a missing shape covers the same field of view.
    """
    old_spacing = np.asarray(volume.spacing)
    new_spacing = old_spacing if spacing is None else np.asarray([float(s) for s in spacing])
    if new_spacing.shape != (3,) or np.any(new_spacing <= 0):
        raise ConfigError(f"expects 3 positive spacings in mm, but got {spacing!r}")
    if shape is None:
        new_shape = np.maximum(1, np.round(np.asarray(volume.shape) * old_spacing / new_spacing)).astype(int)
    else:
        new_shape = np.asarray([int(s) for s in shape])
        if new_shape.shape != (3,) or np.any(new_shape < 1):
            raise ConfigError(f"expects 3 positive sizes (X, Y, Z), but got {shape!r}")
    centre = volume.affine @ np.append((np.asarray(volume.shape) - 1) / 2, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = volume.direction * new_spacing[None, :]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((new_shape - 1) / 2)
    return tuple(int(n) for n in new_shape), affine  # type: ignore[return-value]


__all__ = ["MaskBank", "augment_mask", "scale_organ", "centred_grid", "BANK_FILE"]
