"""``medsynth demo``: the whole pipeline on built-in phantoms, on a laptop CPU.

Each stage is a small function that reads the previous stage's files and returns what it made;
the demo prints every stage with its timing and, at the end, what it wrote and where. Stages are
added here as the pipeline grows (autoencoder, DiT, ControlNet, cohort, evaluation, benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError, MedsynthError
from medsynth.evaluation.demo_report import ReportSection, paired_gallery, write_demo_report
from medsynth.io.atomic import write_json_atomic


class DemoError(MedsynthError):
    """A demo stage failed."""


def _configs_dir() -> Path:
    """The shipped ``configs/`` folder: ``$MEDSYNTH_CONFIGS``, else beside the package (repo / image)."""
    env = os.environ.get("MEDSYNTH_CONFIGS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "configs", Path("/opt/medsynth/configs")]
    for folder in candidates:
        if (folder / "autoencoder" / "tiny.yaml").is_file():
            return folder
    raise ConfigError(f"cannot find medsynth's configs/ folder (looked in {[str(c) for c in candidates]}); "
                      f"set MEDSYNTH_CONFIGS to it")


CONFIGS = _configs_dir()
# The rare class each modality's cohort balances: (class, host organ) for a --lesion spec.
RARE_LESION = {"ct": ("liver_lesion", "liver"), "mr": ("tumour_core", "white_matter")}


def phantom_voxel_mm(modality: str, size: int) -> float:
    """The largest voxel edge of a ``size^3`` phantom (its field of view / size)."""
    from medsynth.data.phantoms_ct import CT_FOV_MM
    from medsynth.data.phantoms_mr import MR_FOV_MM

    return max(CT_FOV_MM if modality == "ct" else MR_FOV_MM) / size


def lesion_spec(modality: str, size: int) -> str:
    """``CLASS:1:MIN-MAXmm:HOST`` sized for the phantom grid: at least 2.2 voxels across, so the
    lesion survives in the label map (lesion insertion refuses anything below two voxels)."""
    voxel = phantom_voxel_mm(modality, size)
    low, high = max(10.0, 2.2 * voxel), max(20.0, 3.2 * voxel)
    name, host = RARE_LESION[modality]
    return f"{name}:1:{low:.0f}-{high:.0f}mm:{host}"


@dataclass
class DemoSettings:
    """What the user asked for."""

    out: Path
    modality: str = "ct"
    size: int = 32
    num_cases: int = 16
    num_synthetic: int = 8
    seed: int = 0
    quick: bool = False
    progress: bool = True
    train_scale: float = 1.0
    phantom_noise: str = "fixed"
    latent_factor: int = 2


# The autoencoder's downsampling per axis -> its shipped autoencoder and DiT configs. The DiT patch
# is 4 // factor, so a 32^3 image is 8^3 = 512 tokens either way and a DiT step costs the same. 2 is
# the default: on 160 CT phantoms it reconstructs at 35.0 dB against 32.3 dB and lifts held-out
# mask fidelity by 0.02-0.07 Dice per organ (docs/benchmarks/conditioning_ct_160x5_f2.md).
# The same file name in configs/autoencoder/ and configs/dit/ names each pair.
TINY_CONFIGS: dict[int, str] = {4: "tiny.yaml", 2: "tiny_f2.yaml"}


@dataclass
class DemoState:
    """What the stages have produced so far (paths and one-line summaries)."""

    outputs: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    # Which stage made each output / figure (filled by run_stages), for the report's sections.
    output_stage: dict[str, str] = field(default_factory=dict)
    figure_stage: list[str] = field(default_factory=list)


Stage = Callable[[DemoSettings, DemoState], str]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on built-in phantoms (CPU, minutes)",
                       description="Run medsynth end to end on procedural phantoms and print "
                                   "what it made and where.")
    p.add_argument("--out", type=Path, default=Path("medsynth_demo"),
                   help="output folder (default ./medsynth_demo)")
    p.add_argument("--modality", type=str.lower, choices=("ct", "mr"), default="ct")
    p.add_argument("--size", type=int, default=32, help="phantom edge length in voxels (default 32)")
    p.add_argument("--num", type=int, default=None, help="number of phantom cases (default 16; 6 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one-minute smoke run: fewer, smaller cases")
    p.add_argument("--train-scale", type=float, default=1.0,
                   help="multiply the training steps of every model (autoencoder 400, DiT 400, ControlNet 250, "
                        "mask refiner 300, label generator 300, agreement segmenter 150) by this (default 1); with 40 cases, 5 took "
                        "39 min on 2 cores against 15 min at 1")
    p.add_argument("--phantom-noise", choices=("fixed", "scanner"), default="fixed",
                   help="phantom noise model (medsynth phantoms --noise): 'scanner' scales the noise with the "
                        "voxel volume, so 32^3 phantoms are nearly noise-free and lesions stay visible")
    p.add_argument("--latent-factor", type=int, choices=sorted(TINY_CONFIGS), default=2,
                   help="autoencoder downsampling per axis: 2 (default, configs/autoencoder/tiny_f2.yaml with "
                        "configs/dit/tiny_f2.yaml, patch 2) or 4 (tiny.yaml with the patch-1 tiny DiT); both give "
                        "512 tokens per 32^3 image, 2 reconstructs sharper and keeps small lesions")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def stage_phantoms(settings: DemoSettings, state: DemoState) -> str:
    from medsynth.data.manifest import read_dataset

    root = settings.out / "phantoms"
    # A higher lesion rate than the default keeps at least one rare case in a small demo set.
    run_command(["phantoms", "--modality", settings.modality, "--num", str(settings.num_cases),
                 "--size", str(settings.size), "--out", str(root), "--seed", str(settings.seed),
                 "--lesion-rate", "0.3", *_noise(settings), *_quiet(settings)])
    dataset = read_dataset(root)
    state.outputs["phantom dataset"] = root
    n_lesion = sum(1 for c in dataset.cases if (c.metadata or {}).get("has_lesion"))
    return f"{len(dataset.cases)} {settings.modality.upper()} phantoms at {settings.size}^3, {n_lesion} with a lesion"


def stage_prepare(settings: DemoSettings, state: DemoState) -> str:
    from medsynth.data.manifest import read_dataset

    root = settings.out / "prepared"
    run_command(["prepare", "--input", str(state.outputs["phantom dataset"]), "--out", str(root),
                 "--modality", settings.modality.upper(), "--multiple-of", "8", *_quiet(settings)])
    dataset = read_dataset(root)
    state.outputs["prepared dataset"] = root
    splits = ", ".join(f"{k} {len(v)}" for k, v in dataset.splits.items() if isinstance(v, list))
    return f"canonical RAS dataset with splits ({splits})"


def run_command(argv: list[str]) -> None:
    """Run one ``medsynth`` command exactly as a user would type it (and show the line).

    The demo is built from the public commands, so every line it prints can be copied and rerun.
    """
    from medsynth.cli import build_parser

    print("    $ medsynth " + shlex.join(argv), flush=True)
    args = build_parser().parse_args(argv)
    code = int(args.func(args) or 0)
    if code:
        raise DemoError(f"`medsynth {' '.join(argv)}` exited with code {code}")


def _steps(settings: DemoSettings, full: int, quick: int) -> str:
    return str(quick if settings.quick else full)


def _train_steps(settings: DemoSettings, full: int, quick: int) -> str:
    """Step budget of a trained model (autoencoder, DiT, ControlNet, label generator, agreement
    segmenter), multiplied by ``--train-scale``; the evaluation budgets stay fixed."""
    return str(quick if settings.quick else max(1, round(full * settings.train_scale)))


def _noise(settings: DemoSettings) -> list[str]:
    """``--noise`` for the phantoms command, only when not the default (so the shown line stays short)."""
    return [] if settings.phantom_noise == "fixed" else ["--noise", settings.phantom_noise]


def _quiet(settings: DemoSettings) -> list[str]:
    return [] if settings.progress else ["--no-progress"]


def stage_autoencoder(settings: DemoSettings, state: DemoState) -> str:
    run = settings.out / "autoencoder"
    data = state.outputs["prepared dataset"]
    config = CONFIGS / "autoencoder" / TINY_CONFIGS[settings.latent_factor]
    run_command(["autoencoder", "fit", "--config", str(config), "--data", str(data),
                 "--out", str(run), "--max-steps", _train_steps(settings, 400, 30), "--accelerator", "cpu",
                 "--precision", "32", *_quiet(settings)])
    run_command(["autoencoder", "eval", "--model", str(run / "model"), "--data", str(data), "--device", "cpu",
                 *_quiet(settings)])
    state.outputs["autoencoder"] = run / "model"
    metrics = json.loads((run / "model" / "eval" / "metrics.json").read_text(encoding="utf-8"))["overall"]
    state.metrics["autoencoder"] = metrics
    return f"tiny VQ-GAN: held-out PSNR {metrics['psnr']:.1f} dB, SSIM {metrics['ssim']:.3f}"


def stage_encode(settings: DemoSettings, state: DemoState) -> str:
    cache = settings.out / "latents"
    run_command(["encode", "--model", str(state.outputs["autoencoder"]), "--data",
                 str(state.outputs["prepared dataset"]), "--out", str(cache), "--device", "cpu", *_quiet(settings)])
    state.outputs["latent cache"] = cache
    stats = json.loads((cache / "stats.json").read_text(encoding="utf-8"))
    return f"{stats['num_cases']} latents, scale factor {stats['scale_factor']:.3f}"


def stage_dit(settings: DemoSettings, state: DemoState) -> str:
    run = settings.out / "dit"
    run_command(["dit", "fit", "--config", str(CONFIGS / "dit" / TINY_CONFIGS[settings.latent_factor]), "--cache",
                 str(state.outputs["latent cache"]), "--out", str(run), "--max-steps", _train_steps(settings, 400, 20),
                 "--accelerator", "cpu"])
    state.outputs["DiT"] = run / "export"
    return "tiny DiT trained on phantom latents with text + metadata conditioning"


def stage_controlnet(settings: DemoSettings, state: DemoState) -> str:
    import yaml

    run = settings.out / "controlnet"
    # The shipped tiny config weights the CT lesion class; the demo weights its modality's own.
    config = yaml.safe_load((CONFIGS / "controlnet" / "tiny.yaml").read_text(encoding="utf-8"))
    config.setdefault("training", {})["region_classes"] = [RARE_LESION[settings.modality][0]]
    config_file = settings.out / "controlnet_tiny.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    run_command(["controlnet", "fit", "--dit", str(state.outputs["DiT"]), "--cache", str(state.outputs["latent cache"]),
                 "--config", str(config_file), "--out", str(run),
                 "--max-steps", _train_steps(settings, 250, 10), "--accelerator", "cpu"])
    bank = settings.out / "mask_bank"
    run_command(["labels", "bank", "--data", str(state.outputs["prepared dataset"]), "--out", str(bank)])
    state.outputs["ControlNet"] = run / "export"
    state.outputs["mask bank"] = bank
    return "ControlNet trained (base DiT frozen); mask bank built from the training split"


def stage_refiner(settings: DemoSettings, state: DemoState) -> str:
    run = settings.out / "refiner"
    run_command(["refiner", "fit", "--autoencoder", str(state.outputs["autoencoder"]), "--cache",
                 str(state.outputs["latent cache"]), "--config", str(CONFIGS / "refiner" / "tiny.yaml"),
                 "--out", str(run), "--max-steps", _train_steps(settings, 300, 5), "--accelerator", "cpu"])
    state.outputs["mask refiner"] = run / "export"
    return "mask refiner trained to restore real detail to decoded images from their label maps"


def stage_label_generator(settings: DemoSettings, state: DemoState) -> str:
    run = settings.out / "label_generator"
    run_command(["labels", "fit", "--config", str(CONFIGS / "labels" / "tiny.yaml"), "--data",
                 str(state.outputs["prepared dataset"]), "--out", str(run), "--max-steps", _train_steps(settings, 300, 10),
                 "--accelerator", "cpu"])
    state.outputs["label generator"] = run / "export"
    return "label autoencoder + DiT over its latents trained on the training split's label maps"


def _prompt(settings: DemoSettings, diameter: int | None) -> str:
    if settings.modality == "ct":
        return "CT abdomen portal venous" + (f", liver lesion {diameter} mm" if diameter else "")
    return "MR head T1" + (f", tumour {diameter} mm with oedema" if diameter else "")


def stage_assemble(settings: DemoSettings, state: DemoState) -> str:
    pipeline = settings.out / "pipeline"
    run_command(["assemble", "--autoencoder", str(state.outputs["autoencoder"]), "--dit", str(state.outputs["DiT"]),
                 "--cache", str(state.outputs["latent cache"]), "--controlnet", str(state.outputs["ControlNet"]),
                 "--bank", str(state.outputs["mask bank"]), "--label-generator", str(state.outputs["label generator"]),
                 "--refiner", str(state.outputs["mask refiner"]),
                 "--data", str(state.outputs["prepared dataset"]), "--segmenter-steps", _train_steps(settings, 150, 5),
                 "--out", str(pipeline)])
    state.outputs["pipeline"] = pipeline
    # New label maps from the label generator, and images made from them by the ControlNet.
    from_generator = settings.out / "synthetic_from_label_generator"
    run_command(["generate", "--pipeline", str(pipeline), "--prompt", _prompt(settings, None),
                 "--num", "2" if settings.quick else "4", "--out", str(from_generator), "--seed", str(settings.seed),
                 "--steps", _steps(settings, 20, 5), "--mask-source", "generator", "--max-retries", "0",
                 "--keep-failed", "--device", "cpu", *_quiet(settings)])
    state.outputs["generated from new label maps"] = from_generator
    figure = paired_gallery(from_generator, settings.out / "figures" / "label_generator_pairs.png",
                            title="label generator: new label maps and the images made from them")
    state.figures.append((figure, "New label maps from the label generator, with the ControlNet's images"))
    real_figure = paired_gallery(state.outputs["prepared dataset"], settings.out / "figures" / "real_pairs.png",
                                 title="real (phantom) images with labels")
    state.figures.append((real_figure, "Real (phantom) image + label pairs"))
    return ("pipeline assembled (autoencoder, DiT, ControlNet, mask bank, label generator, mask refiner, quality "
            "gate with a trained SegResNet); image+label pairs from new label maps")


def cohort_spec(settings: DemoSettings, state: DemoState) -> dict[str, Any]:
    """The demo's cohort: half the cases carry the rare lesion the real set rarely has."""
    lesion = lesion_spec(settings.modality, settings.size)
    name, _, sizes, host = lesion.split(":")
    low, high = (float(v) for v in sizes.rstrip("m").split("-"))
    return {"name": f"demo_{settings.modality}_balanced", "total": settings.num_synthetic,
            "modality": settings.modality.upper(), "seed": settings.seed,
            "pipeline": str(state.outputs["pipeline"].resolve()),
            "data": str(state.outputs["prepared dataset"].resolve()),
            "classes": {name: {"share": 0.5, "host": host, "count": 1,
                               "size_bins": [{"range_mm": [low, high], "share": 1.0}]},
                        "healthy": {"share": 0.5}},
            "demographics": {"sex": "real", "age": "real"},
            "masks": {"source": "bank"},
            "quality": {"gate": True, "max_retries": 1, "keep_failed": True},
            "sampling": {"steps": int(_steps(settings, 20, 5))}}


