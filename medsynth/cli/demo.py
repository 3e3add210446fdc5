"""``medsynth demo``: the whole pipeline on built-in phantoms, on a laptop CPU.

Each stage is a small function that reads the previous stage's files and returns what it made;
the demo prints every stage with its timing and, at the end, what it wrote and where. Stages are
added here as the pipeline grows (autoencoder, DiT, ControlNet, cohort, evaluation, benchmark).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError
from medsynth.io.atomic import write_json_atomic


@dataclass
class DemoSettings:
    """What the user asked for."""

    out: Path
    modality: str = "ct"
    size: int = 32
    num_cases: int = 16
    seed: int = 0
    quick: bool = False
    progress: bool = True


@dataclass
class DemoState:
    """What the stages have produced so far (paths and one-line summaries)."""

    outputs: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def stage_phantoms(settings: DemoSettings, state: DemoState) -> str:
    from medsynth.data.phantom_dataset import write_phantom_dataset

    root = settings.out / "phantoms"
    # A higher lesion rate than the default keeps at least one rare case in a small demo set.
    dataset = write_phantom_dataset(root, modality=settings.modality, num=settings.num_cases,
                                    size=settings.size, seed=settings.seed, lesion_rate=0.3,
                                    progress=settings.progress)
    state.outputs["phantom dataset"] = root
    n_lesion = sum(1 for c in dataset.cases if c.metadata.get("has_lesion"))
    return f"{len(dataset.cases)} {settings.modality.upper()} phantoms at {settings.size}^3, {n_lesion} with a lesion"


def stage_prepare(settings: DemoSettings, state: DemoState) -> str:
    from medsynth.data.prepare import prepare_dataset

    root = settings.out / "prepared"
    dataset = prepare_dataset(state.outputs["phantom dataset"], root, spacing=None,
                              modality=settings.modality.upper(), multiple_of=8,
                              progress=settings.progress)
    state.outputs["prepared dataset"] = root
    splits = ", ".join(f"{k} {len(v)}" for k, v in dataset.splits.items() if isinstance(v, list))
    return f"canonical RAS dataset with splits ({splits})"


STAGES: tuple[tuple[str, Stage], ...] = (
    ("phantoms", stage_phantoms),
    ("prepare", stage_prepare),
)


def run_stages(settings: DemoSettings, stages: tuple[tuple[str, Stage], ...] = STAGES) -> DemoState:
    """Run every stage in order, printing progress; returns the state."""
    state = DemoState()
    settings.out.mkdir(parents=True, exist_ok=True)
    for index, (name, stage) in enumerate(stages, start=1):
        print(f"[{index}/{len(stages)}] {name} ...", flush=True)
        start = time.perf_counter()
        summary = stage(settings, state)
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
    settings = DemoSettings(out=args.out, modality=args.modality,
                            size=min(args.size, 24) if args.quick else args.size,
                            num_cases=num, seed=args.seed, quick=args.quick,
                            progress=not args.no_progress)
    start = time.perf_counter()
    state = run_stages(settings)
    total = time.perf_counter() - start
    print(f"\ndemo finished in {total:.1f} s. What it made:")
    for what, path in state.outputs.items():
        print(f"  {what:<20} {path}")
    record = summary_dict(state) | {"total_s": total, "settings": {
        "modality": settings.modality, "size": settings.size, "num_cases": settings.num_cases,
        "seed": settings.seed, "quick": settings.quick}}
    write_json_atomic(settings.out / "demo_summary.json", record)
    print(f"  {'summary':<20} {settings.out / 'demo_summary.json'}")
    return 0


def summary_dict(state: DemoState) -> dict[str, Any]:
    """JSON-friendly record of a demo run."""
    return {"outputs": {k: str(v) for k, v in state.outputs.items()},
            "timings_s": state.timings, "notes": state.notes}
