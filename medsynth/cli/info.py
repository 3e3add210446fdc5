"""``medsynth info PATH``: what a volume file or DICOM folder holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from medsynth.io import Volume

# Label maps with more distinct values than this are listed only partially in text output.
MAX_LABELS_LISTED = 40


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print shape, spacing, orientation, origin and values of a volume",
                       description="Print what a volume file (NIfTI, MGZ, MHA, NRRD, DICOM file or "
                                   "series folder) holds.")
    p.add_argument("path", help="volume file or DICOM series folder")
    p.add_argument("--label", action="store_true",
                   help="read as a label map (lists label values with voxel counts)")
    p.add_argument("--series", default=None,
                   help="DICOM folder with several series: SeriesInstanceUID or SeriesNumber to read")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=run)


def describe(volume: Volume) -> dict[str, Any]:
    """A JSON-friendly summary of a volume: geometry, dtype, value range, labels."""
    array = volume.array
    meta = volume.metadata
    summary: dict[str, Any] = {
        "source": meta.source,
        "kind": volume.kind,
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "orientation": "".join(volume.orientation),
        "original_orientation": "".join(meta.orientation) if meta.orientation else None,
        "origin_ras_mm": [round(v, 4) for v in volume.origin],
        "affine_ras": np.round(volume.affine, 6).tolist(),
        "dtype": str(array.dtype),
        "min": float(array.min()),
        "max": float(array.max()),
        "modality": meta.modality,
        "intensity_unit": meta.intensity_unit,
        "series_uid": meta.series_uid,
        "patient_position": meta.patient_position,
        "manufacturer": meta.manufacturer,
        "synthetic": meta.synthetic,
    }
    if volume.kind == "label":
        values, counts = np.unique(array, return_counts=True)
        summary["labels"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    return summary


def format_text(summary: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`describe`'s output."""
    shape = " x ".join(str(s) for s in summary["shape"])
    spacing = " x ".join(f"{s:g}" for s in summary["spacing_mm"])
    lines = [
        f"source       {summary['source']}",
        f"kind         {summary['kind']}",
        f"shape        {shape} voxels",
        f"spacing      {spacing} mm",
        f"orientation  {summary['orientation']} (array axes, RAS+ world)",
        f"origin       {', '.join(f'{v:.3f}' for v in summary['origin_ras_mm'])} mm (RAS)",
        f"dtype        {summary['dtype']}",
        f"values       {summary['min']:g} .. {summary['max']:g}"
        + (f" {summary['intensity_unit']}" if summary.get("intensity_unit") not in (None, "label") else ""),
        f"modality     {summary['modality'] or 'unknown'}",
    ]
    for key, title in (("series_uid", "series UID"), ("patient_position", "patient pos."),
                       ("manufacturer", "manufacturer")):
        if summary.get(key):
            lines.append(f"{title:<12} {summary[key]}")
    if summary.get("synthetic"):
        lines.append("synthetic    yes")
    if "labels" in summary:
        labels = summary["labels"]
        lines.append(f"labels       {len(labels)} values (value: voxels)")
        for i, (value, count) in enumerate(labels.items()):
            if i == MAX_LABELS_LISTED:
                lines.append(f"  ... {len(labels) - MAX_LABELS_LISTED} more (use --json for all)")
                break
            lines.append(f"  {value:>6}: {count}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medsynth.io import read_volume

    series: str | int | None = args.series
    if series is not None and str(series).isdigit():
        series = int(series)
    volume = read_volume(args.path, kind="label" if args.label else None, series=series)
    summary = describe(volume)
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))
    return 0
