"""Stage-1 commands: ``medsynth autoencoder fit|eval`` and ``medsynth encode``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medsynth.cli.devices import add_scale_arguments, scale_options
from medsynth.errors import ConfigError
from medsynth.io.config_files import read_config_sections

SECTIONS = ("model", "discriminator", "training", "data")


def load_run_config(path: str | Path) -> dict[str, Any]:
    """Parse an autoencoder YAML config into validated dataclasses.

    Returns ``{"model": VQGANConfig, "discriminator": DiscriminatorConfig,
    "training": AutoencoderTrainingConfig, "data": PatchDataConfig}``; unknown sections or keys
    raise :class:`ConfigError` naming them.
    """
    from medsynth.data.patches import PatchDataConfig
    from medsynth.models.autoencoder_config import DiscriminatorConfig, VQGANConfig
    from medsynth.training.autoencoder import AutoencoderTrainingConfig

    path = Path(path)
    raw = read_config_sections(path, SECTIONS, "configs/autoencoder/ for tiny/base/large")
    try:
        return {"model": VQGANConfig.from_dict(raw.get("model")),
                "discriminator": DiscriminatorConfig.from_dict(raw.get("discriminator")),
                "training": AutoencoderTrainingConfig.from_dict(raw.get("training")),
                "data": PatchDataConfig.from_dict(raw.get("data"))}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except TypeError as err:  # wrong value types that the dataclasses cannot coerce
        raise ConfigError(f"{path}: {err}") from None


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else mps, else cpu; anything else is passed to torch."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _triple(values: list[int] | None) -> tuple[int, int, int] | None:
    if values is None:
        return None
    if len(values) == 1:
        return (values[0],) * 3  # type: ignore[return-value]
    if len(values) != 3:
        raise ConfigError(f"expects 1 or 3 values (X Y Z), but got {values}")
    return tuple(values)  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    ae = sub.add_parser("autoencoder", help="train and evaluate the stage-1 VQ-GAN autoencoder",
                        description="Stage 1: 3D VQ-GAN autoencoder (fit, eval).")
    ae_sub = ae.add_subparsers(dest="autoencoder_command", metavar="SUBCOMMAND")
    ae_sub.required = True

    fit = ae_sub.add_parser("fit", help="train a VQ-GAN on random 3D patches of a dataset folder",
                            description="Train the VQ-GAN (Lightning; checkpoints, figures, export).")
    fit.add_argument("--config", required=True, type=Path, help="YAML config (configs/autoencoder/*.yaml)")
    fit.add_argument("--data", required=True, type=Path, help="dataset folder (nnU-Net v2 layout)")
    fit.add_argument("--out", required=True, type=Path,
                     help="run folder: checkpoints/, logs/, figures/, model/ (the export)")
    fit.add_argument("--max-steps", type=int, default=None, help="generator steps (overrides the config)")
    fit.add_argument("--max-time", type=float, default=None,
                     help="stop after this many minutes of training (the model is still exported)")
    add_scale_arguments(fit, precision_default="32",
                        precision_help="bf16-mixed (CPU or GPU), 16-mixed (GPU only) or 32 / 32-true (default 32)",
                        strategy_help="Lightning strategy (default: DDP with unused-parameter search when more "
                                      "than one process trains)",
                        resume_help="Lightning checkpoint to resume from (or 'last': OUT/checkpoints/last.ckpt)")
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fit.set_defaults(func=run_fit)

    ev = ae_sub.add_parser("eval", help="PSNR / 3D SSIM / MAE of whole held-out volumes, per class",
                           description="Tiled reconstruction of a split; writes metrics.json + metrics.md.")
    ev.add_argument("--model", required=True, type=Path, help="export folder (config.json + model.safetensors)")
    ev.add_argument("--data", required=True, type=Path, help="dataset folder")
    ev.add_argument("--out", type=Path, default=None, help="report folder (default MODEL/eval)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test (held out)")
    _tiling_args(ev)
    ev.add_argument("--max-cases", type=int, default=None, help="evaluate at most this many cases")
    ev.set_defaults(func=run_eval)

    enc = sub.add_parser("encode", help="write the latent cache (latents, labels, stats) for the diffusion stage",
                         description="Encode every case with a trained autoencoder into a resumable latent cache.")
    enc.add_argument("--model", required=True, type=Path, help="autoencoder export folder")
    enc.add_argument("--data", required=True, type=Path, help="dataset folder")
    enc.add_argument("--out", required=True, type=Path, help="cache folder (rerun to resume)")
    enc.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=("train", "val", "test"))
    _tiling_args(enc)
    enc.set_defaults(func=run_encode)


def _tiling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, nargs="+", default=None,
                   help="sliding window in voxels, 1 or 3 values (default: the training patch)")
    p.add_argument("--overlap", type=int, nargs="+", default=None,
                   help="window overlap in voxels (default: a quarter of the window)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_fit(args: argparse.Namespace) -> int:
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from medsynth.data.patches import PatchDataModule
    from medsynth.io.atomic import write_text_atomic
    from medsynth.training.autoencoder import AutoencoderModule
    from medsynth.training.callbacks import ExportAutoencoder, ReconstructionFigure

    cfg = load_run_config(args.config)
    train = cfg["training"]
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
        train.max_steps = args.max_steps
    if args.max_time is not None and args.max_time <= 0:
        raise ConfigError(f"--max-time must be > 0 minutes, got {args.max_time}")
    scale = scale_options(args, resume_keywords=("last",))
    # The discriminator is idle during warm-up (and G/D alternate), so plain DDP would stop on
    # parameters without gradients: any multi-process run searches for unused parameters.
    strategy = scale.strategy or ("ddp_find_unused_parameters_true" if scale.multi_process else "auto")
    L.seed_everything(train.seed, workers=True, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {k: v.to_dict() for k, v in cfg.items()}
    write_text_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    dm = PatchDataModule(args.data, cfg["model"].patch_size, cfg["data"])
    metadata = dm.describe()
    metadata.update(patch_size=list(cfg["model"].patch_size), precision=args.precision,
                    data=str(args.data), config=str(args.config))
    module = AutoencoderModule(model=resolved["model"], discriminator=resolved["discriminator"],
                               training=resolved["training"], metadata=metadata)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step:07.0f}",
                           auto_insert_metric_name=False, every_n_train_steps=train.checkpoint_every_n_steps,
                           save_last=True, save_top_k=1)
    has_val = bool(dm.val_cases)
    trainer = L.Trainer(
        accelerator=scale.accelerator, devices=scale.devices, num_nodes=scale.num_nodes, strategy=strategy,
        precision=scale.precision,
        # Lightning counts optimizer steps (G and D); the module stops after train.max_steps
        # generator steps, this is only a safety net.
        max_steps=2 * train.max_steps + 2, max_epochs=-1,
        max_time=None if args.max_time is None else {"minutes": float(args.max_time)},
        val_check_interval=train.val_every_n_steps if has_val else None,
        check_val_every_n_epoch=None if has_val else 1, limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0, logger=CSVLogger(out, name="logs", version=""),
        callbacks=[ckpt, ReconstructionFigure(out / "figures", train.figure_every_n_steps),
                   ExportAutoencoder(out / "model")],
        log_every_n_steps=10, enable_progress_bar=not args.no_progress, enable_model_summary=False,
        default_root_dir=out)
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=scale.resume)
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = {"steps": int(module.generator_step), "seconds": round(time.time() - start, 1),
                   "export": str(out / "model"), "metrics": metrics}
        write_text_atomic(out / "fit_summary.json", json.dumps(summary, indent=2) + "\n")
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/", "codebook/"))}
        print(f"trained {summary['steps']} steps in {summary['seconds']} s; export: {out / 'model'}")
        if shown:
            print("  " + ", ".join(f"{k} {v}" for k, v in sorted(shown.items())))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from medsynth.evaluation.reconstruction import evaluate_autoencoder, metrics_markdown
    from medsynth.io.atomic import write_json_atomic, write_text_atomic
    from medsynth.io.checkpoint import load_autoencoder

    device = resolve_device(args.device)
    model, export = load_autoencoder(args.model, device)
    result = evaluate_autoencoder(model, export, args.data, split=args.split, window=_triple(args.window),
                                  overlap=_triple(args.overlap), device=device, max_cases=args.max_cases,
                                  progress=not args.no_progress)
    out = args.out or Path(args.model) / "eval"
    write_json_atomic(Path(out) / "metrics.json", result)
    write_text_atomic(Path(out) / "metrics.md", metrics_markdown(result))
    o = result["overall"]
    print(f"{result['split']} ({result['num_cases']} cases): PSNR {o['psnr']:.2f} dB, SSIM {o['ssim']:.4f}, "
          f"MAE {o['mae']:.2f} {result['unit']}; report: {out}/metrics.md")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from medsynth.io.checkpoint import load_autoencoder
    from medsynth.pipelines.latent_cache import encode_dataset

    device = resolve_device(args.device)
    model, export = load_autoencoder(args.model, device)
    stats = encode_dataset(model, export, args.data, args.out, splits=tuple(args.splits),
                           window=_triple(args.window), overlap=_triple(args.overlap), device=device,
                           progress=not args.no_progress)
    print(f"encoded {stats['num_cases']} cases to {args.out}; latent std {stats['std']:.4f}, "
          f"scale_factor {stats['scale_factor']:.4f}")
    return 0
