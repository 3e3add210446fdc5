"""Label commands: ``medsynth labels bank`` (training label maps -> a mask bank for generation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsynth.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    labels = sub.add_parser("labels", help="label maps for mask-conditioned generation",
                            description="Sources of conditioning masks for `medsynth generate`.")
    labels_sub = labels.add_subparsers(dest="labels_command", metavar="SUBCOMMAND")
    labels_sub.required = True
    bank = labels_sub.add_parser("bank", help="collect a dataset's training label maps into a mask bank",
                                 description="Copy the label maps of the train (and optionally val) split into "
                                             "OUT (bank.json + labels/). The test split is never allowed in.")
    bank.add_argument("--data", required=True, type=Path, help="dataset folder (with splits.json)")
    bank.add_argument("--out", required=True, type=Path, help="mask bank folder to write")
    bank.add_argument("--splits", nargs="+", default=["train"], metavar="SPLIT",
                      help="splits to take label maps from: train and/or val (default train)")
    bank.set_defaults(func=run_bank)


def run_bank(args: argparse.Namespace) -> int:
    from medsynth.data.manifest import read_dataset
    from medsynth.pipelines.mask_bank import BANK_SPLITS, MaskBank

    bad = sorted(set(args.splits) - set(BANK_SPLITS))
    if bad:  # before reading anything
        raise ConfigError(f"--splits {bad} refused: a mask bank is built from {list(BANK_SPLITS)} only; the "
                          f"held-out test split must never reach a generative stage")
    bank = MaskBank.build(read_dataset(args.data), tuple(args.splits))
    bank.save(args.out)
    print(f"mask bank with {len(bank)} label maps from splits {list(bank.splits)} written to {args.out}")
    return 0
