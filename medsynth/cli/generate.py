"""Synthesis commands: ``medsynth assemble`` (pipeline folder) and ``medsynth generate`` (dataset folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    asm = sub.add_parser("assemble", help="bundle autoencoder + DiT + cache settings into a pipeline folder",
                         description="Copy the exports into one folder with pipeline.json (component paths and "
                                     "sha256, scheduler, latent scale factor, intensity mapping, defaults).")
    asm.add_argument("--autoencoder", required=True, type=Path, help="autoencoder export folder")
    asm.add_argument("--dit", required=True, type=Path, help="DiT export folder (`medsynth dit fit` OUT/export)")
    asm.add_argument("--cache", required=True, type=Path, help="the latent cache the DiT was trained on")
    asm.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    asm.add_argument("--name", default=None, help="pipeline name (default: <dataset>_pipeline)")
    asm.add_argument("--controlnet", type=Path, default=None,
                     help="mask ControlNet export (`medsynth controlnet fit` OUT/export) for paired labels")
    asm.add_argument("--bank", type=Path, default=None,
                     help="mask bank (`medsynth labels bank`) copied in as the default mask source")
    asm.add_argument("--label-generator", type=Path, default=None,
                     help="label generator export (`medsynth labels fit` OUT/export) for --mask-source generator")
    asm.add_argument("--refiner", type=Path, default=None,
                     help="mask refiner export (`medsynth refiner fit` OUT/export): refines mask-conditioned "
                          "images from their mask at full resolution; needs --controlnet")
    asm.add_argument("--data", type=Path, default=None,
                     help="dataset folder for the quality ranges (default: the one recorded in the cache)")
    asm.add_argument("--segmenter-steps", type=int, default=200,
                     help="with --controlnet: train the quality gate's agreement segmenter (MONAI SegResNet) on "
                          "the training split for this many steps (default 200; 0 = intensity-threshold baseline)")
    asm.add_argument("--segmenter-lr-schedule", choices=("constant", "poly"), default="constant",
                     help="that segmenter's learning rate: constant (default) or nnU-Net's poly decay to 0")
    asm.add_argument("--segmenter-augmentation", choices=("none", "standard"), default="none",
                     help="augment that segmenter's training patches: none (default) or standard (rotation, "
                          "scaling, blur, noise, brightness, contrast, gamma; no mirroring)")
    asm.set_defaults(func=run_assemble)

    gen = sub.add_parser("generate", help="generate a synthetic dataset folder from a pipeline",
                         description="Generate N volumes into a dataset folder (nnU-Net layout, every file "
                                     "marked synthetic, provenance.jsonl). Rerun to resume.")
    gen.add_argument("--pipeline", required=True, type=Path, help="pipeline folder (`medsynth assemble`)")
    gen.add_argument("--prompt", required=True, action="append",
                     help="description of the scan; repeat to give several (cycled over the cases)")
    gen.add_argument("--num", required=True, type=int, help="number of cases")
    gen.add_argument("--out", required=True, type=Path, help="dataset folder (rerun with the same settings "
                                                             "to resume)")
    gen.add_argument("--seed", type=int, default=0, help="case i uses seed SEED + i (default 0)")
    gen.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    gen.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    gen.add_argument("--negative-prompt", default=None, metavar="TEXT",
                     help="what no case should show (e.g. 'no lesion'): under guidance it replaces the null text, "
                          "so guidance pushes away from it towards --prompt; needs --guidance other than 1")
    gen.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                     help="voxels (default: the training size); padded up to a multiple of the latent "
                          "factor x DiT patch internally and cropped back")
    gen.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                     help="voxel size in mm (default: the training spacing)")
    gen.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                     help="conditioning value, e.g. region=abdomen, sex=F, age=63, sequence=T2 (repeatable; an MR "
                          "sequence the prompt names is used when none is given)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    gen.add_argument("--format", default="nifti", choices=("nifti", "dicom", "both"),
                     help="nifti: the dataset folder; dicom/both: plus a DICOM series per case under dicom/")
    gen.add_argument("--mask", type=Path, default=None,
                     help="label map conditioning every case (needs a ControlNet); written as the label")
    gen.add_argument("--mask-labels", type=Path, default=None,
                     help="JSON label table of --mask (dataset.json or {name: value}) when its values differ")
    gen.add_argument("--mask-source", default=None, choices=("bank", "generator"),
                     help="where masks come from (default: --mask, else the pipeline's bank, else its label "
                          "generator, else images only)")
    gen.add_argument("--bank", type=Path, default=None, help="mask bank folder instead of the pipeline's")
    gen.add_argument("--lesion", action="append", default=[], metavar="CLASS:COUNT:MIN-MAXmm[:HOST]",
                     help="paint lesions into each mask before generation (repeatable)")
    gen.add_argument("--label-attribute", action="append", default=[], metavar="CLASS=QUANTILE",
                     help="with --mask-source generator: organ size as a quantile of training sizes, e.g. "
                          "liver=0.9 (repeatable)")
    gen.add_argument("--lesion-count", action="append", default=[], metavar="[CLASS=]N",
                     help="with --mask-source generator: lesions per mask, within the training range (repeatable)")
    gen.add_argument("--hold-findings", action="store_true",
                     help="with --mask-source generator: each mask holds the lesion finding its prompt states "
                          "('liver lesion 38 mm': one lesion of 38 mm within a factor 1.25 (30.4-47.5 mm); 'no lesion': none), redrawn and, "
                          "when no draw has it, inserted")
    gen.add_argument("--mask-guidance", type=float, default=None,
                     help="separate mask guidance scale (default: the ControlNet's)")
    gen.add_argument("--guidance-rescale", type=float, default=None,
                     help="0-1: pull guided predictions back to the conditional one's spread, which keeps guidance "
                          "from brightening organs (default: the ControlNet's for mask-conditioned cases, e.g. 0.7 "
                          "in configs/controlnet/tiny.yaml; 0 for images without a mask)")
    gen.add_argument("--no-refiner", action="store_true",
                     help="do not refine mask-conditioned images with the pipeline's mask refiner")
    gen.add_argument("--max-retries", type=int, default=2,
                     help="regenerations of a sample failing the quality gate (default 2)")
    gen.add_argument("--keep-failed", action="store_true",
                     help="keep samples that still fail (flagged in provenance.jsonl) instead of skipping them")
    gen.add_argument("--min-dice", type=float, default=0.5,
                     help="least per-class Dice of large classes in the agreement check (default 0.5)")
    gen.add_argument("--no-quality-gate", action="store_true", help="skip the quality gate")
    gen.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the pipeline files")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.set_defaults(func=run_generate)


def parse_metadata(items: list[str]) -> dict[str, Any]:
    """``["age=63", "region=abdomen"]`` -> ``{"age": 63, "region": "abdomen"}`` (numbers parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--metadata expects KEY=VALUE (e.g. age=63), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.strip()] = parsed
    return out


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_assemble(args: argparse.Namespace) -> int:
    from medsynth.pipelines.assemble import assemble_pipeline
    from medsynth.pipelines.pipeline import PIPELINE_FILE

    out = assemble_pipeline(args.autoencoder, args.dit, args.cache, args.out, name=args.name,
                            controlnet_dir=args.controlnet, bank_dir=args.bank, data_dir=args.data,
                            label_generator_dir=args.label_generator, refiner_dir=args.refiner,
                            segmenter_steps=args.segmenter_steps,
                            segmenter_lr_schedule=args.segmenter_lr_schedule,
                            segmenter_augmentation=args.segmenter_augmentation)
    print(f"pipeline written to {out} ({PIPELINE_FILE})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from medsynth.pipelines.generate import PROVENANCE_FILE, GenerationSettings, generate_dataset, skipped_cases
    from medsynth.pipelines.pipeline import MedSynthPipeline

    # Settings first: bad values fail before the (slow) model load and before OUT is created.
    settings = GenerationSettings(list(args.prompt), args.num, args.seed, args.steps, args.guidance,
                                  None if args.size is None else tuple(args.size),
                                  None if args.spacing is None else tuple(args.spacing),
                                  parse_metadata(args.metadata), args.format,
                                  mask=None if args.mask is None else str(args.mask),
                                  mask_labels=None if args.mask_labels is None else str(args.mask_labels),
                                  mask_source=args.mask_source, bank=None if args.bank is None else str(args.bank),
                                  lesions=list(args.lesion), mask_guidance_scale=args.mask_guidance,
                                  guidance_rescale=args.guidance_rescale,
                                  max_retries=args.max_retries, keep_failed=args.keep_failed,
                                  min_dice=args.min_dice, quality_gate=not args.no_quality_gate,
                                  label_attributes=list(args.label_attribute), lesion_counts=list(args.lesion_count),
                                  hold_findings=args.hold_findings,
                                  negative_prompt=args.negative_prompt, refine=not args.no_refiner)
    if args.mask is not None and not args.mask.is_file():
        raise ConfigError(f"--mask file {args.mask} does not exist")
    pipeline = MedSynthPipeline.from_pretrained(args.pipeline, device=_device(args.device),
                                                verify=not args.no_verify)
    dataset = generate_dataset(pipeline, args.out, settings, progress=not args.no_progress)
    print(f"{len(dataset.cases)} synthetic cases in {args.out} (provenance: {args.out / PROVENANCE_FILE})")
    skipped = skipped_cases(args.out)
    if skipped:
        print(f"{len(skipped)} case(s) failed the quality gate and were skipped: {', '.join(skipped)} "
              f"(scores in provenance.jsonl; --keep-failed keeps them flagged)")
    return 0