def stage_cohort(settings: DemoSettings, state: DemoState) -> str:
    import yaml

    out = settings.out / "cohort"
    spec = settings.out / "cohort.yaml"
    spec.write_text(yaml.safe_dump(cohort_spec(settings, state), sort_keys=False), encoding="utf-8")
    run_command(["cohort", "plan", "--spec", str(spec), "--out", str(out), *_quiet(settings)])
    run_command(["cohort", "run", "--spec", str(spec), "--out", str(out), "--accelerator", "cpu", *_quiet(settings)])
    run_command(["cohort", "audit", "--spec", str(spec), "--out", str(out), *_quiet(settings)])
    state.outputs["cohort spec"] = spec
    state.outputs["synthetic dataset"] = out
    state.outputs["cohort audit"] = out / "audit" / "report.md"
    figure = paired_gallery(out, settings.out / "figures" / "synthetic_pairs.png",
                            title="balanced synthetic cohort: images with their conditioning label maps")
    state.figures.append((figure, "Synthetic cohort image + label pairs (bank masks, planned lesions)"))
    return f"{settings.num_synthetic} image+label pairs, half with the rare lesion (planned, generated, audited)"


def stage_evaluate(settings: DemoSettings, state: DemoState) -> str:
    out = settings.out / "evaluation"
    size = str(settings.size)
    # The protocol grid must cover the phantoms' whole field of view: the default 1 mm spacing
    # (MAISI's, for real CT) would keep only the central few centimetres of a coarse phantom.
    spacing = f"{phantom_voxel_mm(settings.modality, settings.size):.4g}"
    run_command(["evaluate", "--real", str(state.outputs["prepared dataset"]), "--synthetic",
                 str(state.outputs["synthetic dataset"]), "--out", str(out), "--size", size, "--spacing", spacing,
                 "--bootstrap", _steps(settings, 50, 10), "--no-cache"])
    state.outputs["evaluation report"] = out / "report.html"
    return "FID family, diversity, memorisation audit and mask fidelity"


