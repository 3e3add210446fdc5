"""One pass over a dataset: read each case, prepare it, extract (or load cached) features.

Everything later stages need from a volume is gathered here so each file is read once:
features per extractor, a small normalised thumbnail on the protocol grid (for MS-SSIM,
voxel correlation and galleries), its label thumbnail, per-class voxel samples and medians.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from medsynth.data.manifest import Case
from medsynth.data.transforms import reorient_to_ras, resample_to_grid, target_grid
from medsynth.evaluation.features import FeatureCache, FeatureExtractor
from medsynth.evaluation.intensity_stats import sample_class_voxels
from medsynth.evaluation.preprocessing import Protocol, _pad_crop, is_ct, prepare_volume
from medsynth.evaluation.quality import class_medians
from medsynth.evaluation.weights import sha256_file
from medsynth.io import read_volume

log = logging.getLogger(__name__)


@dataclass
class CaseData:
    """What the evaluation keeps of one volume.

    Attributes:
        case_id, split: from the dataset.
        features: extractor name -> ``{"xy"|"yz"|"zx": (S, D)}`` or ``{"volume": (1, D)}``.
        thumbnail: ``(x, y, z)`` float32 in [0, 1], the protocol grid average-pooled.
        label_thumbnail: the label map on the same thumbnail grid, or None.
        voxels: class name -> sampled intensities (native grid, physical units).
        medians: class name -> median intensity.
        spacing: native voxel size (mm).
        cached: True when all features came from the cache.
    """

    case_id: str
    split: str | None
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    thumbnail: np.ndarray | None = None
    label_thumbnail: np.ndarray | None = None
    voxels: dict[str, np.ndarray] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    cached: bool = False


def thumbnail_factor(protocol: Protocol, thumb_size: int) -> int:
    """Integer pooling factor so the thumbnail's longest side is <= ``thumb_size``."""
    return max(1, int(np.ceil(max(protocol.size) / thumb_size)))


def make_thumbnail(prepared: np.ndarray, modality: str | None, protocol: Protocol, factor: int) -> np.ndarray:
    """``(X, Y, Z)`` prepared volume -> ``(X/f, Y/f, Z/f)`` in [0, 1] (CT: the HU window)."""
    if is_ct(modality):
        low, high = protocol.ct_window
    else:
        low, high = float(prepared.min()), float(prepared.max())
    scaled = (prepared - low) / max(high - low, 1e-6)
    x = torch.from_numpy(np.clip(scaled, 0, 1).astype(np.float32))[None, None]
    if factor > 1:
        x = F.avg_pool3d(x, factor)
    return x[0, 0].numpy()


def _label_thumbnail(label_volume, protocol: Protocol, factor: int) -> np.ndarray:
    ras = reorient_to_ras(label_volume)
    on_grid = resample_to_grid(ras, target_grid(ras, protocol.spacing)).array
    return _pad_crop(on_grid, protocol.size, fill=0)[::factor, ::factor, ::factor].astype(np.int16)


def collect_case(case: Case, modality: str | None, labels: dict[str, int], extractors: Sequence[FeatureExtractor],
                 protocol: Protocol, cache: FeatureCache, thumb_size: int, rng: np.random.Generator) -> CaseData:
    """Read one case and compute everything :class:`CaseData` holds."""
    image = read_volume(case.image, kind="image")
    label = read_volume(case.label, kind="label") if case.label is not None else None
    data = CaseData(case_id=case.case_id, split=case.split, spacing=image.spacing)
    key = cache.key(sha256_file(case.image), modality, protocol)
    stored = cache.load(key)
    prepared = None
    factor = thumbnail_factor(protocol, thumb_size)
    changed = False
    for extractor in extractors:
        prefix = f"{extractor.identity}/"
        found = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
        if not found:
            if prepared is None:
                prepared = prepare_volume(image, modality, protocol)
            found = extractor.extract(prepared, protocol)
            stored.update({prefix + k: v for k, v in found.items()})
            changed = True
        data.features[extractor.name] = found
    thumb_key = f"thumbnail@{factor}"
    if thumb_key not in stored:
        if prepared is None:
            prepared = prepare_volume(image, modality, protocol)
        stored[thumb_key] = make_thumbnail(prepared, modality, protocol, factor)
        changed = True
    data.thumbnail = stored[thumb_key]
    data.cached = not changed
    if changed:
        cache.save(key, stored)
    if label is not None:
        if label.shape != image.shape:
            log.warning("case %s: label grid %s differs from image %s; label metrics skipped",
                        case.case_id, label.shape, image.shape)
        else:
            data.label_thumbnail = _label_thumbnail(label, protocol, factor)
            data.voxels = sample_class_voxels(image.array, label.array, labels, rng)
            data.medians = class_medians(image.array, label.array, labels)
    return data
