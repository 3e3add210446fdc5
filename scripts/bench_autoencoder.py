"""Stage-1 autoencoder benchmarks (CPU-friendly). Results go to docs/benchmarks/autoencoder_cpu.json.

Usage (each part appends/overwrites its own key in the JSON):
    python scripts/bench_autoencoder.py target  --size 32 --minutes 10     # fit + eval on CT phantoms
        [--config CONFIG --key KEY]                                        # another recipe, its own JSON key
    python scripts/bench_autoencoder.py real    --modality ct --minutes 5  # shared real CT / MR crops
    python scripts/bench_autoencoder.py compare --size 32 --steps 150      # ours vs MONAI VQVAE / AutoencoderKL
    python scripts/bench_autoencoder.py tiled   --preset tiny              # peak memory of tiled decode
    python scripts/bench_autoencoder.py report                             # JSON -> markdown

Peak memory is the process's max RSS (``resource.getrusage``), measured in a fresh subprocess
per case so that one measurement cannot inherit another's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "autoencoder_cpu.json"
WORK = Path(os.environ.get("MEDSYNTH_BENCH_DIR", "/tmp/medsynth_bench_ae"))
SHARED = (REPO / ".." / "shared" / "data").resolve()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _save(key: str, value: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data["machine"] = {"cpu_threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "python": platform.python_version(),
                       "platform": platform.platform()}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({key: value}, indent=2))


def _cli(argv: list[str]) -> None:
    """Run a stage-1 command (parsed by medsynth.cli.autoencoder alone, so this script works
    whether or not the module is registered in medsynth.cli.COMMAND_MODULES)."""
    from medsynth.cli import autoencoder

    parser = argparse.ArgumentParser(prog="medsynth")
    autoencoder.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = args.func(args)
    if code != 0:
        raise SystemExit(f"medsynth {' '.join(argv)} failed with {code}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (commands in the JSON stay portable)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _fit_and_eval(data: Path, out: Path, config: Path, minutes: float, max_steps: int,
                  extra: list[str] | None = None) -> dict:
    import torch

    start = time.time()
    _cli(["autoencoder", "fit", "--config", str(config), "--data", str(data), "--out", str(out),
          "--max-steps", str(max_steps), "--max-time", f"{minutes}", "--no-progress", *(extra or [])])
    fit_s = time.time() - start
    summary = json.loads((out / "fit_summary.json").read_text())
    _cli(["autoencoder", "eval", "--model", str(out / "model"), "--data", str(data), "--out", str(out / "eval"),
          "--device", "cpu", "--no-progress"])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    import csv

    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    ppl = [float(r["codebook/perplexity"]) for r in rows if r.get("codebook/perplexity")]
    dead = [float(r["codebook/dead_fraction"]) for r in rows if r.get("codebook/dead_fraction")]
    # with num_codebooks > 1, codebook/perplexity is the mean over codebooks; each is logged too
    groups = sorted({k for r in rows for k in r if k.startswith("codebook/perplexity_")},
                    key=lambda k: int(k.rsplit("_", 1)[1]))
    per_codebook = []
    for k in groups:
        vals = [float(r[k]) for r in rows if r.get(k)]
        per_codebook.append(round(sum(vals[-10:]) / len(vals[-10:]), 1) if vals else None)
    model_cfg = json.loads((out / "model" / "config.json").read_text())["config"]
    return {"steps": summary["steps"], "fit_seconds": round(fit_s, 1),
            "seconds_per_step": round(summary["seconds"] / max(summary["steps"], 1), 3),
            "heldout_split": metrics["split"], "heldout_cases": metrics["num_cases"],
            "psnr_db": round(metrics["overall"]["psnr"], 2), "ssim": round(metrics["overall"]["ssim"], 4),
            "mae": round(metrics["overall"]["mae"], 2), "mae_unit": metrics["unit"],
            "perplexity_last": round(ppl[-1], 1) if ppl else None,
            "perplexity_mean_last_10_logs": round(sum(ppl[-10:]) / len(ppl[-10:]), 1) if ppl else None,
            "dead_fraction_last": dead[-1] if dead else None,
            "num_codebooks": int(model_cfg.get("num_codebooks", 1)),
            "codes_per_codebook": int(model_cfg["num_embeddings"]),
            "perplexity_per_codebook_mean_last_10_logs": per_codebook or None,
            "max_time_is_wall_clock": True,
            "load_average_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()],
            "per_class_psnr": {k: round(v["psnr"], 2) for k, v in metrics["overall"]["per_class"].items()},
            "torch_threads": torch.get_num_threads(),
            "command": f"medsynth autoencoder fit --config {_shown(config)} --data DATA --out RUN "
                       f"--max-steps {max_steps} --max-time {minutes} && medsynth autoencoder eval --model RUN/model --data DATA"}


def cmd_target(args: argparse.Namespace) -> None:
    from medsynth.data.phantom_dataset import write_phantom_dataset

    data = WORK / f"ct{args.size}_n{args.num}"
    write_phantom_dataset(data, modality="ct", num=args.num, size=args.size, seed=0, progress=False)
    out = WORK / f"target{args.size}_{int(time.time())}"
    res = _fit_and_eval(data, out, REPO / args.config, args.minutes, args.max_steps)
    res.update(dataset=f"CT phantoms {args.size}^3, {args.num} cases (70/15/15 split), seed 0",
               budget_minutes=args.minutes, config=args.config)
    _save(args.key or f"target_ct_phantoms_{args.size}", res)


def _real_dataset(modality: str, out: Path, crop: int, max_per_scan: int = 24) -> Path:
    """Dataset folder of crops from the shared real volumes (train/val/test by case)."""
    import numpy as np

    from medsynth.data.transforms import IntensityMapping
    from medsynth.data.writer import DatasetWriter
    from medsynth.io import read_volume

    if (out / "dataset.json").is_file():
        return out
    if modality == "ct":
        ts = SHARED / "totalsegmentator"
        sources = [(ts / "example_ct.nii.gz", ts / "spine_report" / "totalseg.nii.gz"),
                   (ts / "aorta_report" / "ct_cropped.nii.gz", ts / "aorta_report" / "aorta.nii.gz")]
        labels = {"background": 0, **{f"class_{i}": i for i in range(1, 40)}}
        channel = "CT"
    else:
        root = SHARED / "deepmedic_brats2015"
        sources = [(p / "Flair_subtrMeanDivStd.nii.gz", p / "OTMultiClass.nii.gz")
                   for split in ("train", "validation", "test") for p in sorted((root / split).iterdir()) if p.is_dir()]
        labels = {"background": 0, "necrosis": 1, "oedema": 2, "non_enhancing": 3, "enhancing": 4}
        channel = "MR"
    writer = DatasetWriter(out, name=f"real_{modality}", labels=labels, channel_names={"0": channel})
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    split_rng = np.random.default_rng(0)
    for n, (img_p, lab_p) in enumerate(sources):
        img, lab = read_volume(img_p), read_volume(lab_p, kind="label")
        arr, la = img.array.astype(np.float32), np.asarray(lab.array).astype(np.int16)
        if modality == "ct":
            la = np.where(la < 40, la, 0).astype(np.int16)
        # non-overlapping crops of `crop` voxels (edge crops dropped), at most max_per_scan per
        # scan (a fixed random choice) so that one large scan does not dominate.
        steps = [range(0, max(s - crop, 0) + 1, crop) for s in arr.shape]
        corners = [(i, j, l) for i in steps[0] for j in steps[1] for l in steps[2]]
        if modality == "mr":  # skip crops that are mostly background (a constant outside the brain)
            bg = float(arr.min())
            corners = [c for c in corners if float((arr[c[0]:c[0] + crop, c[1]:c[1] + crop,
                                                        c[2]:c[2] + crop] > bg).mean()) > 0.5]
            # one percentile mapping per scan (inside the brain), shared by its crops
            scan_mapping = IntensityMapping.mr_percentiles(arr[arr > bg]).to_dict()
        pick = np.random.default_rng(n).permutation(len(corners))[:max_per_scan]
        for k, idx in enumerate(sorted(pick)):
            i, j, l = corners[idx]
            sl = (slice(i, i + crop), slice(j, j + crop), slice(l, l + crop))
            aff = img.affine.copy()
            aff[:3, 3] = img.affine[:3, :3] @ np.array([i, j, l]) + img.affine[:3, 3]
            case_id = f"{modality}{n:02d}_{k:03d}"
            prep = None
            if modality == "mr":
                prep = {"intensity": scan_mapping}
            if modality == "mr":  # held out by patient: the last two scans are val and test
                split = {len(sources) - 1: "test", len(sources) - 2: "val"}.get(n, "train")
            else:  # two CT scans only: held out by crop (neighbouring crops of the same scans)
                u = split_rng.random()
                split = "test" if u < 1 / 7 else "val" if u < 2 / 7 else "train"
            writer.add_case(case_id, img.with_array(np.ascontiguousarray(arr[sl]), aff),
                            lab.with_array(np.ascontiguousarray(la[sl]), aff),
                            prompt=f"{channel} crop", preprocessing=prep, test=split == "test")
            splits[split].append(case_id)
    writer.finalize(splits=splits)
    return out


def cmd_real(args: argparse.Namespace) -> None:
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent")
    data = _real_dataset(args.modality, WORK / f"real_{args.modality}_{args.crop}", args.crop)
    out = WORK / f"real_{args.modality}_{int(time.time())}"
    res = _fit_and_eval(data, out, REPO / args.config, args.minutes, args.max_steps)
    src = ("TotalSegmentator example_ct (3 mm) + aorta_report/ct_cropped (1.5 mm)" if args.modality == "ct"
           else "DeepMedic BRATS 2015 FLAIR (6 patients, z-scored, 1 mm)")
    res.update(dataset=f"{src}: non-overlapping {args.crop}^3 crops", budget_minutes=args.minutes, config=args.config)
    _save(f"real_{args.modality}_{args.crop}", res)


# -- side-by-side comparison ------------------------------------------------------------------

def _compare_one(name: str, size: int, steps: int, seed: int) -> dict:
    """Train one model with the same loop (L1 + 0.2 SSIM + its own regulariser), same data/steps."""
    import numpy as np
    import torch
    from monai.networks.nets import VQVAE, AutoencoderKL

    from medsynth.data.transforms import IntensityMapping
    from medsynth.evaluation.reconstruction import ssim_map_3d
    from medsynth.models import VQGAN, preset
    from medsynth.models.vqgan import count_parameters
    from medsynth.training.losses import ReconstructionLoss

    from medsynth.data.phantom_dataset import write_phantom_dataset
    from medsynth.io import read_volume

    torch.manual_seed(seed)
    mapping = IntensityMapping.ct_window()
    # the same phantom folder as `target` (generated once; phantom generation is slow on CPU)
    data = write_phantom_dataset(WORK / f"ct{size}_n40", modality="ct", num=40, size=size, seed=0, progress=False)

    def vol(case) -> torch.Tensor:
        return torch.from_numpy(np.asarray(mapping.forward(read_volume(case.image).array), np.float32))[None, None]

    train = [vol(c) for c in data.cases_for("train")]
    test = torch.cat([vol(c) for c in data.cases_for("test")])
    if name == "medsynth_vqgan_tiny":
        model = VQGAN(preset("tiny"))

        def run(x):
            r, q = model(x)
            return r, q.loss
    elif name == "monai_vqvae":
        model = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(20, 40), num_res_layers=1,
                      num_res_channels=(20, 40), downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                      upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=1024,
                      embedding_dim=8)

        def run(x):
            r, loss = model(x)
            return r, loss
    else:
        model = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32),
                              num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                              latent_channels=8, norm_num_groups=8, with_encoder_nonlocal_attn=False,
                              with_decoder_nonlocal_attn=False)

        def run(x):
            r, mu, sigma = model(x)
            kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
            return r, 1e-6 * kl
    params = count_parameters(model)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    loss_fn = ReconstructionLoss(1.0, 0.2)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for _ in range(steps):
        x = torch.cat([train[i] for i in rng.integers(0, len(train), 2)])
        r, reg = run(x)
        loss = loss_fn(r, x)["total"] + reg
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sec = (time.time() - t0) / steps
    model.eval()
    with torch.no_grad():
        r = torch.cat([run(test[i:i + 1])[0] for i in range(len(test))])
    a, b = (test + 1) / 2, ((r + 1) / 2).clamp(0, 1)
    psnr = float(10 * torch.log10(1 / (a - b).pow(2).mean()))
    ssim = float(ssim_map_3d(a, b).mean())
    return {"model": name, "params": params, "steps": steps, "seconds_per_step": round(sec, 3),
            "psnr_db": round(psnr, 2), "ssim": round(ssim, 4), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def cmd_compare(args: argparse.Namespace) -> None:
    rows = []
    for name in ("medsynth_vqgan_tiny", "monai_vqvae", "monai_autoencoderkl"):
        out = subprocess.run([sys.executable, __file__, "_compare_one", name, str(args.size), str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    _save(f"compare_{args.size}", {"size": args.size, "steps": args.steps, "batch": 2,
                                   "loop": "same for all: Adam 5e-4, L1 + 0.2 (1-SSIM) + model regulariser, "
                                           "clip 1.0, batch 2; CT phantoms (40 cases: 28 train, 6 held-out test)",
                                   "rows": rows,
                                   "command": f"python scripts/bench_autoencoder.py compare --size {args.size} "
                                              f"--steps {args.steps}"})


# -- tiled decode memory ------------------------------------------------------------------------

def _tiled_one(preset_name: str, shape: tuple[int, int, int], window: int) -> dict:
    import torch

    from medsynth.models import VQGAN, decode_tiled, preset

    torch.manual_seed(0)
    model = VQGAN(preset(preset_name)).eval()
    f = model.downsample_factor
    z = torch.randn(1, model.config.latent_channels, *(s // f for s in shape))
    base = _peak_rss_mb()
    t0 = time.time()
    x = decode_tiled(model, z, window=window, overlap=window // 4)
    sec = time.time() - t0
    output_mb = x.numel() * 4 / 2 ** 20
    return {"preset": preset_name, "shape": list(shape), "window": window, "seconds": round(sec, 2),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_mb": round(base, 1),
            "output_mb": round(output_mb, 1)}


def cmd_tiled(args: argparse.Namespace) -> None:
    shapes = [(64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 256)]
    rows = []
    for shape in shapes:
        out = subprocess.run([sys.executable, __file__, "_tiled_one", args.preset, *map(str, shape), str(args.window)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    _save(f"tiled_decode_{args.preset}", {
        "rows": rows, "note": "peak RSS includes the output volume (float32) and the latent; the network "
                              "activations depend on the window only",
        "command": f"python scripts/bench_autoencoder.py tiled --preset {args.preset} --window {args.window}"})


LATEST_TARGET = "target_ct_phantoms_32_separable_ssim_adaptive"


def _latest(data: dict) -> list[str]:
    """The current recipe's 10-minute target run, stated first."""
    val = data.get(LATEST_TARGET)
    if not val:
        return []
    met = val["psnr_db"] >= 30 and val["ssim"] >= 0.90
    return [f"**Current recipe** (`python scripts/bench_autoencoder.py target --size 32 --minutes 10 --key "
            f"{LATEST_TARGET}`, configs/autoencoder/tiny.yaml): {val['steps']} steps in {val['budget_minutes']} "
            f"minutes at {val['seconds_per_step']} s/step, held-out PSNR **{val['psnr_db']} dB**, 3D SSIM "
            f"**{val['ssim']}**, MAE {val['mae']} {val['mae_unit']}, per-codebook perplexity "
            f"{val['perplexity_per_codebook_mean_last_10_logs']} of {val['codes_per_codebook']}, dead fraction "
            f"{val['dead_fraction_last']}: targets {'met' if met else 'not met'}.", ""]


