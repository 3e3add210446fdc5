"""``medsynth evaluate``: every metric of EVALUATION.md on a real and a synthetic dataset folder.

:func:`evaluate` reads both datasets, prepares every volume with one frozen protocol, extracts
(or loads cached) features, computes the metrics that have enough volumes, and writes
``report.json``, ``report.md`` and ``report.html`` (+ PNG figures) into ``out``.
"""

from __future__ import annotations

import importlib
import logging
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.manifest import Case, Dataset, read_dataset
from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.collect import CaseData, collect_case
from medsynth.evaluation.diversity import pairwise_ms_ssim
from medsynth.evaluation.features import DEFAULT_EXTRACTORS, FeatureCache, FeatureExtractor, build_extractor
from medsynth.evaluation.fid import SQRT_METHOD
from medsynth.evaluation.intensity_stats import class_statistics
from medsynth.evaluation.mask_fidelity import (Segmenter, ThresholdSegmenter, mask_agreement,
                                               summarise_agreement)
from medsynth.evaluation.preprocessing import Protocol
from medsynth.evaluation.privacy import memorisation_audit
from medsynth.evaluation.quality import MIN_TRAINING_CASES, check_medians, fit_intensity_ranges
from medsynth.evaluation.sample_metrics import precision_recall_density_coverage
from medsynth.evaluation.set_metrics import MIN_VOLUMES, MetricSettings, skipped, slice_metrics, volume_metrics
from medsynth.evaluation.weights import parse_weights_spec
from medsynth.io import read_volume
from medsynth.io.volume import Volume

log = logging.getLogger(__name__)
MAX_CEILING_CASES = 20


@dataclass
class EvaluationConfig:
    """Everything that determines a report (all of it is recorded in ``report.json``).

    Attributes:
        real, synthetic: dataset folders (nnU-Net / MSD layout or CSV manifest).
        out: report folder.
        features: ``NAME=PATH[:SHA256]`` pretrained extractors (the weight-free defaults always run).
        protocol: preprocessing (spacing, size, central slice ratio, windows).
        settings: seeds, bootstrap replicates, KID subsets.
        cache_dir: feature cache folder, or None to disable.
        thumb_size: longest side of thumbnails used for MS-SSIM, voxel correlation, galleries.
        max_pairs: MS-SSIM pairs per set.
        segmentations: folder with ``<case_id>.nii.gz`` segmentations of the synthetic images;
            when None the intensity-threshold baseline segments them.
        autoencoder: autoencoder export for reconstruction metrics (optional).
        command: the command line, recorded verbatim.
    """

    real: Path
    synthetic: Path
    out: Path
    features: Sequence[str] = ()
    protocol: Protocol = field(default_factory=Protocol)
    settings: MetricSettings = field(default_factory=MetricSettings)
    cache_dir: Path | None = None
    thumb_size: int = 64
    max_pairs: int = 50
    segmentations: Path | None = None
    autoencoder: Path | None = None
    command: str | None = None


def _modality(dataset: Dataset) -> str:
    return str(next(iter(dataset.channel_names.values()), "unknown")).upper()


def _load(path: Path, role: str) -> Dataset:
    dataset = read_dataset(path)
    if not dataset.cases:
        raise InputError(f"the {role} dataset has no cases; expected images in imagesTr/ or imagesTs/", path)
    return dataset


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "torch", "monai", "nibabel", "SimpleITK", "matplotlib"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except (ImportError, AttributeError):
            out[name] = "unavailable"
    from medsynth import __version__
    out["medsynth"] = __version__
    return out


def _extractors(config: EvaluationConfig) -> list[FeatureExtractor]:
    specs = [parse_weights_spec(text) for text in config.features]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--features names {duplicates} more than once; give each extractor once")
    return [build_extractor(n) for n in DEFAULT_EXTRACTORS] + [build_extractor(s.name, s) for s in specs]


def _embedding_extractor(extractors: Sequence[FeatureExtractor]) -> FeatureExtractor:
    """The volume embedding for PRDC and the audit: a pretrained 3D one if given, else the default."""
    three_d = [e for e in extractors if e.kind == "3d"]
    return next((e for e in three_d if e.weights is not None), three_d[0])


def _embeddings(cases: Sequence[CaseData], name: str) -> np.ndarray:
    return np.concatenate([c.features[name]["volume"] for c in cases]) if cases else np.zeros((0, 1))


