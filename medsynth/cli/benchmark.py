"""``medsynth benchmark seg --real DIR --synthetic DIR --out DIR``: downstream segmentation benchmark.

Trains the same MONAI segmenter on real only, real + synthetic at several ratios and synthetic
only, with the same step budget and several seeds, and scores each on the real test split
(docs/segmentation_benchmark.md). Writes report.json, report.md and report.html into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("benchmark", help="downstream benchmarks of synthetic data (segmentation)",
                           description="Downstream benchmarks: does synthetic data help a model trained on it?")
    bench_sub = bench.add_subparsers(dest="benchmark_command", metavar="SUBCOMMAND")
    bench_sub.required = True
    p = bench_sub.add_parser(
        "seg", help="segmentation benchmark: real only vs real + synthetic vs synthetic only",
        description="Train one MONAI segmenter per condition (real only, real + synthetic at each ratio, "
                    "synthetic only) and seed with the same step budget, score on the real test split only, "
                    "and compare with real only (Wilcoxon, bootstrap CIs). Same command on CPU or GPUs.")
    p.add_argument("--real", required=True, type=Path, help="real dataset folder with splits.json (train/val/test)")
    p.add_argument("--synthetic", required=True, type=Path, help="synthetic dataset folder with paired label maps")
    p.add_argument("--out", required=True, type=Path, help="report folder (created)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                   help="synthetic cases per real training case for the mixed conditions (default 0.5 1 1.5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per training run (default 2000)")
    p.add_argument("--network", default="segresnet", choices=("segresnet", "unet", "swinunetr"))
    p.add_argument("--patch", type=int, default=32, help="cubic patch edge in voxels (default 32; 96-128 on GPUs)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=("constant", "poly"), default="constant",
                   help="constant learning rate (default) or nnU-Net's polynomial decay to 0 over --steps")
    p.add_argument("--augmentation", choices=("none", "standard"), default="none",
                   help="augment training patches: none (default) or standard (rotation, scaling, blur, noise, "
                        "brightness, contrast, gamma; no mirroring, left and right organs are separate classes)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default auto)")
    p.add_argument("--devices", type=_devices, default="auto", help="Lightning devices: auto, 1, 2, ... (default auto)")
    p.add_argument("--precision", default="32-true", help="Lightning precision (default 32-true; bf16-mixed on GPUs)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over test cases (default 1000)")
    p.add_argument("--lesion-classes", nargs="+", default=None,
                   help="classes scored lesion-wise (default: names containing lesion/tumour/tumor/...)")
    p.add_argument("--lesion-criterion", choices=("any", "dice"), default="any",
                   help="a lesion is detected by any overlapping voxel (default) or Dice > 0.1")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_seg)


def run_seg(args: argparse.Namespace) -> int:
    from medsynth import __version__
    from medsynth.data.manifest import read_dataset
    from medsynth.errors import ConfigError
    from medsynth.evaluation.seg_report import write_seg_report
    from medsynth.evaluation.segmentation import run_benchmark
    from medsynth.training.segmentation import SegmenterConfig

    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    config = SegmenterConfig(network=args.network, patch=args.patch, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                             lr_schedule=args.lr_schedule, augmentation=args.augmentation)
    # Read (and check) both folders before any training, so bad input fails in seconds.
    real, synthetic = read_dataset(args.real), read_dataset(args.synthetic)
    report = run_benchmark(real, synthetic, config, ratios=args.ratios, seeds=args.seeds, bootstrap=args.bootstrap,
                           criterion=args.lesion_criterion, lesions=args.lesion_classes, progress=not args.no_progress)
    import lightning
    import monai
    import scipy
    import torch

    report = {"real": str(args.real), "synthetic": str(args.synthetic),
              "command": "medsynth " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **report,
              "notes": ["evaluation uses only the real test split; p-values are not corrected for multiple "
                        "comparisons; Dice is averaged over seeds per case before statistics"],
              "reproducibility": {"medsynth": __version__, "torch": torch.__version__, "monai": monai.__version__,
                                  "lightning": lightning.__version__, "scipy": scipy.__version__}}
    write_seg_report(report, args.out)
    print(f"report written to {args.out / 'report.html'}")
    for name, cond in report["conditions"].items():
        dice = cond["summary"].get("mean_foreground", {}).get("dice", {}).get("value")
        print(f"  {name:<24} mean foreground Dice {dice if dice is None else round(dice, 4)}")
    return 0
