"""Phantom dataset folders: the embedded default data, written like real data.

``medsynth phantoms`` and the demo call :func:`write_phantom_dataset`, which writes phantoms
into an nnU-Net v2 folder with ``prompts.jsonl``, ``splits.json`` (held-out test cases in
``imagesTs/``) and the CT HU window / MR percentile mapping recorded in ``dataset.json``.
Splits are stratified by whether a case carries a lesion, so the rare class lands in every
split whenever there are enough lesion cases. Reruns skip finished cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medsynth.data.manifest import Dataset
from medsynth.data.phantoms import (
    generate_phantom,
    generate_phantoms,
    phantom_case_id,
    phantom_case_seed,
    phantom_labels,
    phantom_lesion_planned,
)
from medsynth.data.splits import make_splits
from medsynth.data.transforms import IntensityMapping
from medsynth.data.writer import DatasetWriter
from medsynth.errors import ConfigError

SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)


def phantom_splits(num: int, seed: int, lesion_rate: float) -> dict[str, list[str]]:
    """Train/val/test case ids for ``num`` phantoms, stratified by planned lesion presence."""
    ids = [phantom_case_id(i) for i in range(num)]
    strata = {case_id: phantom_lesion_planned(phantom_case_seed(seed, i), lesion_rate)
              for i, case_id in enumerate(ids)}
    return make_splits(ids, SPLIT_FRACTIONS, seed=seed, strata=strata)


def write_phantom_dataset(out: str | Path, *, modality: str, num: int, size: int = 64, seed: int = 0,
                          lesion_rate: float = 0.15, progress: bool = True,
                          lesion_size_mm: Sequence[float] | None = None, noise: str = "fixed") -> Dataset:
    """Generate ``num`` phantoms into the dataset folder ``out`` and return it, read back.

    Args:
        out: dataset folder (created; a rerun with the same arguments resumes).
        modality: "ct" (abdomen) or "mr" (head).
        num: number of cases, >= 3 (one per split).
        size: edge length in voxels.
        seed: dataset seed; case ``i`` depends only on ``(seed, i)``.
        lesion_rate: probability that a case carries lesions/tumours.
        progress: show a progress bar.
        lesion_size_mm: ``(min, max)`` lesion / tumour core diameter in mm (default: the
            modality's range, see :func:`medsynth.data.phantoms.generate_phantom`).
        noise: phantom noise model, "fixed" or "scanner" (see
            :func:`medsynth.data.phantoms.generate_phantom`).

    Raises:
        ConfigError: invalid arguments (checked before anything is written), or ``out`` holds a
            dataset written with other settings.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 3:
        raise ConfigError(f"--num must be an integer >= 3 (one case per train/val/test split), got {num!r}")
    # generate_phantoms validates modality, size, seed and rate eagerly: nothing is written on
    # a bad call. Cases are then made one by one so that a resumed run skips finished ones.
    generate_phantoms(modality, num, size=size, seed=seed, lesion_rate=lesion_rate,
                      lesion_size_mm=lesion_size_mm, noise=noise)
    modality = modality.lower()
    out = Path(out)
    splits = phantom_splits(num, seed, lesion_rate)
    test_ids = set(splits["test"])
    mapping = IntensityMapping.ct_window() if modality == "ct" else None
    settings: dict[str, Any] = {"num": num, "size": size, "seed": seed, "lesion_rate": lesion_rate}
    if lesion_size_mm is not None:  # only when asked for, so default folders written before resume
        settings["lesion_size_mm"] = [float(v) for v in lesion_size_mm]
    if noise != "fixed":
        settings["noise"] = noise
    medsynth_block = {"source": "medsynth phantoms", "synthetic": True, "modality": modality.upper(),
                      "phantoms": settings,
                      "intensity": mapping.to_dict() if mapping is not None else
                      {"kind": "mr_percentiles", "per_case": True}}
    writer = DatasetWriter(out, name=f"phantoms_{modality}", labels=phantom_labels(modality),
                           channel_names={"0": modality.upper()}, extra_json={"medsynth": medsynth_block})
    with tqdm(total=num, desc=f"phantoms ({modality.upper()} {size}^3)", unit="case",
              disable=not progress) as bar:
        for index in range(num):
            case_id = phantom_case_id(index)
            if writer.has_case(case_id):
                bar.update(1)
                continue
            case = generate_phantom(modality, size, phantom_case_seed(seed, index), lesion_rate,
                                    lesion_size_mm=lesion_size_mm, noise=noise)
            case.metadata.update(index=index, case_id=case_id, dataset_seed=seed)
            preprocessing = None
            if modality == "mr":
                preprocessing = {"intensity": IntensityMapping.mr_percentiles(case.image.array).to_dict()}
            writer.add_case(case_id, case.image, case.label, prompt=case.prompt, metadata=case.metadata,
                            test=case_id in test_ids, preprocessing=preprocessing)
            bar.update(1)
    return writer.finalize(splits={**splits, "seed": seed, "stratified_by": "lesion_planned"})