def evaluate(config: EvaluationConfig, segmenter: Segmenter | None = None) -> dict[str, Any]:
    """Run the evaluation and write the report folder; returns the report dict.

    Args:
        config: see :class:`EvaluationConfig`.
        segmenter: used for mask fidelity instead of the threshold baseline (a trained
            segmenter plugs in here); ``config.segmentations`` takes precedence.

    Raises:
        InputError / ConfigError: empty or unreadable datasets, mismatched modalities, bad weights.
    """
    real_ds, syn_ds = _load(Path(config.real), "real"), _load(Path(config.synthetic), "synthetic")
    modality, syn_modality = _modality(real_ds), _modality(syn_ds)
    if modality != syn_modality:
        raise ConfigError(f"modalities differ: real {config.real} is {modality}, synthetic {config.synthetic} "
                          f"is {syn_modality}; compare datasets of one modality")
    extractors = _extractors(config)
    cache = FeatureCache(None if config.cache_dir is None else Path(config.cache_dir))
    labels = {n: v for n, v in real_ds.labels.items() if syn_ds.labels.get(n) == v}
    notes: list[str] = []
    if real_ds.labels and labels != real_ds.labels:
        notes.append(f"label tables differ; label metrics use the shared classes {sorted(labels)}")
    rng = np.random.default_rng(config.settings.seed)

    def collect(dataset: Dataset) -> list[CaseData]:
        return [collect_case(c, modality, labels, extractors, config.protocol, cache, config.thumb_size, rng)
                for c in dataset.cases]

    real, syn = collect(real_ds), collect(syn_ds)
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproducibility": {
            "command": config.command, "modality": modality, "sqrt_method": SQRT_METHOD,
            "covariance": "float64, ddof=1", "protocol": config.protocol.to_dict(),
            "seeds": {"metrics": config.settings.seed}, "settings": asdict(config.settings),
            "extractors": [e.record() for e in extractors],
            "real": {"path": str(config.real), "n": len(real), "case_ids": [c.case_id for c in real]},
            "synthetic": {"path": str(config.synthetic), "n": len(syn), "case_ids": [c.case_id for c in syn]},
            "library_versions": _versions(), "platform": platform.platform(),
            "feature_cache": None if config.cache_dir is None else str(config.cache_dir),
            "cache_hits": {"real": sum(c.cached for c in real), "synthetic": sum(c.cached for c in syn)},
            "thumbnail_shape": list(real[0].thumbnail.shape) if real else None,
            "minimum_volumes": MIN_VOLUMES,
        },
        "notes": notes,
    }
    report["features"] = {}
    for extractor in extractors:
        feats_r = [c.features[extractor.name] for c in real]
        feats_s = [c.features[extractor.name] for c in syn]
        fn = slice_metrics if extractor.kind == "2.5d" else volume_metrics
        report["features"][extractor.name] = {"kind": extractor.kind, "comparable": extractor.comparable,
                                              **fn(feats_r, feats_s, config.settings)}
    embedding = _embedding_extractor(extractors)
    emb_r, emb_s = _embeddings(real, embedding.name), _embeddings(syn, embedding.name)
    if min(len(real), len(syn)) >= MIN_VOLUMES["prdc"]:
        report["sample_metrics"] = {"embedding": embedding.name,
                                    **vars(precision_recall_density_coverage(emb_r, emb_s))}
    else:
        report["sample_metrics"] = {"embedding": embedding.name, **skipped("prdc", len(real), len(syn))}
    report["diversity"] = _diversity(real, syn, config)
    report.update(_label_metrics(real_ds, syn_ds, real, syn, labels, config, segmenter))
    report["memorisation"] = _audit(real, syn, emb_r, emb_s, embedding.name, config)
    report["reconstruction"] = _reconstruction(config, real_ds)
    from medsynth.evaluation.report import write_reports  # matplotlib only when writing

    write_reports(report, real, syn, Path(config.out))
    return report


def _diversity(real: Sequence[CaseData], syn: Sequence[CaseData], config: EvaluationConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"metric": "MS-SSIM between random pairs (higher = less diverse)",
                           "grid": "thumbnail of the protocol grid, window mapped to [0, 1]"}
    for name, cases in (("synthetic", syn), ("real", real)):
        if len(cases) >= MIN_VOLUMES["ms_ssim"]:
            out[name] = pairwise_ms_ssim([c.thumbnail for c in cases], config.max_pairs, config.settings.seed)
        else:
            out[name] = skipped("ms_ssim", len(real), len(syn))
    return out


