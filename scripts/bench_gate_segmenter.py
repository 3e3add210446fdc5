"""How should the quality gate's segmenter be trained at a given budget?

The agreement check of the quality gate (``medsynth assemble --segmenter-steps N``) segments each
generated image with a SegResNet trained on the real training split. This script trains that
segmenter exactly as ``assemble`` does, at each budget in ``--steps`` and with each recipe
(learning-rate schedule x patch augmentation, ``--segmenter-lr-schedule`` /
``--segmenter-augmentation``), and scores it on the real held-out cases (val + test) of a
finished demo folder: mean Dice per large organ. A gate whose segmenter cannot find an organ on
real images cannot check it on generated ones.

Usage::

    medsynth demo --out runs/demo_ct
    python scripts/bench_gate_segmenter.py --demo runs/demo_ct --steps 150 750 --out docs/benchmarks

Writes ``gate_segmenter_<modality>.json`` / ``.md`` (``--name`` replaces ``<modality>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conditioning import LARGE_CLASSES, held_out_cases, judged_dice, real_reader  # noqa: E402

RECIPES = ("constant:none", "poly:none", "poly:standard")


def parse_recipe(text: str) -> tuple[str, str]:
    """``"poly:standard"`` -> ``("poly", "standard")``, checked against what the segmenter accepts."""
    from medsynth.training.segmentation import AUGMENTATIONS, LR_SCHEDULES

    schedule, _, augmentation = text.partition(":")
    if schedule not in LR_SCHEDULES or augmentation not in AUGMENTATIONS:
        raise argparse.ArgumentTypeError(f"recipe {text!r}: expected SCHEDULE:AUGMENTATION with SCHEDULE in "
                                         f"{list(LR_SCHEDULES)} and AUGMENTATION in {list(AUGMENTATIONS)}")
    return schedule, augmentation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `medsynth demo` folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 750], help="training budgets to compare")
    parser.add_argument("--recipes", type=parse_recipe, nargs="+", default=[parse_recipe(r) for r in RECIPES],
                        metavar="SCHEDULE:AUGMENTATION", help=f"default: {' '.join(RECIPES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default=None, help="file stem suffix (default: the modality)")
    args = parser.parse_args(argv)

    from medsynth.data.transforms import IntensityMapping
    from medsynth.errors import MedsynthError
    from medsynth.pipelines.assemble import training_pairs
    from medsynth.pipelines.pipeline import MedSynthPipeline
    from medsynth.training.segmentation import fit_agreement_segmenter

    start = time.perf_counter()
    try:
        pipe = MedSynthPipeline.from_pretrained(args.demo / "pipeline", device="cpu")
        dataset, pairs = training_pairs(args.demo / "prepared", ("train",))
    except MedsynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    modality = pipe.modality.lower()
    labels = {k: int(v) for k, v in dataset.labels.items() if k != "ignore"}
    held_out = held_out_cases(dataset)
    if not held_out:
        print(f"error: {args.demo / 'prepared'} has no labelled val or test case to score on", file=sys.stderr)
        return 2
    intensity = IntensityMapping.from_dict(pipe.record["intensity"])
    rows = []
    for steps in args.steps:
        for schedule, augmentation in args.recipes:
            t = time.perf_counter()
            segmenter = fit_agreement_segmenter(pairs, labels, intensity, steps, patch=32, seed=args.seed,
                                                accelerator="cpu", lr_schedule=schedule, augmentation=augmentation)
            dice = judged_dice(held_out, segmenter, pipe.labels, modality, real_reader(dataset, pipe))
            rows.append({"steps": steps, "lr_schedule": schedule, "augmentation": augmentation,
                         "seconds": round(time.perf_counter() - t, 1),
                         "dice": {k: round(float(np.mean(v)), 3) for k, v in dice.items()}})
            print(rows[-1], flush=True)
    record = {"demo": str(args.demo), "modality": modality, "training_cases": len(pairs),
              "held_out_cases": len(held_out), "classes": LARGE_CLASSES[modality], "seed": args.seed, "rows": rows,
              "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "command": "python scripts/bench_gate_segmenter.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gate_segmenter_{args.name or modality}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(render(record))
    print(render(record))
    return 0


def render(r: dict) -> str:
    names = [n for n in r["classes"] if any(n in row["dice"] for row in r["rows"])]
    lines = [f"# The quality gate's segmenter by budget and recipe ({r['modality'].upper()})", "",
             f"Command: `{r['command']}`. Machine: {r['machine']}. Trained as `medsynth assemble` trains it "
             f"(SegResNet, 32^3 patches, AdamW) on the {r['training_cases']} real training cases of `{r['demo']}`; "
             f"mean Dice on its {r['held_out_cases']} real held-out cases (val + test).", "",
             "| steps | lr schedule | augmentation | " + " | ".join(names) + " | seconds |",
             "|---" * (len(names) + 4) + "|"]
    for row in r["rows"]:
        lines.append(f"| {row['steps']} | {row['lr_schedule']} | {row['augmentation']} | "
                     + " | ".join(f"{row['dice'].get(n, float('nan')):.3f}" for n in names)
                     + f" | {row['seconds']} |")
    lines += ["", f"Run time: {r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
