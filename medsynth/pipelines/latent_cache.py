"""The latent cache: every case of a dataset encoded once by the stage-1 autoencoder.

Layout of ``CACHE/``::

    cache.json                 model (path, sha256), dataset, factor, window/overlap, format
    latents/<case_id>.safetensors
        "latent": (L, x, y, z) float32  continuous pre-quantisation latent (unscaled)
        "label":  (X, Y, Z)    int      label map at image resolution (if the case has one)
        metadata: case_id, split, prompt, metadata, affine, shape, spacing, intensity mapping
    stats.json                 per-channel mean/std/min/max over the whole cache and
                               scale_factor = 1 / std of all latent values

The diffusion stage trains on ``latent * scale_factor`` (unit variance, as in Rombach et al.
2022) and divides by it before decoding. The factor is computed over every cached latent, not
one batch, so it does not depend on what the first batch happened to contain.

Resumable and atomic: each case file is written atomically, so an existing file is complete and
a rerun skips it; ``stats.json`` is recomputed from the files at the end. A cache made by a
different model is refused instead of being mixed.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsynth.data.manifest import Dataset, read_dataset
from medsynth.data.patches import dataset_modality, load_case
from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import write_json_atomic
from medsynth.io.checkpoint import Export, load_tensors, save_tensors
from medsynth.models.tiling import encode_tiled
from medsynth.models.vqgan import VQGAN

log = logging.getLogger(__name__)
CACHE_FORMAT = "medsynth.latent_cache"
CACHE_VERSION = 1
SPACING_TOLERANCE = 0.25  # relative; beyond this the model sees anatomy at a scale it never saw


def compatibility_warnings(export: Export, dataset: Dataset, spacings: list[tuple[float, ...]] | None = None,
                           warn: bool = True) -> list[str]:
    """Warnings when the data's modality or spacing differ from what the model was trained on."""
    out: list[str] = []
    trained_mod = export.metadata.get("modality")
    data_mod = dataset_modality(dataset)
    if trained_mod and data_mod and trained_mod != data_mod:
        out.append(f"the model was trained on {trained_mod} but the data {dataset.root} is {data_mod}; "
                   f"reconstructions will be poor")
    trained_sp = export.metadata.get("spacing")
    if trained_sp and spacings:
        med = np.median(np.asarray(spacings, dtype=float), axis=0)
        rel = np.abs(med - np.asarray(trained_sp)) / np.asarray(trained_sp)
        if np.any(rel > SPACING_TOLERANCE):
            out.append(f"data spacing {tuple(round(float(v), 3) for v in med)} mm differs from the training "
                       f"spacing {tuple(round(float(v), 3) for v in trained_sp)} mm by more than "
                       f"{SPACING_TOLERANCE:.0%}; resample with `medsynth prepare --spacing`")
    if warn:
        for w in out:
            warnings.warn(w, stacklevel=2)
            log.warning(w)
    return out


def _check_cache_header(out: Path, header: dict[str, Any]) -> None:
    path = out / "cache.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise InputError("cache.json is corrupt; delete the cache folder and encode again", path) from None
        for key in ("model_sha256", "dataset", "window", "overlap"):
            if old.get(key) != header.get(key):
                raise ConfigError(f"{out} holds a latent cache made with {key}={old.get(key)!r}, but this run "
                                  f"uses {key}={header.get(key)!r}; use a new --out folder (caches are never mixed)")
    write_json_atomic(path, header)


