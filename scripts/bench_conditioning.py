"""Does conditioning steer the output? Text, mask and both, measured on a finished demo run.

Reads a ``medsynth demo`` folder (its pipeline, real phantom dataset and cohort) and measures:

1. **Text conditioning** (DiT issue): text-only volumes (no mask) from a prompt asking for the
   rare lesion vs a prompt asking for none; a lesion counts as present when the pipeline's
   agreement segmenter (a SegResNet trained on the real training split) labels at least
   ``--min-lesion-voxels`` voxels as lesion. Reported beside the same rule on real test/val
   phantoms with and without a lesion (how good the judge is).
2. **Mask fidelity** (ControlNet issue): per-class Dice between the cohort's conditioning masks
   and the segmenter's output on the generated images, beside the same segmenter on real
   held-out phantoms (the ceiling); lesion detection rate by lesion size.
   With ``--held-out-masks N``, an image is also generated from each of N held-out real label
   maps and scored case by case beside the real image of the same mask and that image after the
   pipeline's autoencoder: means, 95 % bootstrap intervals, the paired gap (Wilcoxon), Dice by
   organ size and ``figures/held_out_masks_<modality>.png`` (Dice against organ voxels).
   With a mask refiner in the pipeline (``medsynth assemble --refiner``), the real images are also
   scored after the autoencoder *and* the refiner (with their true masks), and
   ``--refiner-baseline`` scores the same generated images without the refiner, side by side.
4. **Lesion detection by size, paired** (``--lesion-masks N``): a lesion of each requested size
   is inserted into up to N held-out label maps; one image is generated from the map with the
   lesion (and a prompt asking for it) and one from the map without (and a prompt asking for
   none), same seed. A contrast rule fit on the real training images
   (:mod:`medsynth.evaluation.lesion_contrast`; false-alarm rate 5 % per size bin on real
   lesion-free regions) decides whether the lesion is there; the same region of the image made
   without it gives the false-alarm rate on synthetic images. Beside it: the rule on the real
   held-out lesions (the ceiling) and on decoy regions of the real held-out images.
3. **A figure**: one seed, text only / mask only / text + mask, central axial slices.

Usage::

    medsynth demo --out runs/demo_ct                    # (and --modality mr for MR)
    python scripts/bench_conditioning.py --demo runs/demo_ct --out docs/benchmarks --num 8
    python scripts/bench_conditioning.py --demo runs/demo_ct --num 8 --mask-guidance 1.5 3 5   # + a sweep
    python scripts/bench_conditioning.py --demo runs/demo_ct --num 8 --lesion-masks 24          # + lesions by size

Writes ``conditioning_<modality>.json`` / ``.md`` and ``figures/conditioning_<modality>.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

LARGE_CLASSES = {"ct": ["liver", "spleen", "kidney_left", "kidney_right"],
                 "mr": ["white_matter", "grey_matter", "csf", "ventricles"]}
LESION = {"ct": ("liver_lesion", "liver lesion"), "mr": ("tumour_core", "tumour")}
# Where inserted lesions go, and whether contrast is relative to the surround (MR has no absolute
# intensity scale).
LESION_HOST = {"ct": "liver", "mr": "white_matter"}
RELATIVE_CONTRAST = {"ct": False, "mr": True}


def segmenter_lr() -> float:
    from medsynth.training.segmentation import AGREEMENT_LR

    return AGREEMENT_LR


def large_class_dice(prediction: np.ndarray, label: np.ndarray, labels: dict, modality: str) -> dict[str, float]:
    """Dice of each large organ of ``modality`` present in ``label`` (the quality gate's per-class Dice)."""
    from medsynth.pipelines.quality_gate import dice_per_class

    return dice_per_class(prediction, label, {n: labels[n] for n in LARGE_CLASSES[modality] if n in labels})


def text_conditioning(pipe, segmenter, modality: str, num: int, seed: int, steps: int, min_voxels: int,
                      prompt_lesion: str, prompt_none: str) -> dict:
    """Lesion rate of text-only samples for the two prompts (same seeds for both)."""
    lesion_value = pipe.labels[LESION[modality][0]]
    out = {}
    for name, prompt in (("lesion_prompt", prompt_lesion), ("no_lesion_prompt", prompt_none)):
        hits, voxels = 0, []
        for i in range(num):
            volume = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + i))[0]
            count = int((segmenter.predict(volume.array) == lesion_value).sum())
            voxels.append(count)
            hits += count >= min_voxels
        out[name] = {"prompt": prompt, "num": num, "with_lesion": hits, "rate": hits / num,
                     "lesion_voxels": voxels}
    return out


def real_reader(dataset, pipe) -> Callable[[Any], np.ndarray]:
    """``case -> image`` of a real case in the pipeline's output units *as the models saw it*.

    Each real case is mapped to the model range by its own dataset mapping (the CT window, or
    per-case percentiles on MR, as in training), then back with the pipeline's mapping, so the
    judge's ``predict`` (pipeline mapping forward) gives exactly what it was trained on. Reading
    an MR file as it is would not: its scale (600-1000 a.u. per phantom) and bias differ from case to
    case, and the pipeline's mapping is one fixed window.
    """
    from medsynth.data.patches import image_as_trained

    return lambda case: image_as_trained(dataset, case, file_reader(case), pipe.intensity)


def file_reader(case) -> np.ndarray:
    """A generated case's image as written (already in the pipeline's output units)."""
    from medsynth.io import read_volume

    return read_volume(case.image).array


