"""What the real dataset looks like: the statistics a cohort plan matches or checks against.

Only the cases a generative stage may read are used (train + val; the held-out test split never
shapes a synthetic cohort). Per case, from its label map: which lesion classes it holds, how many
lesions (26-connected components), their equivalent-sphere diameters, the largest ball its host
organs can hold, and its voxel spacing; from ``prompts.jsonl`` metadata: sex, age, region and
the prompt text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medsynth.data.manifest import Dataset
from medsynth.io import read_volume

LESION_NAME = re.compile(r"lesion|tumou?r|nodule|cyst|metasta|cancer|mass", re.IGNORECASE)
"""Label names treated as lesions (cleared from drawn masks, counted in statistics)."""
_TOUCH = ndimage.generate_binary_structure(3, 3)


def lesion_values(labels: Mapping[str, int], extra: Iterable[str] = ()) -> dict[str, int]:
    """Lesion labels of a table: names matching :data:`LESION_NAME` plus ``extra`` (the spec's classes)."""
    wanted = set(extra)
    return {n: int(v) for n, v in labels.items() if n != "background" and (n in wanted or LESION_NAME.search(n))}


@dataclass
class RealCase:
    """One real case's facts."""

    case_id: str
    prompt: str | None
    spacing: list[float]
    lesions: dict[str, list[float]] = field(default_factory=dict)  # class -> diameters (mm)
    host_capacity_mm: dict[str, float] = field(default_factory=dict)
    sex: str | None = None
    age: float | None = None
    region: str | None = None


@dataclass
class RealStatistics:
    """Statistics of the real dataset's generative split (train + val)."""

    dataset: str
    root: str
    labels: dict[str, int]
    cases: list[RealCase]

    @property
    def n(self) -> int:
        return len(self.cases)

    def prevalence(self, cls: str) -> float:
        """Fraction of cases holding at least one ``cls`` lesion."""
        return sum(bool(c.lesions.get(cls)) for c in self.cases) / max(self.n, 1)

    def lesion_counts(self, cls: str) -> list[int]:
        """Lesions per case, over the cases that hold ``cls``."""
        return [len(c.lesions[cls]) for c in self.cases if c.lesions.get(cls)]

    def diameters(self, cls: str) -> list[float]:
        return [d for c in self.cases for d in c.lesions.get(cls, [])]

    def host_capacity(self, host: str) -> float:
        """Largest lesion diameter (mm) any real ``host`` organ could hold (0 without one)."""
        return max((c.host_capacity_mm.get(host, 0.0) for c in self.cases), default=0.0)

    def spacings(self) -> list[list[float]]:
        return [c.spacing for c in self.cases]

    def sexes(self) -> Counter:
        return Counter(c.sex for c in self.cases if c.sex is not None)

    def ages(self) -> list[float]:
        return [c.age for c in self.cases if c.age is not None]

    def regions(self) -> Counter:
        return Counter(c.region for c in self.cases if c.region is not None)

    def summary(self, classes: Iterable[str] = ()) -> dict[str, Any]:
        """Compact JSON summary (what plan.json records and the plan printout explains)."""
        out: dict[str, Any] = {"dataset": self.dataset, "root": self.root, "n_cases": self.n,
                               "sex": dict(self.sexes()), "regions": dict(self.regions())}
        ages = self.ages()
        if ages:
            out["age"] = {"min": min(ages), "median": float(np.median(ages)), "max": max(ages)}
        spacings = np.asarray(self.spacings(), dtype=float)
        if len(spacings):
            out["spacing_median"] = [round(float(v), 4) for v in np.median(spacings, axis=0)]
        lesions = {}
        for cls in classes:
            diam = self.diameters(cls)
            lesions[cls] = {"prevalence": round(self.prevalence(cls), 4),
                            "cases": sum(bool(c.lesions.get(cls)) for c in self.cases),
                            "count_histogram": {str(k): v for k, v in sorted(Counter(self.lesion_counts(cls)).items())},
                            "diameter_mm": None if not diam else
                            {"min": round(min(diam), 2), "median": round(float(np.median(diam)), 2),
                             "max": round(max(diam), 2)}}
        out["lesions"] = lesions
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "labels": self.labels,
                "cases": [asdict(c) for c in self.cases]}


def _capacity(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    if not mask.any():
        return 0.0
    # Twice the deepest point: the widest ball the organ could hold at all (an upper bound, so the
    # plan refuses only requests that cannot fit; placement margins are checked at generation).
    return 2.0 * float(ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing).max())


def real_statistics(dataset: Dataset, classes: Iterable[str] = (), hosts: Iterable[str] = (),
                    progress: bool = True) -> RealStatistics:
    """Read every generative case's label once and gather :class:`RealStatistics`.

    Args:
        dataset: the real dataset (with splits: train + val are read; without: every case).
        classes: lesion classes to measure beyond the names :data:`LESION_NAME` recognises.
        hosts: organ labels whose lesion capacity is measured.
        progress: show a progress bar.
    """
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter

    cases = dataset.generative_cases() if dataset.splits else list(dataset.cases)
    lesion_table = lesion_values(dataset.labels, classes)
    host_table = {h: dataset.labels[h] for h in hosts if h in dataset.labels}
    out: list[RealCase] = []
    for case in tqdm(cases, desc="real statistics", unit="case", disable=not progress):
        meta = case.metadata or {}
        age = meta.get("age")
        sex = None if meta.get("sex") is None else str(meta["sex"]).lower()
        real = RealCase(case.case_id, case.prompt, [], sex=sex,
                        age=float(age) if isinstance(age, (int, float)) and not isinstance(age, bool) else None,
                        region=None if meta.get("region") is None else str(meta["region"]).lower())
        if case.label is None:
            real.spacing = [float(s) for s in read_volume(case.image).spacing]
            out.append(real)
            continue
        label = read_volume(case.label, kind="label")
        array = np.asarray(label.array)
        real.spacing = [round(float(s), 6) for s in label.spacing]
        grid = Grid(label.shape, label.spacing)
        for name, value in lesion_table.items():
            components, n = ndimage.label(array == value, structure=_TOUCH)
            if n:
                sizes = np.bincount(components.ravel())[1:]
                real.lesions[name] = [round(equivalent_diameter(int(s), grid), 2) for s in sizes]
        for name, value in host_table.items():
            real.host_capacity_mm[name] = round(_capacity(array == value, label.spacing), 2)
        out.append(real)
    return RealStatistics(dataset.name, str(dataset.root), dict(dataset.labels), out)


__all__ = ["RealStatistics", "RealCase", "real_statistics", "lesion_values", "LESION_NAME"]
