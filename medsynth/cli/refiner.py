"""Stage-3 command: ``medsynth refiner fit`` (train the mask refiner behind a frozen autoencoder)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medsynth.cli.devices import add_scale_arguments, scale_options
from medsynth.errors import ConfigError
from medsynth.io.config_files import read_config_sections


def load_refiner_config(path: str | Path) -> dict[str, Any]:
    """Parse a ``configs/refiner/*.yaml`` file and validate its sections (ConfigError naming the file)."""
    from medsynth.models.mask_refiner import MaskRefinerConfig
    from medsynth.training.mask_refiner import SECTIONS, MaskRefinerTrainingConfig

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/refiner/ for tiny")
    try:
        MaskRefinerTrainingConfig.from_dict(raw.get("training"))
        model = dict(raw.get("refiner") or {})
        if "num_classes" in model:
            raise ConfigError("refiner.num_classes comes from the dataset's label table; leave it out")
        MaskRefinerConfig.from_dict({**model, "num_classes": 2})
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return {k: raw[k] for k in SECTIONS if raw.get(k) is not None}


def register(sub: argparse._SubParsersAction) -> None:
    ref = sub.add_parser("refiner", help="train the mask refiner (sharper organs where the label map is known)",
                         description="Stage 3: a small full-resolution network that refines decoded images "
                                     "from their label map, for mask-conditioned generation.")
    ref_sub = ref.add_subparsers(dest="refiner_command", metavar="SUBCOMMAND")
    ref_sub.required = True
    fit = ref_sub.add_parser("fit", help="train a refiner behind an autoencoder on a latent cache and export it",
                             description="Decode the cache's train latents (with noise) with the frozen autoencoder "
                                         "and train the refiner to turn (decoded image, label map) into the real "
                                         "image; export the EMA weights to OUT/export.")
    fit.add_argument("--autoencoder", required=True, type=Path,
                     help="autoencoder export (`medsynth autoencoder fit` OUT/model) the cache was encoded with")
    fit.add_argument("--cache", required=True, type=Path, help="latent cache of a labelled dataset (`medsynth encode`)")
    fit.add_argument("--config", required=True, type=Path, help="YAML config (configs/refiner/*.yaml)")
    fit.add_argument("--out", required=True, type=Path, help="run folder: checkpoints/, export/ (the model)")
    fit.add_argument("--data", type=Path, default=None,
                     help="the prepared dataset the cache was encoded from (default: the one cache.json names)")
    fit.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides the config)")
    add_scale_arguments(fit, precision_help="overrides training.precision")
    fit.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from medsynth.io.atomic import write_text_atomic

    config = load_refiner_config(args.config)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    for flag, folder, hint in (("--autoencoder", args.autoencoder, "give `medsynth autoencoder fit` OUT/model"),
                               ("--cache", args.cache, "make one with `medsynth encode`")):
        if not folder.is_dir():
            raise ConfigError(f"{flag} folder {folder} does not exist; {hint}")
    scale = scale_options(args)
    if scale.precision is not None:
        config["training"] = {**dict(config.get("training") or {}), "precision": scale.precision}

    from medsynth.training.mask_refiner import fit_mask_refiner

    start = time.time()
    export = fit_mask_refiner(args.autoencoder, args.cache, args.out, config, data_dir=args.data,
                              accelerator=scale.accelerator, devices=scale.devices, max_steps=args.max_steps,
                              resume=scale.resume, num_nodes=scale.num_nodes, strategy=scale.strategy or "auto")
    summary = {"export": str(export), "seconds": round(time.time() - start, 1), "config": str(args.config),
               "autoencoder": str(args.autoencoder), "cache": str(args.cache)}
    write_text_atomic(Path(args.out) / "fit_summary.json", json.dumps(summary, indent=2) + "\n")
    scores = json.loads((Path(export) / "config.json").read_text(encoding="utf-8"))["metadata"].get("val_scores")
    line = "" if not scores else (f"; val MAE {scores['decoded_mae']} -> {scores['refined_mae']}, PSNR "
                                  f"{scores['decoded_psnr_db']} -> {scores['refined_psnr_db']} dB")
    print(f"trained the mask refiner in {summary['seconds']} s{line}; export: {export}")
    return 0