def fresh_phantom_pairs(demo: Path, num: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num`` new real phantoms for the judge, ``[(model-range image, label)]``: made by
    ``medsynth phantoms`` with the demo's settings (from its phantom dataset.json) and a seed the
    demo did not use, then ``medsynth prepare``d as the demo prepares, so they are drawn from the
    held-out cases' distribution without being any of them."""
    import tempfile

    from medsynth.cli import build_parser
    from medsynth.pipelines.assemble import training_pairs

    block = json.loads((demo / "phantoms" / "dataset.json").read_text())["medsynth"]
    made, modality = block["phantoms"], str(block["modality"])
    seed = int(made["seed"]) + 7919  # phantom i of seed s is SeedSequence(s, spawn_key=(i,)): disjoint from the demo's
    with tempfile.TemporaryDirectory(prefix="medsynth_judge_phantoms_") as tmp:
        commands = [["phantoms", "--modality", modality.lower(), "--num", str(num), "--size", str(made["size"]),
                     "--out", f"{tmp}/phantoms", "--seed", str(seed), "--lesion-rate", str(made["lesion_rate"]),
                     "--noise", str(made.get("noise", "fixed")), "--no-progress"],
                    ["prepare", "--input", f"{tmp}/phantoms", "--out", f"{tmp}/prepared", "--modality",
                     modality.upper(), "--multiple-of", "8", "--no-progress"]]
        for argv in commands:
            args = build_parser().parse_args(argv)
            if int(args.func(args) or 0):
                sys.exit(f"`medsynth {' '.join(argv)}` failed")
        _, pairs = training_pairs(f"{tmp}/prepared", ("train", "val", "test"))
    return pairs


def real_judge(dataset, segmenter, lesion_value: int, min_voxels: int, read_image: Callable[[Any], np.ndarray]) -> dict:
    """The lesion rule on real held-out phantoms: how often it fires with / without a true lesion."""
    from medsynth.io import read_volume

    rows = {"with_lesion": [0, 0], "without_lesion": [0, 0]}
    for case in held_out_cases(dataset):
        label = read_volume(case.label, kind="label").array
        image = read_image(case)
        fired = int((segmenter.predict(image) == lesion_value).sum()) >= min_voxels
        key = "with_lesion" if (label == lesion_value).any() else "without_lesion"
        rows[key][0] += fired
        rows[key][1] += 1
    return {k: {"fired": f, "cases": n} for k, (f, n) in rows.items()}


def autoencoder_round_trip(pipe, image: np.ndarray, mask: Any = None) -> np.ndarray:
    """An image in output units through the pipeline's autoencoder (encode, quantise, decode), back
    in output units; with ``mask`` (a label Volume on the image grid) the pipeline's mask refiner
    then refines the decoded image from it."""
    x = torch.from_numpy(np.asarray(pipe.intensity.forward(np.asarray(image, np.float32)), np.float32))[None, None]
    with torch.no_grad():
        decoded = pipe.autoencoder.decode(pipe.autoencoder.encode(x))
        if mask is not None:
            decoded = pipe.refine_decoded(decoded, pipe.mask_onehot([mask], tuple(decoded.shape[2:])))
        decoded = decoded.clamp(-1, 1)[0, 0].numpy()
    return np.asarray(pipe.intensity.inverse(decoded), np.float32)


def held_out_cases(dataset, every_split: bool = False) -> list:
    """The labelled real cases outside the training split (val + test), in id order; with
    ``every_split``, every labelled case (a dataset no model was trained on)."""
    train = set() if every_split else set(dataset.splits.get("train", []))
    return [c for c in dataset.cases if c.case_id not in train and c.label is not None]


def judged_dice(cases, segmenter, labels: dict, modality: str, read_image: Callable[[Any], np.ndarray],
                pipe=None) -> dict[str, list[float]]:
    """The judge's Dice per large class on each case's image (``read_image(case)``, output units)
    against its own label map; with ``pipe``, on the image after the pipeline's autoencoder.
    ``{class: [Dice per case]}``."""
    from medsynth.io import read_volume

    per_class: dict[str, list[float]] = {}
    for case in cases:
        image = read_image(case)
        label = read_volume(case.label, kind="label").array
        if pipe is not None:
            image = autoencoder_round_trip(pipe, image)
        for name, value in large_class_dice(segmenter.predict(image), label, labels, modality).items():
            per_class.setdefault(name, []).append(value)
    return per_class


def mask_fidelity(dataset, cohort, segmenter, labels: dict, modality: str, pipe) -> dict:
    """Per-class Dice on generated cohort images vs their masks, on real held-out images (ceiling)
    and on the real held-out images after the pipeline's autoencoder (the ceiling of anything
    decoded from its latents)."""
    def score(cases, read_image, through: Any = None) -> dict:
        per_class = judged_dice(cases, segmenter, labels, modality, read_image, through)
        return {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "n": len(v)} for k, v in per_class.items()}

    held_out, real = held_out_cases(dataset), real_reader(dataset, pipe)
    return {"synthetic": score([c for c in cohort.cases if c.label is not None], file_reader),
            "real_ceiling": score(held_out, real), "real_cases": len(held_out), "synthetic_cases": len(cohort.cases),
            "autoencoder_ceiling": score(held_out, real, through=pipe)}


def mask_guidance_sweep(pipe, cohort, segmenter, labels: dict, modality: str, scales: list[float],
                        steps: int) -> dict:
    """Mask fidelity when each cohort image is made again from its own mask, prompt and seed
    (``provenance.jsonl``) at each mask guidance scale: ``{scale: {class: mean Dice}}``."""
    from medsynth.io import read_volume
    from medsynth.io.provenance import read_provenance_file

    provenance = read_provenance_file(cohort.root / "provenance.jsonl")
    # (mask, prompt, seed) of each cohort image, read once for all scales
    cases = [(read_volume(case.label, kind="label"), provenance[case.case_id])
             for case in cohort.cases if case.label is not None and case.case_id in provenance]
    jobs = [(mask, row.get("prompt"), None, int(row.get("seed", 0))) for mask, row in cases]
    return {f"{scale:g}": remade_fidelity(pipe, jobs, segmenter, labels, modality, scale, steps) for scale in scales}


def remade_dice(pipe, jobs: list, segmenter, labels: dict, modality: str, scale: float | None,
                steps: int, refine: bool = True, intensities: list | None = None) -> list[dict[str, float]]:
    """Generate one image per ``(mask, prompt, metadata, seed)`` job at mask guidance ``scale``
    (None: the ControlNet's default; ``refine``: with the pipeline's mask refiner, if it has one);
    the judge's Dice per large class on each, in job order. ``intensities``, when given, receives
    each image's :func:`organ_intensity` in job order."""
    out = []
    for mask, prompt, metadata, seed in jobs:
        volume = pipe(prompt, num_inference_steps=steps, mask=mask, mask_guidance_scale=scale, metadata=metadata,
                      generator=torch.Generator().manual_seed(seed), refine=refine)[0]
        out.append(large_class_dice(segmenter.predict(volume.array), np.asarray(mask.array), labels, modality))
        if intensities is not None:
            intensities.append(organ_intensity(volume.array, np.asarray(mask.array), labels, modality))
    return out


def organ_intensity(image: np.ndarray, label: np.ndarray, labels: dict, modality: str) -> dict[str, dict[str, float]]:
    """Median and standard deviation of ``image`` (output units: HU on CT) inside each large organ
    of ``label``, eroded by one voxel so that partial-volume boundary voxels do not count (the whole
    organ when erosion leaves nothing): ``{class: {"median", "std"}}``.

    Why: a mask refiner reads the label map, so it could paint flat, mask-shaped organs that a
    judge segments well; the median says whether an organ has its tissue's intensity, the std
    whether it keeps real texture and noise rather than a smoothed fill."""
    out = {}
    for name in LARGE_CLASSES[modality]:
        if name not in labels:
            continue
        organ = label == labels[name]
        if not organ.any():
            continue
        core = ndimage.binary_erosion(organ)
        values = np.asarray(image, np.float64)[core if core.any() else organ]
        out[name] = {"median": float(np.median(values)), "std": float(values.std())}
    return out