def cmd_report(_: argparse.Namespace) -> None:
    data = json.loads(RESULTS.read_text())
    lines = ["# Autoencoder CPU benchmarks", "", f"Machine: {data.get('machine')}", "",
             "Generated by `python scripts/bench_autoencoder.py report` from autoencoder_cpu.json. "
             "`--max-time` is wall-clock time, so the steps a time-budgeted run reaches depend on the machine's "
             "load: compare runs by the steps they reached. Early runs shared the 2 cores with other engineers' "
             "jobs; runs since the product-quantisation change record the load average at their end (about 2.0 "
             "= this run alone on 2 threads). Each run's `note` says what it was for.", "",
             *_latest(data),
             "## Summary against the targets (held-out PSNR >= 30 dB, 3D SSIM >= 0.90, perplexity >> 1)", "",
             "| run | budget | steps | s/step | PSNR (dB) | SSIM | MAE | perplexity (per codebook) | targets met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, val in data.items():
        if key.startswith(("target_", "real_")):
            ok = val["psnr_db"] >= 30 and val["ssim"] >= 0.90
            lines.append(f"| {key} | {val['budget_minutes']} min | {val['steps']} | {val['seconds_per_step']} | "
                         f"{val['psnr_db']} | {val['ssim']} | {val['mae']} {val['mae_unit']} | "
                         f"{val['perplexity_mean_last_10_logs']} | {'yes' if ok else 'no'} |")
    lines.append("")
    for key, val in data.items():
        if key == "machine":
            continue
        lines += [f"## {key}", ""]
        if "rows" in val:
            cols = list(val["rows"][0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in val["rows"]]
            lines += ["", *(f"- {k}: {v}" for k, v in val.items() if k != "rows"), ""]
        else:
            lines += [f"- {k}: {v}" for k, v in val.items()] + [""]
    (RESULTS.parent / "autoencoder_cpu.md").write_text("\n".join(lines) + "\n")
    print((RESULTS.parent / "autoencoder_cpu.md").read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_compare_one":
        print(json.dumps(_compare_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 0)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_tiled_one":
        shape = tuple(int(v) for v in sys.argv[3:6])
        print(json.dumps(_tiled_one(sys.argv[2], shape, int(sys.argv[6]))))  # type: ignore[arg-type]
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("target")
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--num", type=int, default=40)
    t.add_argument("--minutes", type=float, default=10.0)
    t.add_argument("--max-steps", type=int, default=100000)
    t.add_argument("--config", default="configs/autoencoder/tiny.yaml")
    t.add_argument("--key", default=None, help="JSON key (default target_ct_phantoms_SIZE)")
    t.set_defaults(func=cmd_target)
    r = sub.add_parser("real")
    r.add_argument("--modality", choices=("ct", "mr"), default="ct")
    r.add_argument("--crop", type=int, default=32)
    r.add_argument("--minutes", type=float, default=5.0)
    r.add_argument("--max-steps", type=int, default=100000)
    r.add_argument("--config", default="configs/autoencoder/tiny.yaml")
    r.set_defaults(func=cmd_real)
    c = sub.add_parser("compare")
    c.add_argument("--size", type=int, default=32)
    c.add_argument("--steps", type=int, default=150)
    c.set_defaults(func=cmd_compare)
    d = sub.add_parser("tiled")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--window", type=int, default=64)
    d.set_defaults(func=cmd_tiled)
    sub.add_parser("report").set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
