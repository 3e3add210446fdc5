"""Random 3D patches from a dataset folder, for autoencoder training (Lightning datamodule).

Volumes are read with :func:`medsynth.io.read_volume`, mapped to the model range ``[-1, 1]`` by
the dataset's recorded intensity mapping (CT HU window / MR percentiles), padded to at least one
patch, and cut into random patches with MONAI transforms. With ``cache`` the loaded, normalised
volumes are kept in memory (MONAI ``CacheDataset``), so only the random crop runs per step.
Validation uses one centre patch per case, so its metrics are comparable from step to step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from monai.data import CacheDataset, DataLoader, Dataset as MonaiDataset, list_data_collate
from monai.transforms import (CenterSpatialCropd, Compose, EnsureTyped, MapTransform, RandFlipd,
                              RandSpatialCropSamplesd, SpatialPadd)

from medsynth.data.manifest import Case, Dataset, read_dataset
from medsynth.data.transforms import IntensityMapping
from medsynth.errors import ConfigError, InputError
from medsynth.io import read_volume
from medsynth.models.autoencoder_config import config_from_dict

# Model-range value of padding: -1 is the bottom of the window (air for CT, background for MR).
PAD_VALUE = -1.0


@dataclass
class PatchDataConfig:
    """How patches are drawn.

    Attributes:
        batch_size: volumes per batch; each yields ``patches_per_volume`` patches, so a step sees
            ``batch_size * patches_per_volume`` patches (reading a volume once for several
            patches keeps uncached IO cheap).
        patches_per_volume: random patches cut from each loaded volume.
        cache: keep normalised volumes in memory (fast; needs RAM for the whole train split).
        num_workers: DataLoader worker processes.
        flip: random flips along each axis (p=0.5 each). Off by default: flips swap left/right
            anatomy, which an autoencoder does not need to learn.
        max_val_cases: validate on at most this many val cases (centre patches).
    """

    batch_size: int = 1
    patches_per_volume: int = 2
    cache: bool = True
    num_workers: int = 0
    flip: bool = False
    max_val_cases: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "patches_per_volume", "max_val_cases"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"expects {name} >= 1, but got {name}={getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"expects num_workers >= 0, but got num_workers={self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "PatchDataConfig":
        return config_from_dict(cls, data, "data")


def dataset_modality(dataset: Dataset) -> str | None:
    """"CT", "MR" or None, from ``channel_names`` (first channel) or the medsynth block."""
    block = dataset.medsynth
    mod = block.get("modality") or next(iter(dataset.channel_names.values()), None)
    if mod is None:
        return None
    mod = str(mod).upper()
    if mod in ("CT", "MR", "MRI"):
        return "MR" if mod.startswith("MR") else "CT"
    # nnU-Net channel names such as "T1", "FLAIR" or "T2w" are MR sequences.
    return "MR" if any(mod.startswith(s) for s in ("T1", "T2", "FLAIR", "DWI", "ADC", "PD")) else None


def intensity_mapping_for(dataset: Dataset, case: Case, array: np.ndarray) -> IntensityMapping:
    """The case's recorded mapping; for folders not prepared by medsynth, the default for the
    modality (CT: HU window [-1000, 1000]; MR: 0.5-99.5 percentiles of this case)."""
    mapping = dataset.intensity_mapping(case.case_id)
    if mapping is not None:
        return mapping
    block = dataset.medsynth.get("intensity")
    if isinstance(block, dict) and block.get("kind") == "ct_window":
        return IntensityMapping.from_dict(block)
    mod = dataset_modality(dataset)
    if mod == "CT":
        return IntensityMapping.ct_window()
    if mod == "MR":
        return IntensityMapping.mr_percentiles(array, source=str(case.image))
    raise InputError(f"cannot tell the modality from channel_names {dataset.channel_names}; name the "
                     f"channel 'CT' or 'MR' in dataset.json, or prepare the folder with `medsynth prepare`",
                     dataset.root)


def load_case(dataset: Dataset, case: Case, with_label: bool = True):
    """Read one case for inference: ``(image Volume, model-range array (X, Y, Z) float32,
    IntensityMapping, label array or None)``."""
    volume = read_volume(case.image, kind="image")
    array = np.asarray(volume.array, dtype=np.float32)
    mapping = intensity_mapping_for(dataset, case, array)
    label = None
    if with_label and case.label is not None and Path(case.label).exists():
        label = np.asarray(read_volume(case.label, kind="label").array)
    return volume, np.asarray(mapping.forward(array), dtype=np.float32), mapping, label


def image_as_trained(dataset: Dataset, case: Case, array: np.ndarray, output: IntensityMapping) -> np.ndarray:
    """A real case's image ``(X, Y, Z)`` as the models were trained on it, in ``output``'s units.

    The case's own mapping (the CT window, or per-case percentiles on MR) takes it to the model
    range, then ``output`` (a pipeline's single fixed mapping) back, so anything that applies
    ``output.forward`` (a pipeline's segmenter, its autoencoder) sees exactly the training input.
    For CT this is the file clipped to the window; for MR it removes the scale and bias that vary
    from case to case, which one fixed window cannot.
    """
    array = np.asarray(array, dtype=np.float32)
    own = intensity_mapping_for(dataset, case, array)
    return np.asarray(output.inverse(own.forward(array)), dtype=np.float32)


class LoadCased(MapTransform):
    """MONAI dict transform: ``{"case": Case}`` -> adds ``image`` ``(1, X, Y, Z)`` float32 in
    ``[-1, 1]`` (and ``label`` ``(1, X, Y, Z)`` int when ``with_label``). Deterministic, so
    ``CacheDataset`` caches its output."""

    def __init__(self, dataset: Dataset, with_label: bool = False) -> None:
        super().__init__(keys=["case"])
        self.dataset = dataset
        self.with_label = with_label

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        case: Case = data["case"]
        volume = read_volume(case.image, kind="image")
        array = np.asarray(volume.array, dtype=np.float32)
        mapping = intensity_mapping_for(self.dataset, case, array)
        out = {"case_id": case.case_id,
               "image": np.asarray(mapping.forward(array), dtype=np.float32)[None]}
        if self.with_label and case.label is not None:
            out["label"] = np.asarray(read_volume(case.label, kind="label").array)[None].astype(np.int64)
        return out


def split_cases(dataset: Dataset) -> tuple[list[Case], list[Case]]:
    """Train and val cases; a folder without splits trains on every case and skips validation."""
    if not dataset.splits:
        return list(dataset.cases), []
    train = dataset.cases_for("train")
    if not train:
        raise InputError("the train split is empty; an autoencoder needs training cases", dataset.root)
    return train, dataset.cases_for("val")


class PatchDataModule(L.LightningDataModule):
    """Random training patches and centre validation patches from a dataset folder.

    Batches are dicts with ``image`` ``(B, 1, X, Y, Z)`` in ``[-1, 1]`` (``X, Y, Z`` = patch size).
    """

    def __init__(self, data_dir: str | Path, patch_size: tuple[int, int, int],
                 config: PatchDataConfig | None = None) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.config = config or PatchDataConfig()
        self.dataset = read_dataset(self.data_dir)
        self.train_cases, self.val_cases = split_cases(self.dataset)
        self.val_cases = self.val_cases[: self.config.max_val_cases]
        self._train: MonaiDataset | None = None
        self._val: MonaiDataset | None = None

    def _make(self, cases: list[Case], transforms: Compose) -> MonaiDataset:
        items = [{"case": c} for c in cases]
        if self.config.cache:
            return CacheDataset(items, transforms, progress=False, num_workers=0)
        return MonaiDataset(items, transforms)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        load = LoadCased(self.dataset)
        pad = SpatialPadd(["image"], spatial_size=self.patch_size, value=PAD_VALUE)
        train_t: list = [load, pad, RandSpatialCropSamplesd(["image"], roi_size=self.patch_size,
                                                           num_samples=self.config.patches_per_volume,
                                                           random_size=False)]
        if self.config.flip:
            train_t += [RandFlipd(["image"], prob=0.5, spatial_axis=a) for a in range(3)]
        train_t.append(EnsureTyped(["image"], data_type="tensor", track_meta=False))
        self._train = self._make(self.train_cases, Compose(train_t))
        val_t = Compose([load, pad, CenterSpatialCropd(["image"], roi_size=self.patch_size),
                         EnsureTyped(["image"], data_type="tensor", track_meta=False)])
        self._val = self._make(self.val_cases, val_t) if self.val_cases else None

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._train, batch_size=self.config.batch_size, shuffle=True,
                          num_workers=self.config.num_workers, collate_fn=list_data_collate,
                          drop_last=len(self.train_cases) >= self.config.batch_size,
                          persistent_workers=self.config.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self._val is None:
            return []
        return DataLoader(self._val, batch_size=1, shuffle=False, num_workers=self.config.num_workers,
                          collate_fn=list_data_collate)

    def describe(self) -> dict[str, Any]:
        """What the model is being trained on (recorded in the export's metadata)."""
        spacings = []
        for case in self.train_cases[:10]:
            try:
                spacings.append(read_volume(case.image, kind="image").spacing)
            except InputError:
                continue
        median = [float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None
        first = self.train_cases[0]
        mapping = self.dataset.intensity_mapping(first.case_id)
        block = self.dataset.medsynth.get("intensity")
        if mapping is None and isinstance(block, dict) and block.get("kind") == "ct_window":
            mapping = IntensityMapping.from_dict(block)
        return {"dataset": self.dataset.name, "modality": dataset_modality(self.dataset),
                "spacing": median, "labels": dict(self.dataset.labels),
                "intensity_kind": mapping.kind if mapping else
                ("ct_window" if dataset_modality(self.dataset) == "CT" else "mr_percentiles"),
                "intensity": mapping.to_dict() if mapping and mapping.kind == "ct_window" else None,
                "num_train_cases": len(self.train_cases), "num_val_cases": len(self.val_cases)}


__all__ = ["PatchDataConfig", "PatchDataModule", "LoadCased", "dataset_modality", "image_as_trained",
           "intensity_mapping_for", "split_cases", "load_case", "PAD_VALUE"]