def intensity_summary(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``[{class: {"median", "std"}}]`` per case -> ``{class: {"median", "std"}}`` means over cases."""
    names = list(dict.fromkeys(name for row in per_case for name in row))
    return {n: {k: round(float(np.mean([row[n][k] for row in per_case if n in row])), 1) for k in ("median", "std")}
            for n in names}


def class_means(per_case: list[dict[str, float]]) -> dict[str, float]:
    """``[{class: Dice}]`` per case -> ``{class: mean over the cases that have it}`` (3 decimals)."""
    names = list(dict.fromkeys(name for row in per_case for name in row))
    return {n: round(float(np.mean([row[n] for row in per_case if n in row])), 3) for n in names}


def remade_fidelity(pipe, jobs: list, segmenter, labels: dict, modality: str, scale: float | None,
                    steps: int) -> dict[str, float]:
    """:func:`remade_dice` averaged: the judge's mean Dice per large class."""
    return class_means(remade_dice(pipe, jobs, segmenter, labels, modality, scale, steps))


# Organs split into this many size groups (by voxel count in the mask) for the held-out table:
# at 32^3 a small spleen is 20-60 voxels, where one voxel of boundary is a large share of Dice.
SIZE_GROUPS = 3


def held_out_mask_fidelity(pipe, dataset, segmenter, labels: dict, modality: str, num: int, scales: list,
                           steps: int, seed: int, refiner_baseline: bool = False, every_split: bool = False) -> dict:
    """Paired mask fidelity on masks the models never saw: for each labelled held-out real case
    (val + test, at most ``num``), an image is generated from its label map with its own prompt,
    sex and age, and the judge's Dice on it is set beside the judge's Dice on the real image of
    the same mask (the ceiling, case by case) and on that real image after the pipeline's
    autoencoder (what anything decoded from its latents can reach). ``scales``: mask guidance
    scales (None: the ControlNet's default); the first is analysed case by case. With a mask
    refiner in the pipeline, the real images after the autoencoder are also scored after the
    refiner (``autoencoder_refined``), and ``refiner_baseline`` adds each scale without it
    (``"<scale> unrefined"``: same seeds, same latents, the refiner skipped).

    Returns ``{"cases", "real", "autoencoder", "synthetic": {scale: means}, "ci95": {images:
    {class: [low, high]}}, "gap": {class: paired synthetic - real}, "by_size": {class: [group]},
    "rows": [{case_id, class, voxels, real, autoencoder, synthetic}]}``.
    """
    from medsynth.evaluation.segmentation import bootstrap_mean, paired_comparison
    from medsynth.io import read_volume

    cases = held_out_cases(dataset, every_split)[:num]
    read_real = real_reader(dataset, pipe)
    masks = [read_volume(case.label, kind="label") for case in cases]
    real, decoded, refined, real_intensity = [], [], [], []
    for case, mask in zip(cases, masks):
        image = read_real(case)
        real.append(large_class_dice(segmenter.predict(image), mask.array, labels, modality))
        real_intensity.append(organ_intensity(image, np.asarray(mask.array), labels, modality))
        decoded.append(large_class_dice(segmenter.predict(autoencoder_round_trip(pipe, image)), mask.array, labels,
                                        modality))
        if pipe.refiner is not None:
            refined.append(large_class_dice(segmenter.predict(autoencoder_round_trip(pipe, image, mask)), mask.array,
                                            labels, modality))
    jobs = [(mask, case.prompt or None,
             {k: case.metadata[k] for k in ("sex", "age") if (case.metadata or {}).get(k) is not None}, seed + index)
            for index, (case, mask) in enumerate(zip(cases, masks))]
    synthetic, intensity = {}, {"real": real_intensity}
    for scale in scales:
        key = "default" if scale is None else f"{scale:g}"
        intensity[key] = []
        synthetic[key] = remade_dice(pipe, jobs, segmenter, labels, modality, scale, steps,
                                     intensities=intensity[key])
    if refiner_baseline and pipe.refiner is not None:
        for scale in scales:
            key = ("default" if scale is None else f"{scale:g}") + " unrefined"
            intensity[key] = []
            synthetic[key] = remade_dice(pipe, jobs, segmenter, labels, modality, scale, steps, refine=False,
                                         intensities=intensity[key])
    first = next(iter(synthetic.values()))
    rows = [{"case_id": case.case_id, "class": name, "voxels": int((np.asarray(mask.array) == labels[name]).sum()),
             "real": round(r[name], 4), "autoencoder": round(d[name], 4), "synthetic": round(g[name], 4)}
            for case, mask, r, d, g in zip(cases, masks, real, decoded, first) for name in r if name in g and name in d]
    names = list(class_means(real))
    ci = {}
    for images, per_case in (("real", real), ("autoencoder", decoded), ("synthetic", first)):
        intervals = {n: bootstrap_mean([row[n] for row in per_case if n in row], seed=seed) for n in names}
        ci[images] = {n: [round(i.low, 3), round(i.high, 3)] for n, i in intervals.items()}
    gap = {}
    for n in names:
        pairs = [row for row in rows if row["class"] == n]
        compared = paired_comparison({row["case_id"]: row["real"] for row in pairs},
                                     {row["case_id"]: row["synthetic"] for row in pairs}, seed=seed)
        gain = compared.get("abs_gain") or {}
        gap[n] = {"mean": round(gain.get("value", float("nan")), 3),
                  "ci95": [round(gain.get("ci_low", float("nan")), 3), round(gain.get("ci_high", float("nan")), 3)],
                  "wilcoxon_p": compared.get("wilcoxon", {}).get("p_value")}
    return {"cases": len(cases), "real": class_means(real), "autoencoder": class_means(decoded),
            **({"autoencoder_refined": class_means(refined)} if refined else {}),
            "synthetic": {key: class_means(per_case) for key, per_case in synthetic.items()},
            "analysed_scale": next(iter(synthetic)), "ci95": ci, "gap": gap,
            "intensity": {images: intensity_summary(per_case) for images, per_case in intensity.items()},
            "by_size": size_groups(rows, names), "rows": rows}


def size_groups(rows: list[dict], names: list[str], groups: int = SIZE_GROUPS) -> dict[str, list[dict]]:
    """Per class, the held-out rows split into ``groups`` equal-count groups by organ voxel count:
    ``{class: [{"voxels": [low, high], "cases", "real", "autoencoder", "synthetic"}]}`` (mean Dice)."""
    out = {}
    for name in names:
        ordered = sorted((row for row in rows if row["class"] == name), key=lambda row: row["voxels"])
        out[name] = [{"voxels": [part[0]["voxels"], part[-1]["voxels"]], "cases": len(part),
                      **{k: round(float(np.mean([row[k] for row in part])), 3)
                         for k in ("real", "autoencoder", "synthetic")}}
                     for part in ([ordered[i] for i in idx] for idx in np.array_split(np.arange(len(ordered)), groups))
                     if part]
    return out


def size_figure(held: dict, out_png: Path) -> Path:
    """Judge Dice against organ size (voxels in the mask), one panel per large class: real images,
    the same after the autoencoder, and the image generated from the same mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsynth.evaluation.figures import save_figure

    names = list(held["real"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [row for row in held["rows"] if row["class"] == name]
        voxels = [row["voxels"] for row in rows]
        for key, marker, colour in (("real", "o", "tab:blue"), ("autoencoder", "^", "tab:orange"),
                                    ("synthetic", "x", "tab:red")):
            ax.scatter(voxels, [row[key] for row in rows], marker=marker, s=18, color=colour,
                       label={"real": "real", "autoencoder": "real after autoencoder",
                              "synthetic": "generated from the mask"}[key])
        ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("voxels in the mask")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("judge Dice")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"held-out masks ({held['cases']}): Dice against organ size (dashed: 0.80)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)
    return out_png


def lesion_detection(cohort, segmenter, lesion_value: int) -> dict:
    """Detection of each conditioned lesion (connected component) by the judge, by its equivalent
    diameter: ``{bin: {"detected", "lesions", "rate"}}``."""
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter
    from medsynth.evaluation.lesion_contrast import detection_by_bin, size_bin
    from medsynth.io import read_volume

    rows = []
    for case in cohort.cases:
        label_volume = read_volume(case.label, kind="label")
        label = label_volume.array
        if not (label == lesion_value).any():
            continue
        prediction = segmenter.predict(file_reader(case)) == lesion_value
        components, count = ndimage.label(label == lesion_value, structure=np.ones((3, 3, 3)))
        grid = Grid(label.shape, label_volume.spacing)
        for index in range(1, count + 1):
            component = components == index
            rows.append({"bin": size_bin(equivalent_diameter(int(component.sum()), grid)),
                         "detected": bool((prediction & component).any())})
    return detection_by_bin(rows)


def contrast_group(case, modality: str) -> str:
    """Which lesion contrast rule judges a case: one per MR sequence (a tumour core is darker than
    white matter on T1 and brighter on T2 and FLAIR), one for all CT cases."""
    return str((case.metadata or {}).get("sequence", "all")) if modality == "mr" else "all"


def fit_contrast_rules(dataset, pipe, modality: str, sizes_mm: list[float], seed: int) -> dict:
    """The lesion contrast rules ``{group: ContrastRule}`` fit on the real training split (images as
    the models saw them), one per :func:`contrast_group`."""
    from medsynth.evaluation.lesion_contrast import ContrastRule
    from medsynth.io import read_volume

    read = real_reader(dataset, pipe)
    train = set(dataset.splits.get("train", []))
    groups: dict[str, list] = {}
    for c in dataset.cases:
        if c.case_id in train and c.label is not None:
            groups.setdefault(contrast_group(c, modality), []).append(c)
    return {group: ContrastRule.fit(((read(c), read_volume(c.label, kind="label")) for c in cases),
                                    LESION[modality][0], LESION_HOST[modality], pipe.labels, sizes_mm,
                                    relative=RELATIVE_CONTRAST[modality], seed=seed)
            for group, cases in sorted(groups.items())}


def finding_prompt(prompt: str | None, modality: str, diameter_mm: float | None) -> str | None:
    """A phantom prompt (``"<head>, <finding>, <sex>, <age>"``) with its finding replaced: one lesion of
    ``diameter_mm``, or none (None)."""
    if not prompt:
        return prompt
    parts = prompt.split(", ")
    if diameter_mm is None:
        finding = "no lesion" if modality == "ct" else "no tumour"
    else:
        finding = f"liver lesion {diameter_mm:.0f} mm" if modality == "ct" else f"tumour {diameter_mm:.0f} mm with oedema"
    return ", ".join([parts[0], finding, *parts[2:]]) if len(parts) >= 2 else f"{prompt}, {finding}"


def paired_lesion_detection(pipe, dataset, rules: dict, modality: str, num: int, sizes_mm: list[float], steps: int,
                            seed: int, mask_guidance: float | None = None, refine: bool = True) -> dict:
    """Lesions inserted into held-out masks, judged by the contrast rule in images generated with and
    without them (same seed), beside the rule on real held-out lesions and on decoys in real images
    (``refine``: with the pipeline's mask refiner, if it has one)."""
    from medsynth.cohort.run import clear_lesions
    from medsynth.errors import ConfigError, InputError
    from medsynth.evaluation.lesion_contrast import (added_contrast_by_bin, contrast_by_bin, decoy_components,
                                                     detection_by_bin)
    from medsynth.evaluation.segmentation import lesion_classes
    from medsynth.io import read_volume
    from medsynth.pipelines.lesions import LesionSpec, insert_lesions

    labels = pipe.labels
    name, host = LESION[modality][0], LESION_HOST[modality]
    value, cleared = labels[name], [labels[n] for n in lesion_classes(labels)]  # MR: tumour core and oedema
    rng = np.random.default_rng(seed)
    read = real_reader(dataset, pipe)
    real_rows, decoy_rows, with_rows, without_rows, skipped = [], [], [], [], 0
    cases = held_out_cases(dataset)
    for index, case in enumerate(cases):
        mask = read_volume(case.label, kind="label")
        image = read(case)
        group = contrast_group(case, modality)
        if group not in rules:
            raise InputError(f"no contrast rule for {group!r} cases: the training split has none of them")
        rule = rules[group]
        real_rows += rule.judge(image, mask.array, [value], mask.spacing)
        decoys = decoy_components(mask, name, host, labels, sizes_mm, rng)
        decoy_rows += rule.judge(image, mask.array, [value], mask.spacing, components=decoys)
        if index >= num:
            continue
        clean, _ = clear_lesions(mask, cleared)
        size = sizes_mm[index % len(sizes_mm)]
        try:
            placed, records = insert_lesions(clean, [LesionSpec(name, 1, 0.9 * size, 1.1 * size, host)], labels, rng)
        except ConfigError:  # it does not fit this mask's host: the next mask takes the next size
            skipped += 1
            continue
        component = ((np.asarray(placed.array) == value) & (np.asarray(clean.array) != value)).astype(np.int32)
        metadata = {k: case.metadata[k] for k in ("sex", "age") if (case.metadata or {}).get(k) is not None}
        # the same region is judged in both images, with the surround the lesion has in the mask
        for target, lesion_mask, diameter in ((with_rows, placed, records[0]["diameter_mm"]),
                                              (without_rows, clean, None)):
            volume = pipe(finding_prompt(case.prompt, modality, diameter), num_inference_steps=steps,
                          mask=lesion_mask, mask_guidance_scale=mask_guidance, metadata=metadata or None,
                          generator=torch.Generator().manual_seed(seed + index), refine=refine)[0]
            target += [{**row, "group": group} for row in
                       rule.judge(volume.array, np.asarray(placed.array), [value], mask.spacing, components=component)]
    return {"rules": {g: r.to_dict() for g, r in rules.items()}, "held_out_cases": len(cases), "masks": min(num, len(cases)),
            "skipped_masks": skipped, "sizes_mm": sizes_mm,
            "real_lesions": detection_by_bin(real_rows), "real_decoys": detection_by_bin(decoy_rows),
            "synthetic_with_lesion": detection_by_bin(with_rows),
            "synthetic_without_lesion": detection_by_bin(without_rows),
            "mask_guidance": "default" if mask_guidance is None else mask_guidance,
            "real_contrast": contrast_by_bin(real_rows), "added_contrast": added_contrast_by_bin(with_rows, without_rows),
            # per rule group (MR sequence): a ControlNet that draws T1 cores with the T2 sign shows here
            "added_contrast_by_group": {g: added_contrast_by_bin([r for r in with_rows if r["group"] == g],
                                                                 [r for r in without_rows if r["group"] == g])
                                        for g in sorted({r["group"] for r in with_rows})},
            "rows": {"with_lesion": with_rows, "without_lesion": without_rows}}


def steering_figure(pipe, mask_volume, prompt: str, seed: int, steps: int, out_png: Path) -> Path:
    """Same seed: text only, mask only, text + mask; the mask's outline on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - the same noise for each panel
    panels = [("text only", pipe(prompt, num_inference_steps=steps, generator=gen(),
                                 size=mask_volume.shape, spacing=mask_volume.spacing)[0]),
              ("mask only", pipe(None, num_inference_steps=steps, generator=gen(), mask=mask_volume)[0]),
              ("text + mask", pipe(prompt, num_inference_steps=steps, generator=gen(), mask=mask_volume)[0])]
    label = np.asarray(mask_volume.array)
    z = int(np.argwhere(label > 0)[:, 2].mean()) if (label > 0).any() else label.shape[2] // 2
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (title, volume) in zip(axes, panels):
        ax.imshow(np.rot90(volume.array[:, :, z]), cmap="gray", vmin=-300 if pipe.modality == "CT" else None,
                  vmax=300 if pipe.modality == "CT" else None)
        for value in np.unique(label[:, :, z]):
            if value:
                ax.contour(np.rot90(label[:, :, z] == value), levels=[0.5], linewidths=0.6,
                           colors=[plt.cm.tab10(int(value) % 10)])
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"one seed, three conditions (outlines: the conditioning mask's labels)\nprompt: {prompt}", fontsize=9)
    fig.tight_layout()
    from medsynth.evaluation.figures import save_figure

    save_figure(fig, out_png, dpi=110)
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `medsynth demo` folder")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--num", type=int, default=8, help="text-only samples per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--min-lesion-voxels", type=int, default=2)
    parser.add_argument("--mask-guidance", type=float, nargs="*", default=[],
                        help="also remake the cohort images from their own masks, prompts and seeds at each of these "
                             "mask guidance scales and score them (e.g. 1.5 3 5)")
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help="0-1: guidance rescale for every mask-conditioned image (default: the pipeline's, "
                             "from its ControlNet config; 0 when it records none)")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="score this pipeline folder instead of the demo's own (e.g. one assembled with another "
                             "ControlNet); the cohort columns still show the demo's cohort images")
    parser.add_argument("--held-out-masks", type=int, default=0,
                        help="also generate from up to N held-out real label maps (val + test) and compare, mask by "
                             "mask, with the judge on the real images of the same masks")
    parser.add_argument("--held-out-data", type=Path, default=None,
                        help="take the held-out masks and real images from this prepared dataset instead (every "
                             "labelled case; e.g. fresh phantoms made with another seed), so that settings chosen on "
                             "the demo's held-out cases can be checked on cases nobody looked at")
    parser.add_argument("--lesion-masks", type=int, default=0,
                        help="also insert one lesion into each of up to N held-out label maps and judge, with a contrast "
                             "rule fit on the real training images, whether images generated with it show it (and "
                             "whether images generated without it show one there): lesion detection by size")
    parser.add_argument("--lesion-sizes", type=float, nargs="+", default=[25.0, 35.0, 45.0], metavar="MM",
                        help="diameters of the inserted lesions, used in turn (each +/- 10 %%)")
    parser.add_argument("--lesion-mask-guidance", type=float, default=None,
                        help="mask guidance scale of the --lesion-masks images (default: the ControlNet's)")
    parser.add_argument("--refiner-baseline", action="store_true",
                        help="with a mask refiner in the pipeline: also score the held-out masks and the paired "
                             "lesions without it (same seeds), side by side")
    parser.add_argument("--judge-dir", type=Path, default=None,
                        help="keep the trained judge here and reuse it when it is already there (trained on the same "
                             "demo's training split for the same --judge-steps; anything else is refused), so several "
                             "pipelines are scored by one judge")
    parser.add_argument("--judge-phantoms", type=int, default=0, metavar="N",
                        help="train the judge on N fresh real phantoms as well (made and prepared with the demo's own "
                             "phantom settings and another seed, so none is a held-out case): more real data for the "
                             "judge (0: the training split only)")
    parser.add_argument("--judge-lr-schedule", choices=("constant", "poly"), default="constant",
                        help="the judge's learning rate: constant 1e-2 (default; the earlier pages) or nnU-Net's "
                             "polynomial decay to 0 over --judge-steps")
    parser.add_argument("--judge-augmentation", choices=("none", "standard"), default="none",
                        help="augment the judge's training patches (standard: rotation, scaling, blur, noise, "
                             "brightness, contrast, gamma; no mirroring) or not (default none; the earlier pages)")
    parser.add_argument("--judge-window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="CT only: the HU window the judge reads its images in (e.g. -160 240, a soft-tissue "
                             "window like nnU-Net's CT normalisation); default: the pipeline's own window "
                             "([-1000, 1000] in the demo), where liver and spleen differ by about 0.01")
    parser.add_argument("--judge-steps", type=int, default=2000,
                        help="train the judge (SegResNet) this long on the real training split; 0: use the "
                             "pipeline's own quality-gate segmenter (the demo trains it briefly)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    from medsynth.data.manifest import read_dataset
    from medsynth.io import read_volume
    from medsynth.pipelines.pipeline import MedSynthPipeline
    from medsynth.pipelines.quality_gate import segmenter_from_record

    start = time.perf_counter()
    summary = json.loads((args.demo / "demo_summary.json").read_text())
    modality = summary["settings"]["modality"]
    pipe = MedSynthPipeline.from_pretrained(args.pipeline or args.demo / "pipeline", device="cpu")
    if args.guidance_rescale is not None:
        if not 0.0 <= args.guidance_rescale <= 1.0:
            parser.error(f"--guidance-rescale must be between 0 and 1, got {args.guidance_rescale}")
        pipe.default_guidance_rescale = float(args.guidance_rescale)  # every masked call below uses it
    if args.judge_dir is not None and args.judge_steps <= 0:
        sys.exit("--judge-dir keeps a judge trained with --judge-steps > 0; with --judge-steps 0 the pipeline's own "
                 "segmenter is used and there is nothing to keep")
    # what a kept judge must have been trained on to be reused
    trained_on = {"data": str((args.demo / "prepared").resolve()), "split": "train", "steps": args.judge_steps}
    if args.judge_phantoms:
        trained_on["fresh_phantoms"] = args.judge_phantoms
    if args.judge_lr_schedule != "constant":
        trained_on["lr_schedule"] = args.judge_lr_schedule
    if args.judge_augmentation != "none":
        trained_on["augmentation"] = args.judge_augmentation
    if args.judge_window is not None:
        if modality != "ct" or args.judge_steps <= 0:
            sys.exit(f"--judge-window is for a CT judge trained here (--judge-steps > 0); got modality {modality}, "
                     f"--judge-steps {args.judge_steps}")
        if not args.judge_window[0] < args.judge_window[1]:
            sys.exit(f"--judge-window needs LOW < HIGH in HU, got {args.judge_window}")
        trained_on["window"] = [float(v) for v in args.judge_window]
    if args.judge_phantoms < 0 or (args.judge_phantoms and args.judge_steps <= 0):
        sys.exit(f"--judge-phantoms needs a count >= 0 and a judge to train (--judge-steps > 0), got "
                 f"--judge-phantoms {args.judge_phantoms} --judge-steps {args.judge_steps}")
    trained_on_words = "real train split" + (f" + {args.judge_phantoms} fresh real phantoms" if args.judge_phantoms else "")
    schedule_words = "constant learning rate" if args.judge_lr_schedule == "constant" else "learning rate decayed (poly)"
    # what the record says about how the judge was trained, loaded or not
    judge_training = {"trained_on": trained_on_words, "lr": segmenter_lr(), "lr_schedule": schedule_words,
                      "augmentation": args.judge_augmentation,
                      **({"window_hu": trained_on["window"]} if "window" in trained_on else {})}
    if args.judge_dir is not None and (args.judge_dir / "config.json").is_file():
        from medsynth.training.segmentation import load_agreement_segmenter

        kept = json.loads((args.judge_dir / "trained_on.json").read_text()) \
            if (args.judge_dir / "trained_on.json").is_file() else None
        if kept != trained_on:
            sys.exit(f"--judge-dir {args.judge_dir} holds a judge trained on {kept}, not on {trained_on}; "
                     "give another folder")
        segmenter = load_agreement_segmenter(args.judge_dir)
        judge = {"kind": "segresnet", "steps": segmenter.steps, **judge_training, "loaded_from": str(args.judge_dir)}
    elif args.judge_steps > 0:
        from medsynth.data.transforms import IntensityMapping
        from medsynth.pipelines.assemble import training_pairs
        from medsynth.training.segmentation import fit_agreement_segmenter

        real, pairs = training_pairs(args.demo / "prepared", ("train",))
        labels = {k: int(v) for k, v in real.labels.items() if k != "ignore"}
        if args.judge_phantoms:
            pairs += fresh_phantom_pairs(args.demo, args.judge_phantoms)
        judge_intensity = IntensityMapping.from_dict(pipe.record["intensity"])
        if args.judge_window is not None:  # the pairs are in the pipeline's model range: back to HU, into the window
            window = IntensityMapping.ct_window(args.judge_window)
            pairs = [(np.asarray(window.forward(judge_intensity.inverse(image)), np.float32), label)
                     for image, label in pairs]
            judge_intensity = window
        segmenter = fit_agreement_segmenter(pairs, labels, judge_intensity,
                                            args.judge_steps, patch=32, seed=0, accelerator="cpu",
                                            lr_schedule=args.judge_lr_schedule,
                                            augmentation=args.judge_augmentation)
        judge = {"kind": "segresnet", "steps": args.judge_steps, **judge_training, "training_cases": len(pairs)}
        if args.judge_dir is not None:
            from medsynth.training.segmentation import save_agreement_segmenter

            save_agreement_segmenter(args.judge_dir, segmenter)
            (args.judge_dir / "trained_on.json").write_text(json.dumps(trained_on))
    else:
        if pipe.quality is None or pipe.quality.get("segmenter", {}).get("kind") != "segresnet":
            sys.exit("the demo's pipeline has no trained agreement segmenter (assemble --segmenter-steps > 0)")
        segmenter = segmenter_from_record(pipe.quality)
        judge = pipe.quality["segmenter"]
    dataset = read_dataset(args.demo / "prepared")
    cohort = read_dataset(args.demo / "cohort")
    lesion_name, lesion_words = LESION[modality]
    lesion_value = pipe.labels[lesion_name]
    head = "CT abdomen portal venous" if modality == "ct" else "MR head T1"
    prompt_lesion = f"{head}, {lesion_words} 30 mm" if modality == "ct" else f"{head}, {lesion_words} 30 mm with oedema"

    record = {"demo": str(args.demo), "pipeline": str(args.pipeline or args.demo / "pipeline"), "modality": modality,
              "size": summary["settings"]["size"],
              "segmenter": judge, "steps": args.steps, "seed": args.seed,
              "guidance_rescale": pipe.default_guidance_rescale,
              "refiner": None if pipe.refiner is None else pipe.record["components"]["refiner"].get("source"),
              "min_lesion_voxels": args.min_lesion_voxels,
              "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform()},
              "command": "python scripts/bench_conditioning.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    record["text"] = text_conditioning(pipe, segmenter, modality, args.num, args.seed, args.steps,
                                       args.min_lesion_voxels, prompt_lesion, head)
    record["judge_on_real"] = real_judge(dataset, segmenter, lesion_value, args.min_lesion_voxels,
                                         real_reader(dataset, pipe))
    record["mask_fidelity"] = mask_fidelity(dataset, cohort, segmenter, pipe.labels, modality, pipe)
    record["lesion_detection"] = lesion_detection(cohort, segmenter, lesion_value)
    if args.mask_guidance:
        record["mask_guidance_sweep"] = mask_guidance_sweep(pipe, cohort, segmenter, pipe.labels, modality,
                                                            args.mask_guidance, args.steps)
    if args.held_out_masks > 0:
        held_data = dataset if args.held_out_data is None else read_dataset(args.held_out_data)
        record["held_out_masks"] = held_out_mask_fidelity(pipe, held_data, segmenter, pipe.labels, modality,
                                                          args.held_out_masks, args.mask_guidance or [None],
                                                          args.steps, args.seed, args.refiner_baseline,
                                                          every_split=args.held_out_data is not None)
        if args.held_out_data is not None:
            record["held_out_masks"]["data"] = str(args.held_out_data)
        record["held_out_masks"]["figure"] = str(size_figure(
            record["held_out_masks"], args.out / "figures" / f"held_out_masks_{modality}.png"))
    if args.lesion_masks > 0:
        from medsynth.errors import InputError

        try:
            rules = fit_contrast_rules(dataset, pipe, modality, args.lesion_sizes, args.seed)
            record["lesion_contrast"] = paired_lesion_detection(pipe, dataset, rules, modality, args.lesion_masks,
                                                                args.lesion_sizes, args.steps, args.seed,
                                                                args.lesion_mask_guidance)
            if args.refiner_baseline and pipe.refiner is not None:
                record["lesion_contrast_unrefined"] = paired_lesion_detection(
                    pipe, dataset, rules, modality, args.lesion_masks, args.lesion_sizes, args.steps, args.seed,
                    args.lesion_mask_guidance, refine=False)
        except InputError as err:  # e.g. no real lesion in a small training split: say so on the page
            record["lesion_contrast"] = {"skipped": str(err)}
    with_mask = next(c for c in cohort.cases if c.label is not None)
    figure = steering_figure(pipe, read_volume(with_mask.label, kind="label"), prompt_lesion, args.seed, args.steps,
                             args.out / "figures" / f"conditioning_{modality}.png")
    record["figure"] = str(figure)
    record["seconds"] = round(time.perf_counter() - start, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"conditioning_{modality}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"conditioning_{modality}.md").write_text(render(record, figure.relative_to(args.out)))
    print(render(record, figure))
    return 0


def held_out_details(held: dict, names: list[str]) -> list[str]:
    """The held-out section's intervals, paired gap and organ-size table (markdown lines)."""
    interval = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
    scale = held["analysed_scale"]
    lines = ["", f"Case by case at mask guidance `{scale}`: 95 % bootstrap intervals of the mean over cases, and "
             "the paired gap (generated minus real image of the same mask; Wilcoxon signed-rank p).", "",
             "| class | real | real after the autoencoder | generated | gap to real | p |", "|---|---|---|---|---|---|"]
    for n in names:
        gap = held["gap"][n]
        p = "-" if gap["wilcoxon_p"] is None else f"{gap['wilcoxon_p']:.2g}"
        lines.append(f"| {n} | " + " | ".join(f"{held[k][n] if k != 'synthetic' else held['synthetic'][scale][n]:.3f} "
                                                f"{interval(held['ci95'][k][n])}"
                                                for k in ("real", "autoencoder", "synthetic"))
                     + f" | {gap['mean']:+.3f} {interval(gap['ci95'])} | {p} |")
    lines += ["", f"By organ size (voxels in the mask, {len(next(iter(held['by_size'].values())))} equal-count "
              "groups per class): small organs are where every image, real ones included, loses Dice at this grid.",
              "", "| class | voxels | cases | real | real after the autoencoder | generated |",
              "|---|---|---|---|---|---|"]
    for n in names:
        for group in held["by_size"][n]:
            lines.append(f"| {n} | {group['voxels'][0]}-{group['voxels'][1]} | {group['cases']} | {group['real']:.3f} "
                         f"| {group['autoencoder']:.3f} | {group['synthetic']:.3f} |")
    if held.get("figure"):
        lines += ["", f"![Dice against organ size](figures/{Path(held['figure']).name})"]
    if held.get("intensity"):
        lines += ["", "Inside each organ (eroded by one voxel; output units): median / standard deviation, mean over "
                  "the cases. A generated organ should have its tissue's median and a real image's spread (texture "
                  "and noise), not a flat fill shaped like the mask.", "",
                  "| images | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for images, row in held["intensity"].items():
            label = "real" if images == "real" else f"generated, mask guidance {images}"
            lines.append(f"| {label} | " + " | ".join(f"{row[n]['median']:.0f} / {row[n]['std']:.0f}" if n in row
                                                       else "-" for n in names) + " |")
    return lines


def render(r: dict, figure: Path) -> str:
    from medsynth.evaluation.lesion_contrast import bin_start

    t, j, m = r["text"], r["judge_on_real"], r["mask_fidelity"]
    lines = [f"# Conditioning at demo scale: {r['modality'].upper()} phantoms {r['size']}^3 (CPU)", "",
             f"Command: `{r['command']}` on a finished `medsynth demo --modality {r['modality']}` folder. "
             f"Machine: {r['machine']}. Judge: "
             f"a SegResNet trained {r['segmenter'].get('steps')} steps on the demo's "
             f"{r['segmenter'].get('trained_on', 'real train split').replace('real train split', 'real training split')}"
             f"{', ' + r['segmenter']['lr_schedule'] if 'lr_schedule' in r['segmenter'] else ''}"
             f"{', ' + r['segmenter']['augmentation'] + ' augmentation' if r['segmenter'].get('augmentation', 'none') != 'none' else ''}; "
             "its Dice on real held-out phantoms is the ceiling below. "
             f"{r['steps']} sampling steps, guidance rescale {r.get('guidance_rescale', 0.0):g} on "
             "mask-conditioned images. Tiny models trained for minutes on a CPU: these numbers show "
             "what the demo reaches, not what trained models reach.", "",
             "## Text conditioning (text only, no mask)", "",
             "| prompt | samples | with a lesion (>= %d voxels) | rate |" % r["min_lesion_voxels"], "|---|---|---|---|"]
    for key in ("lesion_prompt", "no_lesion_prompt"):
        lines.append(f"| `{t[key]['prompt']}` | {t[key]['num']} | {t[key]['with_lesion']} | {t[key]['rate']:.2f} |")
    lines += ["", "The same rule on real held-out phantoms (how good the judge is): fires on "
              f"{j['with_lesion']['fired']}/{j['with_lesion']['cases']} cases with a lesion and "
              f"{j['without_lesion']['fired']}/{j['without_lesion']['cases']} without.", "",
              "## Mask fidelity (cohort images vs their conditioning masks)", "",
              "| class | Dice on synthetic (mean, min, n) | ceiling: Dice on real held-out (mean, n) | "
              "real held-out after the autoencoder (mean) |", "|---|---|---|---|"]
    for name, s in m["synthetic"].items():
        c = m["real_ceiling"].get(name, {})
        a = m.get("autoencoder_ceiling", {}).get(name, {})
        lines.append(f"| {name} | {s['mean']:.3f}, {s['min']:.3f}, {s['n']} | "
                     f"{c.get('mean', float('nan')):.3f}, {c.get('n', 0)} | {a.get('mean', float('nan')):.3f} |")
    lines += ["", "The last column runs the real held-out images through the pipeline's autoencoder (encode, "
              "quantise, decode) first: what any image decoded from its latents can reach with this judge."]
    sweep = r.get("mask_guidance_sweep") or {}
    if sweep:
        names = list(next(iter(sweep.values())))
        lines += ["", "## Mask guidance scale", "", "Each cohort image made again from its own mask, prompt and seed "
                  "at each mask guidance scale; mean Dice of the judge against the mask.", "",
                  "| mask guidance | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for scale, row in sweep.items():
            lines.append(f"| {scale} | " + " | ".join(f"{row.get(n, float('nan')):.3f}" for n in names) + " |")
    held = r.get("held_out_masks")
    if held:
        names = list(held["real"])
        lines += ["", "## Mask fidelity on held-out masks (paired)", "",
                  f"An image generated from each of {held['cases']} held-out real label maps (val + test: masks no "
                  "model was trained on) with that case's prompt, sex and age; the judge's mean Dice against the "
                  "mask, beside the judge on the real images of the same masks."
                  + (f" Masks and real images from `{held['data']}` (every labelled case)." if held.get("data")
                     else ""), "",
                  "| images | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| real (ceiling) | " + " | ".join(f"{held['real'][n]:.3f}" for n in names) + " |"]
        if "autoencoder" in held:
            lines.append("| real after the autoencoder | " + " | ".join(f"{held['autoencoder'][n]:.3f}"
                                                                       for n in names) + " |")
        if "autoencoder_refined" in held:
            lines.append("| real after the autoencoder and the mask refiner | " + " | ".join(
                f"{held['autoencoder_refined'][n]:.3f}" for n in names) + " |")
        for scale, row in held["synthetic"].items():
            guidance, _, unrefined = scale.partition(" ")
            label = "synthetic, default mask guidance" if guidance == "default" \
                else f"synthetic, mask guidance {guidance}"
            if r.get("refiner"):  # the benchmarked pipeline refined its mask-conditioned images
                label += ", without the refiner" if unrefined else ", with the mask refiner"
            lines.append(f"| {label} | " + " | ".join(f"{row.get(n, float('nan')):.3f}" for n in names) + " |")
        if "ci95" in held:
            lines += held_out_details(held, names)
    lines += ["", "## Lesion detection by size (cohort lesions)", "", "| diameter | detected / lesions | rate |",
              "|---|---|---|"]
    for key, v in r["lesion_detection"].items():
        lines.append(f"| {key} | {v['detected']}/{v['lesions']} | {v['rate']:.2f} |")
    paired = r.get("lesion_contrast")
    if paired and "skipped" in paired:
        lines += ["", "## Lesion detection by size (paired, contrast rule)", "", f"Not measured: {paired['skipped']}."]
    elif paired:
        rules = paired["rules"]
        rule = next(iter(rules.values()))
        unit = "relative to the surround mean" if rule["relative"] else "output units (HU)"
        per_group = "" if len(rules) == 1 else (
            f" One rule per MR sequence ({', '.join(rules)}; thresholds in that order): the sign of a tumour's "
            "contrast differs between them.")
        lines += ["", "## Lesion detection by size (paired, contrast rule)", "",
                  f"One lesion inserted into each of {paired['masks'] - paired['skipped_masks']} held-out label maps "
                  f"({paired['skipped_masks']} had no room), sizes {paired['sizes_mm']} mm in turn; an image generated "
                  "from the map with the lesion and a prompt asking for it, and one from the map without it and a "
                  "prompt asking for none (same seed). A lesion counts as shown when its contrast against the tissue "
                  f"around it ({unit}) exceeds the threshold of its size bin, fit on the real training images so that "
                  f"{rule['false_alarm']:.0%} of lesion-free real regions of that size pass "
                  f"({' + '.join(str(r['real_lesions']) for r in rules.values())} real lesions set the sign; decoys "
                  f"per bin {[r['decoys'] for r in rules.values()]}).{per_group}", "",
                  "| diameter | threshold | real held-out lesions (ceiling) | real held-out, lesion-free decoys | "
                  "synthetic, lesion in mask | synthetic, same region without it |", "|---|---|---|---|---|---|"]
        bins = sorted({b for key in ("real_lesions", "real_decoys", "synthetic_with_lesion", "synthetic_without_lesion")
                       for b in paired[key]}, key=bin_start)
        cell = lambda v: "-" if v is None else f"{v['detected']}/{v['lesions']} ({v['rate']:.2f})"  # noqa: E731
        for b in bins:
            threshold = " / ".join(f"{r['thresholds'].get(b, r['pooled_threshold']):.3g}" for r in rules.values())
            lines.append(f"| {b} | {threshold} | " + " | ".join(
                cell(paired[key].get(b)) for key in ("real_lesions", "real_decoys", "synthetic_with_lesion",
                                                     "synthetic_without_lesion")) + " |")
        added, real = paired.get("added_contrast", {}), paired.get("real_contrast", {})
        spread = lambda v: "-" if v is None else (  # noqa: E731
            f"{v['mean']:.3g}" + ("" if v["se"] is None else f" +/- {v['se']:.2g}") + f" (n = {v['lesions']})")
        lines += ["", "The contrast each lesion adds to its region (image with it minus image without it, same seed "
                  "and region; mean +/- standard error), beside the contrast of the real held-out lesions. This "
                  "cancels what the generator draws in the region anyway, which the rule's real-image thresholds "
                  f"cannot know about. Mask guidance: {paired.get('mask_guidance', 'default')}.", "",
                  "| diameter | real lesions: contrast | synthetic: contrast added by the lesion | "
                  "added contrast above the threshold |", "|---|---|---|---|"]
        for b in sorted(set(added) | set(real), key=bin_start):
            hits = "-" if b not in added else f"{added[b]['above_threshold']}/{added[b]['lesions']}"
            lines.append(f"| {b} | {spread(real.get(b))} | {spread(added.get(b))} | {hits} |")
        by_group = paired.get("added_contrast_by_group", {})
        if len(by_group) > 1:
            lines += ["", "The same added contrast per rule (signed so that a lesion drawn like a real one is "
                      "positive in every sequence):", "", "| rule | " + " | ".join(
                          b for b in sorted(added, key=bin_start)) + " |", "|---" * (len(added) + 1) + "|"]
            for g, row in by_group.items():
                lines.append(f"| {g} | " + " | ".join(spread(row.get(b)) for b in sorted(added, key=bin_start)) + " |")
    unrefined = r.get("lesion_contrast_unrefined")
    if paired and unrefined and "skipped" not in paired:
        lines += ["", "The same lesions and seeds without the mask refiner (`--refiner-baseline`):", "",
                  "| diameter | lesion in mask: refined | unrefined | same region without it: refined | unrefined "
                  "| added contrast: refined | unrefined |", "|---|---|---|---|---|---|---|"]
        cell = lambda v: "-" if v is None else f"{v['detected']}/{v['lesions']}"  # noqa: E731
        mean = lambda v: "-" if v is None else f"{v['mean']:.3g}"  # noqa: E731
        for b in sorted(set(paired["synthetic_with_lesion"]) | set(unrefined["synthetic_with_lesion"]), key=bin_start):
            lines.append(f"| {b} | " + " | ".join(
                [cell(run[key].get(b)) for key in ("synthetic_with_lesion", "synthetic_without_lesion")
                 for run in (paired, unrefined)]
                + [mean(run["added_contrast"].get(b)) for run in (paired, unrefined)]) + " |")
    lines += ["", f"![text only, mask only, text + mask]({figure})", "", f"Run time: {r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