def stage_benchmark(settings: DemoSettings, state: DemoState) -> str:
    out = settings.out / "segmentation_benchmark"
    run_command(["benchmark", "seg", "--real", str(state.outputs["prepared dataset"]), "--synthetic",
                 str(state.outputs["synthetic dataset"]), "--out", str(out), "--ratios", "1", "--seeds", "0",
                 "--steps", _steps(settings, 150, 5), "--patch", "32", "--lr", "0.01", "--accelerator", "cpu",
                 *_quiet(settings)])
    state.outputs["segmentation benchmark"] = out / "report.html"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    lesion = RARE_LESION[settings.modality][0]

    def dice(cond: dict[str, Any], name: str) -> str:
        value = ((cond["summary"].get(name) or {}).get("dice") or {}).get("value")
        return "n/a" if value is None else f"{value:.2f}"

    shown = "; ".join(f"{name} {dice(cond, 'mean_foreground')} ({lesion} {dice(cond, lesion)})"
                      for name, cond in report["conditions"].items())
    state.metrics["segmentation benchmark"] = {name: {"mean_foreground": dice(cond, "mean_foreground"),
                                                      lesion: dice(cond, lesion)}
                                               for name, cond in report["conditions"].items()}
    return f"SegResNet Dice on the real test split, mean foreground ({lesion}): {shown}"


