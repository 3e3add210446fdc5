"""Do CT and MR prompts give the right intensity profile? One model trained on both modalities.

The shipped pipelines are one modality each (``pipeline.json`` has one ``modality`` and one
intensity mapping). This benchmark asks the question of the issue at the level where it can be
answered with the demo's tiny models: one VQ-GAN and one DiT trained on CT *and* MR phantoms
(32^3, each image in its own modality's model range [-1, 1]: CT window [-1000, 1000] HU, MR
percentiles), then sampled with

- ``text+meta``: a CT prompt and CT metadata, or an MR prompt and MR metadata;
- ``text only``: the prompt, metadata dropped (classifier-free: the null metadata embedding);
- ``meta only``: the metadata, text dropped;
- ``crossed``: a CT prompt with MR metadata and the reverse (which condition wins?).

Each decoded sample's voxel-value distribution is compared with the held-out real CT and real MR
phantoms (1-D Wasserstein distance of model-range values); a sample "has the CT profile" when
it is closer to real CT than to real MR. Everything trains here, on the CPU, in minutes; nothing
downloads.

Usage::

    python scripts/bench_modality.py --out docs/benchmarks            # ~10-15 min on 2 CPU cores
    python scripts/bench_modality.py --quick --out /tmp/bench_modality # smoke run (~1 min)

Writes ``OUT/modality_cpu.json`` and ``OUT/modality_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CT_PROMPT = "CT abdomen portal venous, no lesion"
MR_PROMPT = "MR head FLAIR, no tumour"


def real_volumes(root: Path, modality: str, num: int, size: int) -> tuple[list[np.ndarray], list[dict]]:
    """Phantoms of one modality in its model range, and their (prompt, metadata) records."""
    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import load_case
    from medsynth.data.phantom_dataset import write_phantom_dataset

    folder = root / modality
    write_phantom_dataset(folder, modality=modality, num=num, size=size, seed=0, progress=False)
    dataset = read_dataset(folder)
    images, records = [], []
    for case in dataset.cases:
        _, model_range, _, _ = load_case(dataset, case)
        images.append(np.asarray(model_range, np.float32))
        meta = dict(case.metadata or {})
        records.append({"prompt": case.prompt, "metadata": {"modality": modality.upper(), "region": meta["region"],
                                                            "spacing": [float(v) for v in meta["spacing"]]}})
    return images, records


class RandomCrops(torch.utils.data.Dataset):
    """``{"image": (1, c, c, c)}`` random crops of ``(X, Y, Z)`` volumes, a new crop at every draw."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int = 0) -> None:
        self.images, self.crop = images, crop
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        corner = [int(self.rng.integers(0, s - self.crop + 1)) for s in image.shape]
        window = tuple(slice(c, c + self.crop) for c in corner)
        return {"image": torch.from_numpy(np.ascontiguousarray(image[window]))[None]}