def _label_metrics(real_ds: Dataset, syn_ds: Dataset, real: Sequence[CaseData], syn: Sequence[CaseData],
                   labels: dict[str, int], config: EvaluationConfig, segmenter: Segmenter | None) -> dict[str, Any]:
    """Per-class intensity statistics, the intensity quality check and mask fidelity."""
    if not labels or not any(c.voxels for c in real) or not any(c.voxels for c in syn):
        reason = {"skipped": "needs label maps in both datasets with shared classes"}
        return {"intensity": reason, "quality": reason, "mask_fidelity": reason}
    pooled_r: dict[str, list[np.ndarray]] = {}
    pooled_s: dict[str, list[np.ndarray]] = {}
    for cases, pooled in ((real, pooled_r), (syn, pooled_s)):
        for c in cases:
            for name, values in c.voxels.items():
                pooled.setdefault(name, []).append(values)
    out: dict[str, Any] = {"intensity": {"unit": "HU" if _modality(real_ds) == "CT" else "a.u.",
                                         "classes": class_statistics(pooled_r, pooled_s)}}
    train = [c for c in real if c.split in (None, "train", "val")] or list(real)
    out["quality"] = _quality(train, syn)
    out["mask_fidelity"] = _mask_fidelity(real_ds, syn_ds, train, labels, config, segmenter)
    return out


def _quality(train: Sequence[CaseData], syn: Sequence[CaseData]) -> dict[str, Any]:
    """The intensity quality check of every synthetic case against ranges fit on ``train``.

    A class needs real medians from >= MIN_TRAINING_CASES training volumes for a range; with no
    range at all nothing can be checked, and a pass rate of 1.0 would be a meaningless number,
    so the check is skipped with the minimum named. Cases with no checked class do not count.
    """
    ranges = fit_intensity_ranges(c.medians for c in train)
    n_labelled = sum(1 for c in train if c.medians)
    if not ranges:
        return {"skipped": f"intensity_check needs >= {MIN_TRAINING_CASES} real training volumes with labels "
                           f"per class; got {n_labelled}"}
    checks = {c.case_id: check_medians(c.medians, ranges).to_dict() for c in syn}
    checked = [v["passed"] for v in checks.values() if v["classes"]]
    return {"rule": "class median within mean +/- 3 sd of real training medians, widened to their "
                    "0.5-99.5 percentiles",
            "ranges": {n: asdict(r) for n, r in ranges.items()}, "fit_on": [c.case_id for c in train if c.medians],
            "pass_rate": float(np.mean(checked)) if checked else None, "n_checked": len(checked),
            "cases": checks}


def _read_pair(case: Case) -> tuple[Volume, Volume] | None:
    """Image and label of a case, or None (with a warning) when the label is on another grid.

    :func:`collect_case` already leaves such cases out of the label statistics; mask fidelity
    does the same rather than fail deep inside a metric on arrays of different shapes.
    """
    image, label = read_volume(case.image, kind="image"), read_volume(case.label, kind="label")
    if label.shape != image.shape:
        log.warning("case %s: label grid %s differs from image %s; left out of mask fidelity",
                    case.case_id, label.shape, image.shape)
        return None
    return image, label