STAGES: tuple[tuple[str, Stage], ...] = (
    ("phantoms", stage_phantoms),
    ("prepare", stage_prepare),
    ("autoencoder", stage_autoencoder),
    ("encode", stage_encode),
    ("DiT", stage_dit),
    ("ControlNet + mask bank", stage_controlnet),
    ("mask refiner", stage_refiner),
    ("label generator", stage_label_generator),
    ("assemble", stage_assemble),
    ("cohort", stage_cohort),
    ("evaluate", stage_evaluate),
    ("segmentation benchmark", stage_benchmark),
)


def run_stages(settings: DemoSettings, stages: tuple[tuple[str, Stage], ...] = STAGES) -> DemoState:
    """Run every stage in order, printing progress; returns the state."""
    state = DemoState()
    settings.out.mkdir(parents=True, exist_ok=True)
    for index, (name, stage) in enumerate(stages, start=1):
        print(f"[{index}/{len(stages)}] {name} ...", flush=True)
        start = time.perf_counter()
        summary = stage(settings, state)
        for what in state.outputs:
            state.output_stage.setdefault(what, name)
        state.figure_stage += [name] * (len(state.figures) - len(state.figure_stage))
        state.timings[name] = time.perf_counter() - start
        state.notes.append(f"{name}: {summary}")
        print(f"[{index}/{len(stages)}] {name}: {summary} ({state.timings[name]:.1f} s)", flush=True)
    return state


