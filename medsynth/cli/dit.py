"""Stage-2 command: ``medsynth dit fit`` (train the latent DiT on a latent cache and export it)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medsynth.cli.devices import add_scale_arguments, scale_options
from medsynth.errors import ConfigError
from medsynth.io.config_files import read_config_sections

SECTIONS = ("model", "text_encoder", "objective", "sampling", "training")


def load_dit_config(path: str | Path) -> dict[str, Any]:
    """Parse a ``configs/dit/*.yaml`` file and validate every section.

    Returns the plain dict sections (as :func:`medsynth.training.dit.fit_dit` takes them).

    Raises:
        ConfigError: a missing file, bad YAML, unknown sections or keys, invalid values; the
            message names the file.
    """
    from medsynth.diffusion.schedulers import check_objective, make_scheduler
    from medsynth.models.dit import DiTConfig

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/dit/ for tiny/s/b/l")
    # Light imports only: the training module (and Lightning) loads when training starts.
    from medsynth.training.dit import DiTTrainingConfig

    try:
        DiTConfig.from_dict(raw.get("model"))
        DiTTrainingConfig.from_dict(raw.get("training"))
        objective = dict(raw.get("objective") or {"name": "rectified_flow"})
        sampling = dict(raw.get("sampling") or {})
        make_scheduler(check_objective(objective.get("name", "rectified_flow")), sampling.get("sampler"),
                       shift=float(sampling.get("shift", 1.0)))
        text = raw.get("text_encoder") or {}
        if not isinstance(text, dict) or text.get("kind", "vocab") not in ("vocab", "hf"):
            raise ConfigError(f"text_encoder.kind must be 'vocab' or 'hf', got {text!r}")
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return {k: raw[k] for k in SECTIONS if raw.get(k) is not None}


def register(sub: argparse._SubParsersAction) -> None:
    dit = sub.add_parser("dit", help="train the stage-2 latent diffusion transformer",
                         description="Stage 2: 3D latent DiT conditioned on text and metadata.")
    dit_sub = dit.add_subparsers(dest="dit_command", metavar="SUBCOMMAND")
    dit_sub.required = True
    fit = dit_sub.add_parser("fit", help="train a DiT on a latent cache (`medsynth encode`) and export it",
                             description="Train the DiT (Lightning: EMA, checkpoints, per-timestep-bucket "
                                         "losses) and export the EMA weights to OUT/export.")
    fit.add_argument("--config", required=True, type=Path, help="YAML config (configs/dit/*.yaml)")
    fit.add_argument("--cache", required=True, type=Path, help="latent cache folder (`medsynth encode`)")
    fit.add_argument("--out", required=True, type=Path,
                     help="run folder: config.yaml, checkpoints/, lightning_logs/, export/ (the model)")
    fit.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides the config)")
    add_scale_arguments(fit, precision_help="overrides training.precision (bf16-mixed on GPUs that support it)")
    fit.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    fit.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    import yaml

    from medsynth.io.atomic import write_text_atomic

    config = load_dit_config(args.config)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    scale = scale_options(args)
    training = dict(config.get("training") or {})
    if scale.precision is not None:
        training["precision"] = scale.precision
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    config["training"] = training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    from medsynth.training.dit import fit_dit

    start = time.time()
    export = fit_dit(args.cache, out, config, accelerator=scale.accelerator, devices=scale.devices,
                     max_steps=args.max_steps, resume=scale.resume, num_workers=args.num_workers,
                     num_nodes=scale.num_nodes, strategy=scale.strategy or "auto")
    summary = {"export": str(export), "seconds": round(time.time() - start, 1), "config": str(args.config),
               "cache": str(args.cache)}
    write_text_atomic(out / "fit_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"trained the DiT in {summary['seconds']} s; export: {export}")
    return 0