def quiet_cpu_trainer(max_steps: int):
    """A CPU Lightning Trainer that stops after ``max_steps`` optimiser steps and writes nothing
    (no logger, checkpoints, progress bar or validation): the benches' in-memory training runs."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0)


def fit_autoencoder(images: list[np.ndarray], steps: int, seed: int = 0, crop: int | None = None,
                    config: str = "configs/autoencoder/tiny.yaml"):
    """The tiny VQ-GAN on both modalities' volumes (reconstruction only at this budget).

    ``crop``: train on random ``crop^3`` crops (the tiny config's 32^3 patch) of larger volumes,
    so a step costs the same at 64^3 as at 32^3; the convolutional model then encodes whole volumes.
    ``config``: the autoencoder config, relative to the repository (tiny.yaml: 4x; tiny_f2.yaml: 2x).
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from medsynth.training.autoencoder import AutoencoderModule

    cfg = yaml.safe_load((REPO / config).read_text())
    training = {**cfg["training"], "max_steps": steps}
    L.seed_everything(seed, verbose=False)
    module = AutoencoderModule(cfg["model"], cfg["discriminator"], training)
    data = RandomCrops(images, crop, seed) if crop else [{"image": torch.from_numpy(img)[None]} for img in images]
    # two optimiser steps per batch (generator, discriminator: manual optimisation)
    trainer = quiet_cpu_trainer(2 * steps + 2)
    trainer.fit(module, DataLoader(data, batch_size=2, shuffle=True, drop_last=True))
    return module.model.eval()


def write_cache(model, images: list[np.ndarray], records: list[dict], cache: Path,
                labels: list[np.ndarray] | None = None, label_table: dict[str, int] | None = None) -> float:
    """Encode every training volume into a latent cache that ``fit_dit`` reads; returns the scale factor.

    With ``labels`` (image-resolution label maps) and their ``label_table``, the cache carries
    them as ``medsynth encode`` does, so a DiT can weight its loss inside label classes.
    """
    from medsynth.io.checkpoint import save_tensors

    (cache / "latents").mkdir(parents=True, exist_ok=True)
    latents = []
    with torch.no_grad():
        for img in images:
            latents.append(model.encode(torch.from_numpy(img)[None, None])[0])
    scale = float(1.0 / torch.stack(latents).std())
    for i, (z, rec) in enumerate(zip(latents, records)):
        tensors = {"latent": z}
        if labels is not None:
            tensors["label"] = torch.from_numpy(np.ascontiguousarray(labels[i].astype(np.int16)))
        save_tensors(cache / "latents" / f"case_{i:03d}.safetensors", tensors,
                     {"case_id": f"case_{i:03d}", "split": "train", "prompt": rec["prompt"],
                      "metadata": rec["metadata"], "modality": rec["metadata"]["modality"],
                      "spacing": rec["metadata"]["spacing"]})
    stats = {"scale_factor": scale, **({"labels": dict(label_table)} if label_table else {})}
    (cache / "stats.json").write_text(json.dumps(stats))
    return scale


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-D Wasserstein distance between two samples' value distributions (scipy)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a.ravel(), b.ravel()))


def sample(dit, encoder, autoencoder, scale: float, prompt: str, meta: dict, n: int, steps: int, guidance: float,
           drop_text: bool, drop_metadata: bool, latent_shape: tuple[int, ...], seed: int,
           negative: str | None = None, controlnet=None, masks: list[np.ndarray] | None = None,
           mask_guidance: float | None = None) -> list[np.ndarray]:
    """``n`` decoded samples ``(X, Y, Z)`` in the model range for one condition.

    ``negative``: a negative prompt, standing where the null text would under guidance.
    ``controlnet`` with ``masks`` (``n`` label maps ``(X, Y, Z)``): the pipeline's mask path, the
    mask guided at ``mask_guidance`` and the text at ``guidance``."""
    from medsynth.diffusion import make_scheduler
    from medsynth.models.controlnet import make_block_residuals_fn, one_hot_mask
    from medsynth.pipelines.sampling import Conditions, denoise

    with torch.no_grad():  # a condition left out is None: the model's null embedding
        text = None if drop_text else encoder.encode([prompt] * n)
        metadata = None if drop_metadata else dit.encode_metadata([meta] * n)
        negative_text = None if negative is None else encoder.encode([negative] * n)
    hook = None
    if controlnet is not None:
        onehot = one_hot_mask(torch.from_numpy(np.stack(masks).astype(np.int64)), int(controlnet.config.num_classes))
        hook = make_block_residuals_fn(controlnet, onehot, text, metadata, guide_mask=True,
                                       negative_text=negative_text)
    conditions = Conditions(text, metadata, negative_text)
    z = denoise(dit, make_scheduler("rectified_flow"), (n, *latent_shape), conditions, steps, guidance,
                torch.Generator().manual_seed(seed), block_residuals_fn=hook,
                mask_guidance_scale=mask_guidance if hook is not None else None)
    with torch.no_grad():
        volumes = autoencoder.decode(z / scale).clamp(-1, 1)
    return [v[0].numpy() for v in volumes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--num", type=int, default=24, help="phantoms per modality (the last 4 are held out)")
    parser.add_argument("--ae-steps", type=int, default=800)
    parser.add_argument("--dit-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=8, help="samples per condition")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (rectified flow, Euler)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that it runs, not what it measures")
    args = parser.parse_args(argv)
    if args.quick:
        args.num, args.ae_steps, args.dit_steps, args.samples, args.steps = 6, 4, 4, 2, 2
    held = 2 if args.quick else 4
    start = time.perf_counter()
    from medsynth.training.dit import fit_dit, load_dit

    with tempfile.TemporaryDirectory(prefix="medsynth_modality_") as tmp:
        work = Path(tmp)
        ct, ct_rec = real_volumes(work, "ct", args.num, 32)
        mr, mr_rec = real_volumes(work, "mr", args.num, 32)
        train_images = ct[:-held] + mr[:-held]
        train_records = ct_rec[:-held] + mr_rec[:-held]
        t0 = time.perf_counter()
        autoencoder = fit_autoencoder(train_images, args.ae_steps)
        ae_seconds = time.perf_counter() - t0
        scale = write_cache(autoencoder, train_images, train_records, work / "cache")
        dit_cfg = yaml.safe_load((REPO / "configs/dit/tiny.yaml").read_text())
        t0 = time.perf_counter()
        export = fit_dit(work / "cache", work / "dit", dit_cfg, accelerator="cpu", devices=1, max_steps=args.dit_steps)
        dit_seconds = time.perf_counter() - t0
        dit, encoder, _ = load_dit(export)
        latent_shape = tuple(autoencoder.encode(torch.zeros(1, 1, 32, 32, 32)).shape[1:])
        ct_meta, mr_meta = ct_rec[0]["metadata"], mr_rec[0]["metadata"]
        real = {"CT": np.concatenate([v.ravel() for v in ct[-held:]]),
                "MR": np.concatenate([v.ravel() for v in mr[-held:]])}
        # the floor: how far one held-out real CT (MR) volume is from the other held-out ones
        floor = {m: float(np.mean([wasserstein(v, real[m]) for v in (ct if m == "CT" else mr)[-held:]]))
                 for m in ("CT", "MR")}
        conditions = [
            ("text+meta", "CT", CT_PROMPT, ct_meta, False, False), ("text+meta", "MR", MR_PROMPT, mr_meta, False, False),
            ("text only", "CT", CT_PROMPT, ct_meta, False, True), ("text only", "MR", MR_PROMPT, mr_meta, False, True),
            ("meta only", "CT", CT_PROMPT, ct_meta, True, False), ("meta only", "MR", MR_PROMPT, mr_meta, True, False),
            ("crossed: CT text, MR meta", "?", CT_PROMPT, mr_meta, False, False),
            ("crossed: MR text, CT meta", "?", MR_PROMPT, ct_meta, False, False),
        ]
        rows = []
        for i, (name, asked, prompt, meta, drop_text, drop_meta) in enumerate(conditions):
            volumes = sample(dit, encoder, autoencoder, scale, prompt, meta, args.samples, args.steps, args.guidance,
                             drop_text, drop_meta, latent_shape, seed=1000 + i)
            to_ct = [wasserstein(v, real["CT"]) for v in volumes]
            to_mr = [wasserstein(v, real["MR"]) for v in volumes]
            closer_ct = sum(a < b for a, b in zip(to_ct, to_mr))
            rows.append({"condition": name, "asked": asked, "prompt": prompt, "metadata": meta,
                         "samples": len(volumes), "w1_to_real_ct": round(float(np.mean(to_ct)), 4),
                         "w1_to_real_mr": round(float(np.mean(to_mr)), 4), "closer_to_ct": int(closer_ct),
                         "right_profile": None if asked == "?" else int(closer_ct if asked == "CT"
                                                                        else len(volumes) - closer_ct)})
    result = {"machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform()},
              "command": "python scripts/bench_modality.py" + (" --quick" if args.quick else ""),
              "settings": {"phantoms_per_modality": args.num, "held_out_per_modality": held, "size": 32,
                           "autoencoder_steps": args.ae_steps, "dit_steps": args.dit_steps,
                           "sampling_steps": args.steps, "guidance": args.guidance,
                           "autoencoder": "configs/autoencoder/tiny.yaml", "dit": "configs/dit/tiny.yaml"},
              "train_seconds": {"autoencoder": round(ae_seconds, 1), "dit": round(dit_seconds, 1)},
              "real_floor_w1": {k: round(v, 4) for k, v in floor.items()},
              "real_ct_vs_real_mr_w1": round(wasserstein(real["CT"], real["MR"]), 4),
              "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "modality_cpu.json").write_text(json.dumps(result, indent=2))
    (args.out / "modality_cpu.md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    s = r["settings"]
    lines = ["# CT vs MR prompts: intensity profile of one model trained on both (CPU)", "",
             f"Command: `{r['command']}`. Machine: {r['machine']}. {s['phantoms_per_modality']} CT and "
             f"{s['phantoms_per_modality']} MR phantoms at 32^3 ({s['held_out_per_modality']} of each held out); one "
             f"tiny VQ-GAN ({s['autoencoder_steps']} steps, {r['train_seconds']['autoencoder']} s) and one tiny DiT "
             f"({s['dit_steps']} steps, {r['train_seconds']['dit']} s) trained on both; {s['sampling_steps']} Euler "
             f"steps, guidance {s['guidance']}. Values are in each modality's model range [-1, 1] (CT window "
             f"[-1000, 1000] HU, MR percentiles).", "",
             "A sample has the CT profile when the 1-D Wasserstein distance (W1) of its voxel values to the "
             "held-out real CT phantoms is smaller than to the held-out real MR phantoms. For scale: W1 between "
             f"real CT and real MR is {r['real_ct_vs_real_mr_w1']}; one held-out real volume to its own modality's "
             f"held-out set: CT {r['real_floor_w1']['CT']}, MR {r['real_floor_w1']['MR']}.", "",
             "| condition | asked for | samples | right profile | W1 to real CT | W1 to real MR |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        right = "-" if row["right_profile"] is None else f"{row['right_profile']}/{row['samples']}"
        asked = row["asked"] if row["asked"] != "?" else f"(closer to CT: {row['closer_to_ct']}/{row['samples']})"
        lines.append(f"| {row['condition']} | {asked} | {row['samples']} | {right} | {row['w1_to_real_ct']} | "
                     f"{row['w1_to_real_mr']} |")
    lines += ["", "The shipped pipelines are one modality each; this model exists only inside the benchmark. "
              f"Run time: {r['seconds']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
