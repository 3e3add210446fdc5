"""``medsynth evaluate --real DIR --synthetic DIR --out DIR``: the evaluation report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from medsynth.errors import ConfigError


def _triple(text: str, kind: type) -> tuple:
    parts = [p for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one value or three (e.g. 1.5 or 1x1x2.5), got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def default_cache_dir() -> Path:
    """``$MEDSYNTH_CACHE/features`` or ``~/.cache/medsynth/features``."""
    root = os.environ.get("MEDSYNTH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "medsynth") / "features"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="compare a synthetic dataset with a real one (FID family, diversity, memorisation, masks)",
        description="Evaluate synthetic volumes against real ones with exact, recorded protocols "
                    "(docs/evaluation.md). Writes report.json, report.md and report.html into --out.")
    p.add_argument("--real", required=True, type=Path, help="real dataset folder (nnU-Net/MSD) or CSV manifest")
    p.add_argument("--synthetic", required=True, type=Path, help="synthetic dataset folder or CSV manifest")
    p.add_argument("--out", required=True, type=Path, help="report folder (created)")
    p.add_argument("--features", action="append", default=[], metavar="NAME=PATH[:SHA256]",
                   help="pretrained extractor with local weights: radimagenet_resnet50, medicalnet_resnet10, "
                        "medicalnet_resnet50 (repeatable). The weight-free defaults always run.")
    p.add_argument("--spacing", type=lambda t: _triple(t, float), default=(1.0, 1.0, 1.0),
                   help="evaluation voxel size in mm (default 1, MAISI)")
    p.add_argument("--size", type=lambda t: _triple(t, int), default=(512, 512, 512),
                   help="evaluation grid in voxels, pad/centre-crop (default 512, MAISI)")
    p.add_argument("--center-ratio", type=float, default=0.4, help="central slice fraction for 2.5D (default 0.4)")
    p.add_argument("--seed", type=int, default=0, help="seed for bootstrap, KID subsets, splits (default 0)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates over volumes (default 200)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--segmentations", type=Path, default=None,
                   help="folder of <case_id>.nii.gz segmentations of the synthetic images for mask fidelity "
                        "(default: the intensity-threshold baseline)")
    p.add_argument("--segmenter", type=Path, default=None,
                   help="trained segmenter for mask fidelity: a pipeline folder (its quality gate's SegResNet, "
                        "from `assemble --segmenter-steps`) or a segmenter export folder")
    p.add_argument("--autoencoder", type=Path, default=None, help="autoencoder export: add reconstruction metrics")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache (default $MEDSYNTH_CACHE/features or ~/.cache/medsynth/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.evaluation.evaluate import EvaluationConfig, evaluate
    from medsynth.evaluation.preprocessing import Protocol
    from medsynth.evaluation.set_metrics import MetricSettings

    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    config = EvaluationConfig(
        real=args.real, synthetic=args.synthetic, out=args.out, features=args.features,
        protocol=Protocol(spacing=args.spacing, size=args.size, center_ratio=args.center_ratio),
        settings=MetricSettings(seed=args.seed, bootstrap=args.bootstrap, kid_subsets=args.kid_subsets,
                                kid_subset_size=args.kid_subset_size),
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        segmentations=args.segmentations, autoencoder=args.autoencoder,
        command="medsynth " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.segmenter is not None and args.segmentations is not None:
        raise ConfigError("give --segmenter or --segmentations, not both")
    report = evaluate(config, None if args.segmenter is None else load_segmenter(args.segmenter))
    print(f"report written to {args.out / 'report.html'}")
    for name, block in report["features"].items():
        fid = block.get("fid", {})
        value = fid.get("mean", fid) if block["kind"] == "2.5d" else fid
        if isinstance(value, dict) and "value" in value:
            print(f"  {name}: FID {value['value']:.4g}")
    return 0


def load_segmenter(path: Path):
    """The trained segmenter of a pipeline folder, or a segmenter export folder.

    Raises:
        InputError: a pipeline without a trained segmenter, or a folder that is neither.
    """
    from medsynth.errors import InputError
    from medsynth.io.checkpoint import file_sha256
    from medsynth.pipelines.pipeline import PIPELINE_FILE, read_pipeline_record
    from medsynth.training.segmentation import load_agreement_segmenter

    if (path / PIPELINE_FILE).is_file():
        component = (read_pipeline_record(path).get("components") or {}).get("segmenter")
        if not component:
            raise InputError("this pipeline has no trained segmenter; assemble it with --segmenter-steps N (N > 0) "
                             "or give a segmenter export folder", path)
        folder = path / component["path"]
        for rel, digest in dict(component.get("files") or {}).items():
            # the judge of mask fidelity must be the one the pipeline recorded
            if not (folder / rel).is_file() or file_sha256(folder / rel) != digest:
                raise InputError("the pipeline's segmenter is missing or does not match the sha256 in "
                                 f"{PIPELINE_FILE}; re-run `medsynth assemble`", folder / rel)
        return load_agreement_segmenter(folder)
    return load_agreement_segmenter(path)
