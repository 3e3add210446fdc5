"""Evaluation of synthetic volumes: FID family, sample metrics, diversity, memorisation, masks.

Public API:
    evaluate(EvaluationConfig, segmenter=None) -> report dict   (writes report.json/md/html)
    frechet_distance(real (N, D), generated (M, D)) -> float;  fid_infinity(...)
    kernel_inception_distance(real, generated, subsets, subset_size, seed) -> KidResult
    precision_recall_density_coverage(real, generated, k=5) -> PRDC
    bootstrap_indices / bootstrap_volumes (resample volumes, never slices)
    build_extractor(name, WeightsSpec | None) -> FeatureExtractor;  parse_weights_spec("NAME=PATH[:SHA]")
    memorisation_audit(...), pairwise_ms_ssim(...), mask_agreement(...), ThresholdSegmenter
    quality: class_medians / fit_intensity_ranges / check_medians / check_intensities

See docs/evaluation.md for the protocols.
"""

from medsynth.evaluation.fid import SQRT_METHOD, fid_infinity, frechet_distance
from medsynth.evaluation.kid import kernel_inception_distance
from medsynth.evaluation.sample_metrics import precision_recall_density_coverage
from medsynth.evaluation.stats import bootstrap_indices, bootstrap_volumes

__all__ = ["SQRT_METHOD", "bootstrap_indices", "bootstrap_volumes", "fid_infinity", "frechet_distance",
           "kernel_inception_distance", "precision_recall_density_coverage"]
