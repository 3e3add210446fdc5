"""Label generator benchmark (CPU): does it reproduce the training label statistics, and at what cost?

    python scripts/bench_label_generator.py [--num 40] [--samples 48] [--ae-steps 400] [--dit-steps 1500]

1. ``medsynth phantoms`` (CT, 32^3) + ``medsynth prepare`` -> a dataset folder;
2. ``medsynth labels fit`` with ``configs/labels/tiny.yaml`` (steps overridden) on its train split;
3. sample ``--samples`` maps with the few-step sampler (rectified flow, Euler, 10 steps) and
   compare per-class volumes with the train split's (relative difference of medians,
   two-sample KS statistic); the same for a small set sampled with 1000 Euler steps of the same
   model, and for the real val split against train (how far two real samples of this size are);
4. attributes: maps asked for liver size quantiles 0.1 and 0.9, and for a lesion count;
5. cost: seconds per map of 10 Euler steps vs 1000 Euler steps and vs 1000 DDPM steps of the same
   network (the DDPM run measures the cost of a 1000-step model; its maps are not scored, since
   the network predicts velocities, not noise).

Writes docs/benchmarks/label_generator_cpu.json and .md. Torch runs on ``--threads`` threads
(default 1): the benchmark machine's 2 cores are shared, so timings are noisy upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_JSON = REPO / "docs" / "benchmarks" / "label_generator_cpu.json"
# Tolerances the benchmark checks, for classes whose median training volume is at least
# MIN_CLASS_ML (smaller classes are a few voxels at 32^3 and reported without a verdict).
TOLERANCE_MEDIAN = 0.20
TOLERANCE_KS = 0.35
MIN_CLASS_ML = 50.0


def _cli(argv: list[str]) -> None:
    from medsynth.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"medsynth {' '.join(argv)} failed with exit code {code}")


def _stats(volumes) -> dict:
    from medsynth.evaluation.label_statistics import case_statistics, collect_statistics

    return collect_statistics([case_statistics(v.array, LABELS, v.spacing) for v in volumes])


def _sample(gen, n: int, batch: int, seed: int, prompts: list[str], **kwargs) -> tuple[list, float]:
    import torch

    maps, start = [], time.perf_counter()
    for first in range(0, n, batch):
        count = min(batch, n - first)
        gens = [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
        maps += gen([prompts[(first + i) % len(prompts)] for i in range(count)], gens, **kwargs)
    return maps, (time.perf_counter() - start) / n


def _verdicts(comparison: dict, reference: dict) -> dict:
    out = {}
    for name, row in comparison["volumes"].items():
        if row["reference_median_ml"] < MIN_CLASS_ML:
            continue
        out[name] = bool(row["relative_median_difference"] <= TOLERANCE_MEDIAN
                         and (row["ks_statistic"] or 0) <= TOLERANCE_KS)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=40, help="phantom cases (70 %% train)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=48, help="maps sampled with 10 steps")
    parser.add_argument("--long-samples", type=int, default=8, help="maps sampled with 1000 Euler steps")
    parser.add_argument("--steps", type=int, default=10, help="few-step sampler steps")
    parser.add_argument("--ae-steps", type=int, default=1500)
    parser.add_argument("--dit-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("MEDSYNTH_BENCH_DIR",
                                                                          "/tmp/medsynth_bench_labels")))
    parser.add_argument("--keep", action="store_true", help="reuse the phantoms, dataset and model in --work")
    parser.add_argument("--out", type=Path, default=OUT_JSON, help="result JSON (the markdown goes beside it)")
    parser.add_argument("--alone", action="store_true",
                        help="say that nothing else ran on the machine (default: timings are marked as shared)")
    args = parser.parse_args()

    import numpy as np
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.work
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if not (work / "data" / "dataset.json").is_file():
        _cli(["phantoms", "--modality", "ct", "--num", str(args.num), "--size", str(args.size), "--lesion-rate", "0.5",
              "--out", str(work / "phantoms"), "--no-progress"])
        _cli(["prepare", "--input", str(work / "phantoms"), "--out", str(work / "data"), "--no-progress"])
    timings["data_s"] = round(time.perf_counter() - t, 1)

    config = yaml.safe_load((REPO / "configs" / "labels" / "tiny.yaml").read_text())
    config["autoencoder_training"]["max_steps"] = args.ae_steps
    config["dit_training"]["max_steps"] = args.dit_steps
    (work / "labels.yaml").write_text(yaml.safe_dump(config))
    t = time.perf_counter()
    export = work / "run" / "export"
    if not (args.keep and (export / "config.json").is_file()):
        _cli(["labels", "fit", "--data", str(work / "data"), "--config", str(work / "labels.yaml"),
              "--out", str(work / "run"), "--accelerator", "cpu"])
    timings["fit_s"] = round(time.perf_counter() - t, 1)

    from medsynth.data.manifest import read_dataset
    from medsynth.diffusion import make_scheduler
    from medsynth.evaluation.label_statistics import compare_statistics, volume_quantile
    from medsynth.io.reader import read_volume
    from medsynth.pipelines.label_generator_source import SIZE_QUANTILE_TOLERANCE, LabelGenerator

    global LABELS
    gen = LabelGenerator.from_pretrained(export)
    LABELS = gen.labels
    train = gen.statistics
    dataset = read_dataset(work / "data")
    if "lesion_sizes_ml" not in train:  # exports made before per-lesion sizes were collected
        train = {**train, "lesion_sizes_ml": _stats([read_volume(c.label, kind="label")
                                                     for c in dataset.cases_for("train")])["lesion_sizes_ml"]}
    prompts = [c.prompt or "" for c in dataset.cases_for("train")]
    val = _stats([read_volume(c.label, kind="label") for c in dataset.cases_for("val")])

    few, few_s = _sample(gen, args.samples, 8, 1000, prompts)
    few_cmp = compare_statistics(train, _stats(few))
    # Baseline in the same run: the same latents (same seeds) decoded without the volume
    # calibration (plain argmax), as exports made before it decode them.
    offsets, gen.class_offsets = gen.class_offsets, None
    plain, _ = _sample(gen, args.samples, 8, 1000, prompts)
    gen.class_offsets = offsets
    plain_cmp = compare_statistics(train, _stats(plain))
    long_maps, long_s = _sample(gen, args.long_samples, args.long_samples, 1000, prompts, num_inference_steps=1000)
    long_cmp = compare_statistics(train, _stats(long_maps))
    # Cost per map at batch 1 (no batching advantage for any sampler).
    _, ddpm_s = _sample(gen, 1, 1, 7, prompts, num_inference_steps=1000, scheduler=make_scheduler("epsilon", "ddpm"))
    _, few_s_b1 = _sample(gen, 4, 1, 5, prompts)
    _, long_s_b1 = _sample(gen, 1, 1, 5, prompts, num_inference_steps=1000)

    from medsynth.training.label_generator import encode_labels, read_label_cases, reconstruction_dice

    cases = read_label_cases(work / "data", 8)
    recon = reconstruction_dice(gen.autoencoder, encode_labels(gen.autoencoder, cases.arrays), cases.arrays, LABELS,
                                gen.class_offsets)
    liver = np.asarray(train["volumes_ml"]["liver"], dtype=float)
    asked = {}
    # Each attribute is asked twice: with no text (the attribute and the metadata are the only
    # conditions) and with the training prompts, which state the lesion finding themselves
    # ("liver lesion 14 mm" / "no lesion") and so may contradict the asked-for count.
    text_modes = {"no text": [None], "training prompts": prompts}
    held_draws = gen.max_draws
    for mode, mode_prompts in text_modes.items():
        for guidance in (1.0, 4.0):
            for q in (0.1, 0.9):
                # the model alone; at guidance 4 also with the size held (redraws up to max_draws)
                for draws in (0, held_draws) if guidance == 4.0 else (0,):
                    gen.max_draws = draws
                    maps, _ = _sample(gen, 16, 8, 2000, mode_prompts, volume_quantiles={"liver": q},
                                      guidance_scale=guidance)
                    vols = _stats(maps)["volumes_ml"]["liver"]
                    quantiles = [volume_quantile(liver, float(v)) for v in vols]
                    asked[f"liver_q{q}_guidance{guidance:g}_{mode}" + ("_held" if draws else "")] = {
                        "asked_quantile": q, "guidance_scale": guidance, "text": mode, "max_draws": draws,
                        "training_volume_at_quantile_ml": round(float(np.quantile(liver, q)), 1),
                        "generated_median_ml": round(float(np.median(vols)), 1),
                        "generated_median_as_training_quantile": round(volume_quantile(liver, float(np.median(vols))),
                                                                       3),
                        "within_tolerance_fraction": round(float(np.mean(
                            np.abs(np.asarray(quantiles) - q) <= SIZE_QUANTILE_TOLERANCE)), 3)}
    gen.max_draws = held_draws
    lesion_name = "liver_lesion"
    seen = [int(c) for c in train["lesion_counts"].get(lesion_name, [])]
    lesions = {"training_histogram": compare_statistics(train, train)["lesion_counts"][lesion_name]["reference_histogram"]}
    for mode, mode_prompts in text_modes.items():
        for count in sorted({0, max(seen)}):
            # the model alone (no redraws, no trimming), then with the count held (the default)
            for tries in (0, held_draws):
                gen.max_draws = tries
                t = time.perf_counter()
                maps, _ = _sample(gen, 16, 8, 3000, mode_prompts, lesion_counts={lesion_name: count},
                                  guidance_scale=4.0)
                seconds = (time.perf_counter() - t) / len(maps)
                got_stats = _stats(maps)
                got = got_stats["lesion_counts"][lesion_name]
                sizes = compare_statistics(train, got_stats)["lesion_sizes"].get(lesion_name)
                records = [m.metadata.extra["mask_source"].get("held") for m in maps]
                lesions[f"asked_{count}_{mode}" + ("" if tries else "_model_alone")] = {
                    "asked": count, "text": mode, "guidance_scale": 4.0, "max_draws": tries,
                    "mean": round(float(np.mean(got)), 3),
                    "exact_fraction": round(float(np.mean(np.asarray(got) == count)), 3),
                    "histogram": compare_statistics(train, {"volumes_ml": {}, "lesion_counts": {
                        lesion_name: got}})["lesion_counts"][lesion_name]["generated_histogram"],
                    "mean_draws": round(float(np.mean([r["draws"] for r in records])), 2) if tries else 1.0,
                    "lesions_removed": int(sum(r["lesion_counts"]["removed"][lesion_name] for r in records))
                    if tries else 0,
                    "seconds_per_map": round(seconds, 3), "lesion_sizes": sizes}
    gen.max_draws = held_draws

    fit = json.loads((work / "run" / "fit_summary.json").read_text())
    export_metadata = json.loads((export / "config.json").read_text())["metadata"]
    exported_training = export_metadata["training"]["dit_training"]
    result = {
        "command": "python scripts/bench_label_generator.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "note": "run alone on the machine" if args.alone else
                    "2 cores shared with other jobs: timings are noisy upper bounds"},
        "data": {"phantoms": args.num, "size": args.size, "train_cases": train["num_cases"],
                 "val_cases": val["num_cases"], "grid": gen.config["grid"]},
        "training": {"autoencoder_steps": args.ae_steps, "dit_steps": args.dit_steps, "fit_seconds": fit["seconds"],
                     "dit_region_loss": {k: exported_training.get(k) for k in ("region_classes", "region_loss_weight")},
                     "autoencoder_reconstruction_dice_train": recon},
        "tolerances": {"relative_median_difference": TOLERANCE_MEDIAN, "ks_statistic": TOLERANCE_KS,
                       "classes_with_median_ml_at_least": MIN_CLASS_ML},
        "few_step": {"steps": args.steps, "samples": args.samples, "comparison": few_cmp,
                     "within_tolerance": _verdicts(few_cmp, train)},
        "few_step_uncalibrated": {"comparison": plain_cmp, "within_tolerance": _verdicts(plain_cmp, train)},
        "volume_calibration": gen.config.get("decoding"),
        "volume_calibration_fit": export_metadata.get("volume_calibration"),
        "thousand_step_euler": {"samples": args.long_samples, "comparison": long_cmp,
                                "within_tolerance": _verdicts(long_cmp, train)},
        "real_val_vs_train": {"comparison": compare_statistics(train, val)},
        "attributes": {"liver_size": asked, "lesion_count": lesions},
        "cost_seconds_per_map": {"few_step_batch8": round(few_s, 4), "few_step_batch1": round(few_s_b1, 4),
                                 "euler_1000_batch_long": round(long_s, 3), "euler_1000_batch1": round(long_s_b1, 3),
                                 "ddpm_1000_batch1": round(ddpm_s, 3),
                                 "speedup_vs_ddpm_1000_batch1": round(ddpm_s / few_s_b1, 1),
                                 "speedup_vs_euler_1000_batch1": round(long_s_b1 / few_s_b1, 1)},
        "timings": {**timings, "total_s": round(time.perf_counter() - started, 1)},
    }
    out_md = args.out.with_suffix(".md")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    out_md.write_text(render_markdown(result))
    print(out_md.read_text())
    return 0


def region_loss(r: dict) -> str:
    """The DiT's lesion loss weight of a result, in words."""
    region = r["training"].get("dit_region_loss") or {}
    if not region.get("region_classes") or (region.get("region_loss_weight") or 1) == 1:
        return "none"
    return f"{region['region_loss_weight']:g}x in {', '.join(region['region_classes'])}"


