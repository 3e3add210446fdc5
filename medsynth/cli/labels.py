"""Label commands: ``medsynth labels bank`` (training label maps -> a mask bank for generation) and
``medsynth labels fit`` (train the label generator model that makes new label maps)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medsynth.cli.devices import add_scale_arguments, scale_options
from medsynth.errors import ConfigError


def load_label_config(path: str | Path) -> dict[str, Any]:
    """Parse a ``configs/labels/*.yaml`` file and validate every section (ConfigError naming the file)."""
    from medsynth.io.config_files import read_config_sections
    from medsynth.training.label_generator import SECTIONS, parse_label_config

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/labels/ for tiny/base")
    try:
        return parse_label_config(raw)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


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

    fit = labels_sub.add_parser("fit", help="train the label generator (new label maps from text and attributes)",
                                description="Train a label autoencoder and a DiT over its latents on the train "
                                            "split of DATA (never test); export to OUT/export.")
    fit.add_argument("--data", required=True, type=Path, help="dataset folder (with splits.json and labels)")
    fit.add_argument("--config", required=True, type=Path, help="YAML config (configs/labels/*.yaml)")
    fit.add_argument("--out", required=True, type=Path,
                     help="run folder: checkpoints/ (one folder per stage), export/ (the model), fit_summary.json")
    fit.add_argument("--max-steps", type=int, default=None, help="caps the optimiser steps of each stage")
    add_scale_arguments(fit, precision_help="overrides dit_training.precision (the label autoencoder stage "
                                            "always trains in 32-true)",
                        resume_help="a checkpoint of either stage (OUT/checkpoints/autoencoder/last.ckpt or "
                                    "OUT/checkpoints/dit/last.ckpt): training continues from that stage")
    fit.set_defaults(func=run_fit)


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


def run_fit(args: argparse.Namespace) -> int:
    from medsynth.io.atomic import write_text_atomic

    config = load_label_config(args.config)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.data.is_dir():
        raise ConfigError(f"--data folder {args.data} does not exist; give a prepared dataset folder")
    scale = scale_options(args)
    if scale.precision is not None:
        config["dit_training"] = {**dict(config.get("dit_training") or {}), "precision": scale.precision}

    from medsynth.training.label_generator import fit_label_generator

    start = time.time()
    export = fit_label_generator(args.data, args.out, config, accelerator=scale.accelerator, devices=scale.devices,
                                 max_steps=args.max_steps, resume=scale.resume, num_nodes=scale.num_nodes,
                                 strategy=scale.strategy or "auto")
    summary = {"export": str(export), "seconds": round(time.time() - start, 1), "config": str(args.config),
               "data": str(args.data)}
    write_text_atomic(Path(args.out) / "fit_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"trained the label generator in {summary['seconds']} s; export: {export}")
    return 0