def run(args: argparse.Namespace) -> int:
    if not 16 <= args.size <= 256:
        raise ConfigError(f"--size must be between 16 and 256 voxels, got {args.size}")
    num = args.num if args.num is not None else (6 if args.quick else 16)
    if num < 3:
        raise ConfigError(f"--num must be at least 3 (train/val/test splits), got {num}")
    if not 0.1 <= args.train_scale <= 100:
        raise ConfigError(f"--train-scale must be between 0.1 and 100, got {args.train_scale}")
    if args.quick and args.train_scale != 1.0:
        raise ConfigError("--train-scale cannot be combined with --quick (the smoke run's budgets are fixed)")
    settings = DemoSettings(out=args.out, modality=args.modality, size=args.size, num_cases=num,
                            num_synthetic=4 if args.quick else 8, seed=args.seed, quick=args.quick,
                            progress=not args.no_progress, train_scale=float(args.train_scale),
                            phantom_noise=args.phantom_noise, latent_factor=args.latent_factor)
    start = time.perf_counter()
    state = run_stages(settings)
    total = time.perf_counter() - start
    record = summary_dict(state) | {"total_s": round(total, 1), "settings": {
        "modality": settings.modality, "size": settings.size, "num_cases": settings.num_cases,
        "num_synthetic": settings.num_synthetic, "seed": settings.seed, "quick": settings.quick,
        "train_scale": settings.train_scale, "phantom_noise": settings.phantom_noise,
        "latent_factor": settings.latent_factor}}
    write_json_atomic(settings.out / "demo_summary.json", record)
    report = write_demo_report(settings.out, report_sections(settings, state), record)
    print(f"\ndemo finished in {total:.1f} s. What it made:")
    for what, path in state.outputs.items():
        print(f"  {what:<30} {path}")
    print(f"  {'summary':<30} {settings.out / 'demo_summary.json'}")
    print(f"  {'report (open this)':<30} {report}")
    return 0