def render_markdown(r: dict) -> str:
    """The JSON result as a short markdown report."""
    lines = ["# Label generator: CPU benchmark", "",
             f"Command: `{r['command']}` (total {r['timings']['total_s']} s).", "",
             f"Machine: {r['machine']['cpu_cores']} CPU cores, torch {r['machine']['torch']} on "
             f"{r['machine']['torch_threads']} thread(s), {r['machine']['platform']}. "
             + ("It ran alone on the machine." if r["machine"].get("note") == "run alone on the machine" else
                "**The cores were shared with other jobs while this ran, so every timing is a noisy upper bound.**"),
             "",
             f"Data: {r['data']['phantoms']} CT phantoms at {r['data']['size']}^3 (`medsynth phantoms` + `prepare`); "
             f"the label generator trains on the {r['data']['train_cases']} train cases only "
             f"({r['training']['autoencoder_steps']} autoencoder + {r['training']['dit_steps']} DiT steps, "
             f"{r['training']['fit_seconds']} s; DiT loss weight in lesion voxels: {region_loss(r)}).", "",
             "Label autoencoder reconstruction Dice on the train maps (the ceiling for what the DiT can "
             "make): " + ", ".join(f"{k} {v}" for k, v in r["training"]["autoencoder_reconstruction_dice_train"].items())
             + ".", "",
             f"## Volume distributions ({r['few_step']['samples']} maps, {r['few_step']['steps']} Euler steps, vs train)",
             "", f"Tolerance: relative median difference <= {r['tolerances']['relative_median_difference']} and KS <= "
             f"{r['tolerances']['ks_statistic']}, for classes with a median of at least "
             f"{r['tolerances']['classes_with_median_ml_at_least']} mL.", "",
             "| class | train median mL | generated median mL | rel. diff | KS | within | uncalibrated: median mL "
             "/ rel. diff / KS | within | 1000-step KS | real val KS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    few, long_, val = r["few_step"]["comparison"]["volumes"], r["thousand_step_euler"]["comparison"]["volumes"], \
        r["real_val_vs_train"]["comparison"]["volumes"]
    plain = r.get("few_step_uncalibrated", r["few_step"])
    verdict, plain_verdict = r["few_step"]["within_tolerance"], plain["within_tolerance"]

    def mark(v: dict, name: str) -> str:
        return "yes" if v.get(name) else ("no" if name in v else "-")

    for name, row in few.items():
        p = plain["comparison"]["volumes"][name]
        lines.append(f"| {name} | {row['reference_median_ml']} | {row['generated_median_ml']} | "
                     f"{row['relative_median_difference']} | {row['ks_statistic']} | {mark(verdict, name)} | "
                     f"{p['generated_median_ml']} / {p['relative_median_difference']} / {p['ks_statistic']} | "
                     f"{mark(plain_verdict, name)} | {long_[name]['ks_statistic']} | {val[name]['ks_statistic']} |")
    fit = r.get("volume_calibration_fit")
    lines += ["", "\"uncalibrated\": the same latents decoded by plain argmax, without the decoder's per-class "
              "logit offsets (exports made before the volume calibration). \"real val KS\": the val split's real "
              "maps against train, i.e. how far two real samples of this size already are."]
    if fit:
        lines += ["", "Volume calibration (decoded / true volume of the training maps after the autoencoder's round "
                  "trip): before " + ", ".join(f"{k} {v}" for k, v in fit["volume_ratio_before"].items())
                  + "; after " + ", ".join(f"{k} {v}" for k, v in fit["volume_ratio_after"].items()) + "."]
    sized = r["few_step"]["comparison"].get("lesion_sizes") or {}
    if sized:
        lines += ["", "## Lesion sizes", "", "Each connected lesion's volume, pooled over the maps (a set of maps can "
                  "hold the right number of lesions and still draw them too small).", "",
                  "| class | maps | lesions | median mL | generated / train median | KS vs train |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in sized.items():
            lines.append(f"| {name} | train | {row['reference_lesions']} | {row['reference_median_ml']} | - | - |")
            for label, part in (("few-step", r["few_step"]), ("1000-step Euler", r["thousand_step_euler"]),
                                ("real val", r["real_val_vs_train"])):
                other = part["comparison"]["lesion_sizes"][name]
                lines.append(f"| {name} | {label} | {other['generated_lesions']} | {other['generated_median_ml']} | "
                             f"{other['size_ratio']} | {other['ks_statistic']} |")
    lines += ["", "## Attributes", ""]
    for key, row in r["attributes"]["liver_size"].items():
        how = f"; size held, up to {row['max_draws']} draws" if row.get("max_draws") else "; the model alone"
        within = (f"; {row['within_tolerance_fraction']:.0%} of maps within 0.1 of the asked quantile"
                  if "within_tolerance_fraction" in row else "")
        lines.append(f"- liver size quantile {row['asked_quantile']} ({row.get('text', 'training prompts')}, guidance "
                     f"{row['guidance_scale']}{how}): generated "
                     f"median {row['generated_median_ml']} mL "
                     f"(training volume at that quantile {row['training_volume_at_quantile_ml']} mL; the generated "
                     f"median sits at training quantile {row['generated_median_as_training_quantile']}{within})")
    les = r["attributes"]["lesion_count"]
    lines.append(f"- liver lesions in training maps (count: cases): {les['training_histogram']}")
    for key, row in les.items():
        if key.startswith("asked_"):
            draws = row.get("max_draws", row.get("lesion_count_tries", 0))  # older records: lesion_count_tries
            how = ("the model alone" if not draws else
                   f"count held: {row.get('mean_draws', 1)} draws per map on average, "
                   f"{row.get('lesions_removed', 0)} surplus lesions removed, {row.get('seconds_per_map', '?')} s per map")
            lines.append(f"- asked for {row.get('asked', key[6:])} lesion(s) ({row.get('text', 'training prompts')}, "
                         f"guidance {row.get('guidance_scale', 1.0)}; {how}): mean {row['mean']}, exactly "
                         f"{row.get('asked', key[6:])} in "
                         f"{row['exact_fraction']:.0%} of maps, histogram {row['histogram']}"
                         + (f"; lesion median {row['lesion_sizes']['generated_median_ml']} mL "
                            f"({row['lesion_sizes']['size_ratio']} x training)"
                            if (row.get("lesion_sizes") or {}).get("size_ratio") is not None else ""))
    c = r["cost_seconds_per_map"]
    lines += ["", "## Cost per map", "", "| sampler | s / map |", "| --- | --- |",
              f"| 10 Euler steps (batch 8) | {c['few_step_batch8']} |", f"| 10 Euler steps (batch 1) | {c['few_step_batch1']} |",
              f"| 1000 Euler steps (batch 1) | {c['euler_1000_batch1']} |",
              f"| 1000 DDPM steps, same network (batch 1) | {c['ddpm_1000_batch1']} |", "",
              f"At batch 1, few-step sampling is {c['speedup_vs_ddpm_1000_batch1']}x cheaper per map than a 1000-step "
              f"DDPM run of the same network and {c['speedup_vs_euler_1000_batch1']}x cheaper than 1000 Euler steps "
              f"(the DDPM run measures cost only: the network predicts velocities, so its maps are not scored).", ""]
    return "\n".join(lines)


LABELS: dict[str, int] = {}

if __name__ == "__main__":
    raise SystemExit(main())
