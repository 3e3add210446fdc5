"""Dataset commands: ``medsynth phantoms`` and ``medsynth prepare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsynth.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantoms", help="write a dataset folder of procedural CT/MR phantoms with labels",
        description="Generate procedural phantoms (CT abdomen or MR head) with labels, prompts, "
                    "metadata and rare lesions, as an nnU-Net v2 dataset folder.")
    p.add_argument("--modality", required=True, type=str.lower, choices=("ct", "mr"))
    p.add_argument("--num", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--size", type=int, default=64, help="edge length in voxels (default 64)")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--lesion-rate", type=float, default=0.15,
                   help="probability that a case has a lesion/tumour (default 0.15)")
    p.add_argument("--lesion-size", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="lesion (CT) / tumour core (MR) diameter range in mm, drawn log-uniformly "
                        "(default CT 5 30, MR 8 35; never under two voxels across)")
    p.add_argument("--noise", choices=("fixed", "scanner"), default="fixed",
                   help="noise model: 'fixed' draws the noise SD per voxel at any grid (default); "
                        "'scanner' draws it for 1 mm^3 voxels and scales it with the voxel volume as a "
                        "scanner would (CT 1/sqrt(V), MR 1/V), so coarse grids are nearly noise-free")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_phantoms)

    q = sub.add_parser(
        "prepare", help="build a canonical dataset folder (RAS, target spacing, splits, prompts)",
        description="Read a dataset (nnU-Net v2 or MSD folder, or a CSV manifest) and write a "
                    "canonical nnU-Net v2 folder: RAS orientation, target spacing, crop/pad, label "
                    "remapping, recorded intensity mapping, prompts.jsonl and splits.json.")
    q.add_argument("--input", required=True, type=Path,
                   help="nnU-Net v2 / MSD dataset folder or a CSV manifest (image,label[,prompt,...])")
    q.add_argument("--out", required=True, type=Path, help="output dataset folder")
    q.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                   help="target voxel spacing in mm (default: keep each case's spacing)")
    q.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None,
                   help="intensity mapping to record (default: from dataset.json channel_names)")
    q.add_argument("--multiple-of", type=int, default=8,
                   help="pad each axis to a multiple of this (the latent downsampling; default 8)")
    q.add_argument("--crop", choices=("none", "foreground", "label"), default="none",
                   help="crop to the body (foreground) or the labelled region plus a margin before padding (default none)")
    q.add_argument("--label-map", nargs="*", default=None, metavar="SRC=DST",
                   help="rename/merge labels by name, e.g. kidney_left=kidney kidney_right=kidney")
    q.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split (default 0)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.set_defaults(func=run_prepare)


def parse_label_map(items: list[str] | None) -> dict[str, str] | None:
    """``["a=b", ...]`` -> ``{"a": "b"}``; names the malformed item otherwise."""
    if not items:
        return None
    mapping: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ConfigError(f"--label-map item {item!r} is not SRC=DST (e.g. kidney_left=kidney)")
        mapping[src.strip()] = dst.strip()
    return mapping


def run_phantoms(args: argparse.Namespace) -> int:
    from medsynth.data.phantom_dataset import write_phantom_dataset

    dataset = write_phantom_dataset(args.out, modality=args.modality, num=args.num, size=args.size,
                                    seed=args.seed, lesion_rate=args.lesion_rate,
                                    progress=not args.no_progress, lesion_size_mm=args.lesion_size,
                                    noise=args.noise)
    n_lesion = sum(1 for c in dataset.cases if c.metadata.get("has_lesion"))
    print(f"wrote {len(dataset.cases)} {args.modality.upper()} phantoms ({n_lesion} with a lesion) "
          f"to {dataset.root}")
    print(f"  labels: {', '.join(f'{v}={k}' for k, v in dataset.labels.items())}")
    print(f"  splits: " + ", ".join(f"{k} {len(v)}" for k, v in dataset.splits.items()
                                     if isinstance(v, list)))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from medsynth.data.prepare import prepare_dataset

    if args.multiple_of < 1:
        raise ConfigError(f"--multiple-of must be >= 1, got {args.multiple_of}")
    if args.spacing is not None and min(args.spacing) <= 0:
        raise ConfigError(f"--spacing must be positive millimetres, got {args.spacing}")
    dataset = prepare_dataset(args.input, args.out, spacing=args.spacing, modality=args.modality,
                              crop_pad=args.crop, multiple_of=args.multiple_of,
                              label_map=parse_label_map(args.label_map), splits_seed=args.seed,
                              progress=not args.no_progress)
    print(f"prepared {len(dataset.cases)} cases into {dataset.root}")
    print(f"  splits: " + ", ".join(f"{k} {len(v)}" for k, v in dataset.splits.items()
                                     if isinstance(v, list)))
    return 0
