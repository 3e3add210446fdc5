"""The user's own masks as conditioning: any geometry in, the generation grid out.

A user mask can come from another scanner, another tool (3D Slicer, ITK-SNAP, TotalSegmentator)
and another label numbering. :func:`map_user_mask` makes it a label map the ControlNet can read:

1. values are mapped *by name* onto the dataset's label table (``dataset.json``), because two
   tools rarely agree on numbers ("liver" is 3 here and 5 there) but do agree on names;
2. the map is resampled nearest-neighbour (labels stay crisp, no new values) onto the
   generation grid, so each label keeps its RAS world position whatever the source
   orientation (LPS, flipped axes) or spacing.

The result is *the* conditioning mask: it is written next to the generated image on the same
grid and affine. Anything that would make the image disobey it silently is refused: labels the
model never saw, empty masks, masks that do not overlap the generation grid.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsynth.data.transforms import Grid, resample_to_grid
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io.volume import Volume

MIN_OVERLAP = 0.5
"""Least fraction of the mask's labelled world volume that must land inside the generation grid."""


def normalise_label_name(name: str) -> str:
    """``"Liver Lesion"``, ``"liver-lesion"`` -> ``"liver_lesion"``: tools differ only in such spelling."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _known(labels: Mapping[str, int]) -> str:
    return ", ".join(f"{n}={v}" for n, v in sorted(labels.items(), key=lambda item: item[1]))


def label_lookup(mask_label_names: Mapping[str, int] | None, dataset_labels: Mapping[str, int],
                 present: Sequence[int]) -> dict[int, int]:
    """Value lookup ``mask value -> dataset value`` for the values ``present`` in a mask.

    Args:
        mask_label_names: the mask's own table (name -> value in the file), or None when the
            file already uses the dataset's values.
        dataset_labels: the model's label table (name -> value, ``background`` = 0).
        present: values occurring in the mask.

    Raises:
        ConfigError: a name or value the model does not know; the message lists the known labels.
    """
    known_values = {int(v) for v in dataset_labels.values()}
    if mask_label_names is None:
        unknown = sorted(int(v) for v in present if int(v) not in known_values)
        if unknown:
            raise ConfigError(f"mask holds label values {unknown} that the model does not know; known labels are "
                              f"{_known(dataset_labels)} (or give the mask's own label names to map them by name)")
        return {int(v): int(v) for v in present}
    by_name = {normalise_label_name(n): int(v) for n, v in dataset_labels.items()}
    lookup = {0: 0}
    unknown_names = []
    for name, value in mask_label_names.items():
        key = normalise_label_name(name)
        if key not in by_name:
            unknown_names.append(str(name))
        else:
            lookup[int(value)] = by_name[key]
    if unknown_names:
        raise ConfigError(f"mask label name(s) {unknown_names} are not labels of this model; known labels are "
                          f"{_known(dataset_labels)}")
    undeclared = sorted(int(v) for v in present if int(v) not in lookup)
    if undeclared:
        raise ConfigError(f"mask holds values {undeclared} that its label names do not declare "
                          f"({dict(mask_label_names)}); name every value, or set unwanted ones to 0")
    return lookup


def _integer_labels(mask: Volume) -> np.ndarray:
    array = np.asarray(mask.array)
    if np.issubdtype(array.dtype, np.bool_):
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError("mask holds non-integer values; a label map needs integer labels "
                             "(was an image given instead of a mask?)", mask.metadata.source)
        array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        raise InputError(f"mask holds negative label value {int(array.min())}; labels are >= 0",
                         mask.metadata.source)
    return array


def map_user_mask(mask: Volume, target_grid: Grid, mask_label_names: Mapping[str, int] | None,
                  dataset_labels: Mapping[str, int], *, min_overlap: float = MIN_OVERLAP) -> Volume:
    """Map a user's label map onto the generation grid and the model's label values.

    Args:
        mask: label map ``(X', Y', Z')`` in any orientation and spacing.
        target_grid: ``(shape, affine)`` of the generated image (RAS affine).
        mask_label_names: name -> value table of the mask file (e.g. its own dataset.json
            ``labels``), or None when it already uses ``dataset_labels``' values.
        dataset_labels: the model's label table (name -> value).
        min_overlap: least fraction of the mask's labelled world volume that must fall inside
            the target grid.

    Returns:
        A ``label`` Volume on exactly ``target_grid`` with dataset label values (uint8/uint16).

    Raises:
        InputError: an empty mask, or non-integer values.
        ConfigError: labels the model never saw (lists the known ones).
        GeometryError: a mask that does not overlap the generation grid (enough).
    """
    source = mask.metadata.source
    array = _integer_labels(mask)
    present = [int(v) for v in np.unique(array)]
    if not any(present):
        raise InputError("mask is empty (every voxel is background); give a mask with at least one label",
                         source)
    lookup = label_lookup(mask_label_names, dataset_labels, present)
    dtype = np.uint8 if max(lookup.values()) < 256 else np.uint16
    mapped = np.zeros(array.shape, dtype=dtype)
    for value in present:
        if lookup[value]:
            mapped[array == value] = lookup[value]
    if not mapped.any():
        raise InputError("mask is empty after label mapping (every label maps to background)", source)

    shape, affine = tuple(int(s) for s in target_grid[0]), np.asarray(target_grid[1], dtype=np.float64)
    labelled = mask.with_array(mapped, kind="label")
    out = resample_to_grid(labelled, (shape, affine))  # nearest neighbour for labels
    out.metadata.orientation = None
    before = float(np.count_nonzero(mapped)) * abs(np.linalg.det(mask.affine[:3, :3]))
    after = float(np.count_nonzero(out.array)) * abs(np.linalg.det(affine[:3, :3]))
    if after == 0 or after < min_overlap * before:
        raise GeometryError(f"only {100 * after / before:.0f}% of the mask's labelled volume lies inside the "
                            f"generation grid {shape} (need >= {100 * min_overlap:.0f}%); check that mask and "
                            f"generation grid share a world frame (affine/origin)", source)
    lost = sorted(set(np.unique(mapped).tolist()) - set(np.unique(out.array).tolist()))
    if lost:
        names = {v: n for n, v in dataset_labels.items()}
        warnings.warn(f"labels {[names.get(v, v) for v in lost]} vanish at the generation grid's spacing "
                      f"(smaller than a voxel or outside the grid)", stacklevel=2)
    return out


def read_label_names(path: str | Path) -> dict[str, int]:
    """A label table from a JSON file: a ``dataset.json`` (its ``labels``) or a plain ``{name: value}``."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read label names ({err})", path) from None
    table = record.get("labels", record) if isinstance(record, dict) else None
    if not isinstance(table, dict) or not table:
        raise InputError('expects a JSON object {"name": value, ...} or a dataset.json with "labels"', path)
    try:
        return {str(k): int(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise InputError(f"label values must be integers, got {table}", path) from None


def read_user_mask(path: str | Path, target_grid: Grid, dataset_labels: Mapping[str, int],
                   label_names: str | Path | Mapping[str, int] | None = None) -> Volume:
    """Read a mask file (any format :func:`medsynth.io.read_volume` reads) and :func:`map_user_mask` it."""
    from medsynth.io.reader import read_volume

    names = read_label_names(label_names) if isinstance(label_names, (str, Path)) else label_names
    return map_user_mask(read_volume(path, kind="label"), target_grid, names, dataset_labels)


__all__ = ["map_user_mask", "read_user_mask", "read_label_names", "label_lookup", "normalise_label_name",
           "MIN_OVERLAP"]