def report_sections(settings: DemoSettings, state: DemoState) -> list[ReportSection]:
    """One report section per stage, with links relative to the demo folder."""
    def rel(path: Path) -> str:
        return os.path.relpath(path, settings.out)

    sections = [ReportSection(f"{name} ({state.timings.get(name, 0.0):.1f} s)", [note.split(': ', 1)[-1]])
                for name, note in zip(state.timings, state.notes)]
    by_title = {s.title.split(" (")[0]: s for s in sections}
    for what, path in state.outputs.items():
        target = path / "report.html" if (path / "report.html").is_file() else path
        section = by_title.get(state.output_stage.get(what, ""), sections[-1])
        section.links.append((rel(target), f"{what}: {rel(target)}"))
    autoencoder_figures = sorted((settings.out / "autoencoder" / "figures").glob("*.png"))
    if autoencoder_figures and "autoencoder" in by_title:
        by_title["autoencoder"].figures.append((rel(autoencoder_figures[-1]),
                                                "Autoencoder: input vs reconstruction (last validation figure)"))
    for (path, caption), stage in zip(state.figures, state.figure_stage):
        by_title.get(stage, sections[-1]).figures.append((rel(path), caption))
    for folder, stage in (("cohort/audit", "cohort"), ("segmentation_benchmark/figures", "segmentation benchmark")):
        if stage in by_title:
            for png in sorted((settings.out / folder).glob("*.png")):
                by_title[stage].figures.append((rel(png), f"{stage}: {png.stem.replace('_', ' ')}"))
    evaluation = settings.out / "evaluation" / "figures"
    if "evaluate" in by_title and evaluation.is_dir():
        for png in sorted(evaluation.glob("*.png")):
            by_title["evaluate"].figures.append((rel(png), f"Evaluation: {png.stem.replace('_', ' ')}"))
    return sections


def summary_dict(state: DemoState) -> dict[str, Any]:
    """JSON-friendly record of a demo run."""
    return {"outputs": {k: str(v) for k, v in state.outputs.items()},
            "timings_s": state.timings, "notes": state.notes, "metrics": state.metrics}
