"""Stage-3 command: ``medsynth controlnet fit`` (train the mask ControlNet over a frozen DiT export)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medsynth.cli.devices import add_scale_arguments, scale_options
from medsynth.errors import ConfigError
from medsynth.io.config_files import read_config_sections

SECTIONS = ("controlnet", "sampling", "training")


def load_controlnet_config(path: str | Path) -> dict[str, Any]:
    """Parse a ``configs/controlnet/*.yaml`` file and validate its sections (ConfigError naming the file)."""
    from medsynth.training.controlnet import ControlNetTrainingConfig

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/controlnet/ for tiny/base")
    try:
        ControlNetTrainingConfig.from_dict(raw.get("training"))
        control = raw.get("controlnet") or {}
        bad = sorted(set(control) - {"num_blocks", "embed_channels", "image_to_latent_factor"})
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in section controlnet")
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return {k: raw[k] for k in SECTIONS if raw.get(k) is not None}


def register(sub: argparse._SubParsersAction) -> None:
    cn = sub.add_parser("controlnet", help="train the mask ControlNet (paired labels)",
                        description="Stage 3: a ControlNet branch that makes a frozen DiT follow a label map.")
    cn_sub = cn.add_subparsers(dest="controlnet_command", metavar="SUBCOMMAND")
    cn_sub.required = True
    fit = cn_sub.add_parser("fit", help="train a ControlNet for a DiT export on a latent cache and export it",
                            description="Train the ControlNet on the cache's (latent, label) pairs of the train "
                                        "split with the DiT frozen; export the EMA weights to OUT/export.")
    fit.add_argument("--dit", required=True, type=Path, help="DiT export (`medsynth dit fit` OUT/export)")
    fit.add_argument("--cache", required=True, type=Path, help="the latent cache the DiT was trained on")
    fit.add_argument("--config", required=True, type=Path, help="YAML config (configs/controlnet/*.yaml)")
    fit.add_argument("--out", required=True, type=Path, help="run folder: checkpoints/, export/ (the model)")
    fit.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides the config)")
    add_scale_arguments(fit, precision_help="overrides training.precision (bf16-mixed on GPUs that support it)")
    fit.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from medsynth.io.atomic import write_text_atomic

    config = load_controlnet_config(args.config)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.dit.is_dir():
        raise ConfigError(f"--dit folder {args.dit} does not exist; give `medsynth dit fit` OUT/export")
    if not args.cache.is_dir():
        raise ConfigError(f"--cache folder {args.cache} does not exist; make one with `medsynth encode`")
    scale = scale_options(args)
    if scale.precision is not None:
        config["training"] = {**dict(config.get("training") or {}), "precision": scale.precision}

    from medsynth.training.controlnet import fit_controlnet

    start = time.time()
    export = fit_controlnet(args.dit, args.cache, args.out, config, accelerator=scale.accelerator,
                            devices=scale.devices, max_steps=args.max_steps, resume=scale.resume,
                            num_nodes=scale.num_nodes, strategy=scale.strategy or "auto")
    summary = {"export": str(export), "seconds": round(time.time() - start, 1), "config": str(args.config),
               "dit": str(args.dit), "cache": str(args.cache)}
    write_text_atomic(Path(args.out) / "fit_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"trained the ControlNet in {summary['seconds']} s; export: {export}")
    return 0