def _mask_fidelity(real_ds: Dataset, syn_ds: Dataset, train: Sequence[CaseData], labels: dict[str, int],
                   config: EvaluationConfig, segmenter: Segmenter | None) -> dict[str, Any]:
    train_ids = {c.case_id for c in train}
    left_out: list[str] = []
    if segmenter is None and config.segmentations is None:
        pairs = []
        for c in real_ds.cases:
            if c.case_id in train_ids and c.label is not None:
                if (pair := _read_pair(c)) is None:
                    left_out.append(c.case_id)
                else:
                    pairs.append((pair[0].array, pair[1].array))
        if not pairs:
            return {"skipped": "mask fidelity needs >= 1 real training volume whose label shares its image grid"}
        segmenter = ThresholdSegmenter().fit(pairs, labels, seed=config.settings.seed)

    def real_as_trained(case: Case, image: Volume) -> np.ndarray:
        """A pipeline segmenter applies its fixed mapping; a real MR case was trained on per case."""
        mapping = getattr(segmenter, "intensity", None)
        if mapping is None:  # the threshold segmenter is fitted on the files' own units
            return image.array
        from medsynth.data.patches import image_as_trained

        return image_as_trained(real_ds, case, image.array, mapping)

    def score(case: Case, provided: Path | None, real: bool = False) -> dict[str, Any] | None:
        if case.label is None:
            return None
        if (pair := _read_pair(case)) is None:
            left_out.append(case.case_id)
            return None
        image, label = pair
        if provided is not None:
            if not provided.is_file():
                raise InputError(f"no segmentation for synthetic case {case.case_id!r}; expected "
                                 f"<case_id>.nii.gz in --segmentations", provided)
            prediction = read_volume(provided, kind="label").array
            if prediction.shape != label.shape:
                raise InputError(f"segmentation of {case.case_id!r} has shape {prediction.shape}, its label "
                                 f"{label.shape}; segmentations must be on the synthetic image's grid", provided)
        else:
            array = real_as_trained(case, image) if real else image.array
            prediction = segmenter.predict(array)  # type: ignore[union-attr]
        return mask_agreement(prediction, label.array, labels, image.spacing)

    seg_dir = None if config.segmentations is None else Path(config.segmentations)
    synthetic = {c.case_id: s for c in syn_ds.cases
                 if (s := score(c, None if seg_dir is None else seg_dir / f"{c.case_id}.nii.gz")) is not None}
    out: dict[str, Any] = {
        "segmenter": "provided segmentations" if seg_dir else getattr(segmenter, "name", type(segmenter).__name__),
        "metrics": "MONAI DiceMetric, HausdorffDistanceMetric(percentile=95) in mm, SurfaceDiceMetric (2 mm)",
        "synthetic": summarise_agreement(synthetic), "synthetic_cases": synthetic}
    if seg_dir is None:
        held = [c for c in real_ds.cases if c.case_id not in train_ids] or list(real_ds.cases)
        ceiling = {c.case_id: s for c in held[:MAX_CEILING_CASES] if (s := score(c, None, real=True)) is not None}
        out["real_ceiling"] = summarise_agreement(ceiling)
        out["real_ceiling_cases"] = sorted(ceiling)
    if left_out:
        out["left_out"] = {"cases": sorted(set(left_out)), "reason": "label grid differs from the image grid"}
    return out


def _audit(real: Sequence[CaseData], syn: Sequence[CaseData], emb_r: np.ndarray, emb_s: np.ndarray,
           embedding: str, config: EvaluationConfig) -> dict[str, Any]:
    train_idx = [i for i, c in enumerate(real) if c.split in ("train", "val")]
    held_idx = [i for i, c in enumerate(real) if c.split == "test"]
    if not train_idx:  # no splits: every real case may have been seen in training
        train_idx, held_idx = list(range(len(real))), []
    masks = all(real[i].label_thumbnail is not None for i in train_idx) and all(
        c.label_thumbnail is not None for c in syn)
    result = memorisation_audit(
        emb_r[train_idx], [real[i].case_id for i in train_idx], emb_s, [c.case_id for c in syn],
        emb_r[held_idx] if held_idx else None, [real[i].case_id for i in held_idx],
        train_volumes=[real[i].thumbnail for i in train_idx], synthetic_volumes=[c.thumbnail for c in syn],
        train_masks=[real[i].label_thumbnail for i in train_idx] if masks else None,
        synthetic_masks=[c.label_thumbnail for c in syn] if masks else None)
    return {"embedding": embedding, **result}


def _reconstruction(config: EvaluationConfig, real_ds: Dataset) -> dict[str, Any]:
    """Autoencoder reconstruction metrics (PSNR, SSIM, MAE per class) on the real held-out split."""
    if config.autoencoder is None:
        return {"skipped": "no --autoencoder given"}
    from medsynth.evaluation.reconstruction import evaluate_autoencoder
    from medsynth.io.checkpoint import load_autoencoder

    model, export = load_autoencoder(config.autoencoder, "cpu")
    split = "test" if real_ds.splits and real_ds.cases_for("test") else None
    if split is None:
        return {"skipped": f"{real_ds.root} has no held-out test split to reconstruct"}
    return evaluate_autoencoder(model, export, real_ds.root, split=split, progress=False)


def command_line() -> str:
    """The current process's command line, for the reproducibility record."""
    return " ".join(sys.argv)