def encode_dataset(model: VQGAN, export: Export, data_dir: str | Path, out_dir: str | Path,
                   splits: tuple[str, ...] = ("train", "val", "test"),
                   window: tuple[int, int, int] | None = None, overlap: tuple[int, int, int] | None = None,
                   device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Encode every case of ``splits`` into ``out_dir``; returns the stats dict (also stats.json)."""
    dataset = read_dataset(data_dir)
    out = Path(out_dir)
    f = model.downsample_factor
    window = tuple(window or model.config.patch_size)  # type: ignore[assignment]
    overlap = tuple(overlap or tuple(max(f, (w // 4) // f * f) for w in window))  # type: ignore[assignment]
    header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model": str(export.path),
              "model_sha256": export.sha256, "dataset": dataset.name, "data": str(Path(data_dir)),
              "downsample_factor": f, "latent_channels": model.config.latent_channels,
              "latent": "continuous pre-quantisation encoder output (decode with quantize=True)",
              "window": list(window), "overlap": list(overlap), "labels": dict(dataset.labels)}
    _check_cache_header(out, header)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    if dataset.splits:
        cases = [(c, s) for s in splits for c in dataset.cases_for(s)]
    else:
        cases = [(c, c.split) for c in dataset.cases]
    if not cases:
        raise InputError(f"no cases in splits {list(splits)}", dataset.root)
    spacings: list[tuple[float, ...]] = []
    warned = False
    for case, split in tqdm(cases, desc="encode", unit="case", disable=not progress):
        path = out / "latents" / f"{case.case_id}.safetensors"
        if path.is_file():
            continue
        volume, array, mapping, label = load_case(dataset, case)
        spacings.append(volume.spacing)
        if not warned:
            compatibility_warnings(export, dataset, [volume.spacing])
            warned = True
        x = torch.from_numpy(array)[None, None]
        z = encode_tiled(model, x, window=window, overlap=overlap, output_device="cpu")[0]
        tensors = {"latent": z.float()}
        if label is not None:
            lab = label.astype(np.int16 if label.max() < 2 ** 15 else np.int32)
            tensors["label"] = torch.from_numpy(np.ascontiguousarray(lab))
        meta = {"case_id": case.case_id, "split": split, "prompt": case.prompt, "metadata": case.metadata,
                "affine": volume.affine.tolist(), "shape": list(volume.shape), "spacing": list(volume.spacing),
                "modality": dataset_modality(dataset), "intensity": mapping.to_dict(),
                "latent_shape": list(z.shape)}
        save_tensors(path, tensors, meta)
    stats = latent_statistics(out)
    write_json_atomic(out / "stats.json", stats)
    return stats


def latent_statistics(cache_dir: str | Path) -> dict[str, Any]:
    """Per-channel and global statistics over every latent in the cache (float64 sums)."""
    files = sorted((Path(cache_dir) / "latents").glob("*.safetensors"))
    if not files:
        raise InputError("no latents to summarise", cache_dir)
    s = ss = None
    lo = hi = None
    n = 0
    splits: dict[str, int] = {}
    for path in files:
        tensors, meta = load_tensors(path)
        z = tensors["latent"].double().flatten(1)  # (L, N)
        s = z.sum(1) if s is None else s + z.sum(1)
        ss = z.pow(2).sum(1) if ss is None else ss + z.pow(2).sum(1)
        lo = z.min(1).values if lo is None else torch.minimum(lo, z.min(1).values)
        hi = z.max(1).values if hi is None else torch.maximum(hi, z.max(1).values)
        n += z.shape[1]
        splits[str(meta.get("split"))] = splits.get(str(meta.get("split")), 0) + 1
    mean = s / n
    std = (ss / n - mean.pow(2)).clamp_min(0).sqrt()
    g_mean = float(s.sum() / (n * len(s)))
    g_std = float(max(float(ss.sum() / (n * len(s))) - g_mean ** 2, 0.0) ** 0.5)
    return {"num_cases": len(files), "cases_per_split": splits, "voxels_per_channel": n,
            "channel_mean": mean.tolist(), "channel_std": std.tolist(), "channel_min": lo.tolist(),
            "channel_max": hi.tolist(), "mean": g_mean, "std": g_std,
            "scale_factor": 1.0 / g_std if g_std > 0 else 1.0,
            "scale_factor_note": "multiply latents by scale_factor before diffusion; divide before decoding"}


def read_cache_header(cache_dir: str | Path) -> dict[str, Any]:
    """``cache.json`` of a cache (the autoencoder, dataset, factor and label table it was made
    with); ``{}`` for a folder without one (caches written before the header had its name).

    Raises:
        InputError: the header is not valid JSON.
    """
    for name in ("cache.json", "header.json"):
        path = Path(cache_dir) / name
        if path.is_file():
            try:
                return dict(json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
                raise InputError(f"{name} is corrupt; delete the cache folder and encode again", path) from None
    return {}


def read_cache_stats(cache_dir: str | Path) -> dict[str, Any]:
    """stats.json of a finished cache (InputError when the cache is incomplete)."""
    path = Path(cache_dir) / "stats.json"
    if not path.is_file():
        raise InputError("no stats.json: the cache is incomplete; rerun `medsynth encode` to finish it", cache_dir)
    return json.loads(path.read_text(encoding="utf-8"))
