"""Phantom dataset folders for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

from medsynth.data.phantoms import generate_phantoms, phantom_labels
from medsynth.data.writer import DatasetWriter


def write_phantom_dataset(root: Path, n: int, seed: int, size: int = 24, modality: str = "ct",
                          n_test: int = 0, copy_from: Path | None = None) -> Path:
    """An nnU-Net folder of ``n`` phantoms; the last ``n_test`` are held out (imagesTs).

    ``copy_from``: plant that dataset's first training case as an extra case ``copy_0000``.
    """
    writer = DatasetWriter(root, f"phantom_{seed}", phantom_labels(modality), {"0": modality.upper()})
    ids = []
    for i, case in enumerate(generate_phantoms(modality, n, size=size, seed=seed, lesion_rate=0.3)):
        test = i >= n - n_test
        case_id = f"s{seed}_{i:03d}"
        writer.add_case(case_id, case.image, case.label, prompt=case.prompt, test=test)
        ids.append((case_id, test))
    if copy_from is not None:
        from medsynth.data.manifest import read_dataset
        from medsynth.io import read_volume

        source = read_dataset(copy_from).cases_for("train")[0]
        writer.add_case("copy_0000", read_volume(source.image, kind="image"), read_volume(source.label, kind="label"))
        ids.append(("copy_0000", False))
    train = [i for i, t in ids if not t]
    writer.finalize({"train": train, "val": [], "test": [i for i, t in ids if t]})
    return root
