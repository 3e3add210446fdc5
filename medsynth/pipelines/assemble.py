"""``medsynth assemble``: exports + latent cache -> one self-describing pipeline folder.

The folder holds copies of the autoencoder and DiT exports and a ``pipeline.json`` naming every
component file with its relative path and sha256 (see :mod:`medsynth.pipelines.pipeline` for
the layout). Everything sampling needs that is not inside the exports comes from the latent
cache the DiT was trained on: the latent scale factor (``stats.json``), the intensity mapping,
modality, labels and the training size/spacing/metadata (per-case latent records), the decode
window (``cache.json``) and the training dataset's name.

Checks that the parts belong together: the cache was encoded by this autoencoder (sha256), the
DiT was trained on this cache's scale factor and on latents with the autoencoder's channels.
``pipeline.json`` is written last, so a folder with one is complete.

With ``controlnet_dir`` the mask ControlNet is added (checked against the DiT export it was
trained on, the cache's label table and downsampling factor), and ``quality.json`` is fit on the
*training split* of the dataset (per-class intensity ranges and the threshold segmenter of the
quality gate, :mod:`medsynth.pipelines.quality_gate`). ``bank_dir`` copies a mask bank in, and
``label_generator_dir`` a label generator export (``medsynth labels fit``; same label table).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import atomic_path, write_json_atomic
from medsynth.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, file_sha256, read_export, load_tensors
from medsynth.pipelines.pipeline import PIPELINE_FILE, PIPELINE_FORMAT, PIPELINE_VERSION, QUALITY_FILE

# Optimiser steps of the agreement segmenter trained at assemble time (0: threshold baseline only).
# 200 SegResNet steps learn the large organs of 32^3 phantoms in about a minute on 2 CPU cores.
DEFAULT_SEGMENTER_STEPS = 200
SEGMENTER_DIR = "segmenter"

EXPORT_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)
SCALE_TOLERANCE = 1e-6  # relative; the DiT records the float it was trained with
# Training cases of the generative splits only: the held-out test split says nothing about
# what the model learned.
GENERATIVE_SPLITS = ("train", "val")


def _copy_export(src: Path, dest: Path) -> dict[str, str]:
    """Copy an export's two files atomically; returns ``{file name: sha256}``."""
    dest.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name in EXPORT_FILES:
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(src / name, tmp)
        hashes[name] = file_sha256(dest / name)
    return hashes


def _cache_cases(cache: Path) -> list[dict[str, Any]]:
    """Metadata records of the cached training cases (all cases when none is marked train/val)."""
    records = [load_tensors(p)[1] for p in sorted((cache / "latents").glob("*.safetensors"))]
    if not records:
        raise InputError("the latent cache holds no latents; run `medsynth encode` first", cache)
    train = [r for r in records if r.get("split") in GENERATIVE_SPLITS]
    return train or records


def _most_common(values: Sequence[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    counts = Counter(json.dumps(v) for v in values)
    return json.loads(counts.most_common(1)[0][0])


def training_defaults(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Default size (most common), spacing (median) and metadata (most common region, ...)."""
    size = _most_common([list(r["shape"]) for r in cases if r.get("shape")])
    spacings = [r["spacing"] for r in cases if r.get("spacing")]
    if size is None or not spacings:
        raise InputError("latent cache records lack the image shape/spacing; encode the cache again with "
                         "this medsynth version")
    spacing = [float(v) for v in np.median(np.asarray(spacings, dtype=float), axis=0)]
    meta = [dict(r.get("metadata") or {}) for r in cases]
    metadata = {"region": _most_common([m.get("region") for m in meta])}
    return {"size": [int(s) for s in size], "spacing": spacing,
            "metadata": {k: v for k, v in metadata.items() if v is not None}}


def output_intensity(modality: str, cases: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The mapping from model range to output units, and the unit name.

    CT: the training HU window (all cases must share it). MR: per-case percentile scaling has
    no common scanner unit, so outputs are normalised: [-1, 1] -> [0, 1].
    """
    records = [r.get("intensity") for r in cases if r.get("intensity")]
    if modality == "CT":
        windows = {json.dumps(r, sort_keys=True) for r in records}
        if len(windows) != 1:
            raise InputError(f"the cached CT cases use {len(windows)} different intensity windows; one HU window "
                             f"is needed to return generated volumes in HU")
        return json.loads(windows.pop()), "HU"
    percentiles = _most_common([r.get("percentiles") for r in records]) or [0.5, 99.5]
    return {"kind": "mr_percentiles", "low": 0.0, "high": 1.0, "percentiles": percentiles}, "normalised"


def _check_controlnet(controlnet_dir: Path, dit_dir: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Read a ControlNet export and check it fits the DiT and the cache; returns its export config."""
    from medsynth.training.controlnet import check_base_dit, load_controlnet
    from medsynth.training.dit import load_dit

    controlnet, cn_export = load_controlnet(controlnet_dir)
    dit, _, dit_export = load_dit(dit_dir)
    try:
        check_base_dit(controlnet, cn_export, dit, dit_export)
    except ConfigError as err:
        raise InputError(str(err), controlnet_dir) from None
    cn_labels = {str(k): int(v) for k, v in dict(cn_export.config.get("labels") or {}).items()}
    cache_labels = {str(k): int(v) for k, v in dict(header.get("labels") or {}).items()}
    if cache_labels and cn_labels != cache_labels:
        raise InputError(f"the ControlNet was trained on labels {cn_labels}, but the cache's dataset has "
                         f"{cache_labels}; give the ControlNet trained on this cache", controlnet_dir)
    factor = header.get("downsample_factor")
    if factor and controlnet.config.image_to_latent_factor != (int(factor),) * 3:
        raise InputError(f"the ControlNet reads masks at latent factor {controlnet.config.image_to_latent_factor}, "
                         f"but the autoencoder downsamples by {factor}", controlnet_dir)
    return dict(cn_export.config)


def _check_label_generator(directory: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Read a label generator export and check its label table against the cache's; returns its config."""
    export = read_export(directory, kind="label_generator")  # InputError for a broken or other export
    labels = {str(k): int(v) for k, v in dict(export.config.get("labels") or {}).items()}
    cache_labels = {str(k): int(v) for k, v in dict(header.get("labels") or {}).items()}
    if cache_labels and labels != cache_labels:
        raise InputError(f"the label generator was trained on labels {labels}, but the model's are {cache_labels}; "
                         f"train it (`medsynth labels fit`) on the same dataset", directory)
    if "dit" not in export.config:
        raise InputError("not a label generator config (no 'dit' section); re-export it", directory / CONFIG_FILE)
    return dict(export.config)


def _check_refiner(directory: Path, autoencoder_sha256: str, header: dict[str, Any]) -> dict[str, Any]:
    """Read a mask refiner export and check it belongs behind this autoencoder and label table."""
    export = read_export(directory, kind="mask_refiner")  # InputError for a broken or other export
    trained_behind = export.metadata.get("autoencoder_sha256")
    if trained_behind and trained_behind != autoencoder_sha256:
        raise InputError(f"the mask refiner was trained behind the autoencoder {str(trained_behind)[:12]}..., not "
                         f"this pipeline's ({autoencoder_sha256[:12]}...); train it (`medsynth refiner fit`) on "
                         f"this autoencoder's cache", directory)
    labels = {str(k): int(v) for k, v in dict(export.config.get("labels") or {}).items()}
    cache_labels = {str(k): int(v) for k, v in dict(header.get("labels") or {}).items()}
    if cache_labels and labels != cache_labels:
        raise InputError(f"the mask refiner was trained on labels {labels}, but the model's are {cache_labels}",
                         directory)
    return dict(export.config)


def training_pairs(data_dir: str | Path, splits: Sequence[str]) -> tuple[Any, list[tuple[np.ndarray, np.ndarray]]]:
    """``(dataset, [(image in the model range [-1, 1], label)])`` of the labelled cases in ``splits``."""
    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import load_case

    dataset = read_dataset(data_dir)
    pairs = []
    for split in splits:
        for case in dataset.cases_for(split):
            _, model_range, _, label = load_case(dataset, case)  # model range [-1, 1] as the model saw it
            if label is not None:
                pairs.append((np.asarray(model_range, dtype=np.float32), label))
    if not pairs:
        raise InputError(f"no labelled cases in splits {list(splits)} to fit the quality checks on", dataset.root)
    return dataset, pairs


def output_unit_pairs(data_dir: str | Path, intensity: dict[str, Any],
                      splits: Sequence[str]) -> tuple[Any, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`training_pairs` with each image mapped back to the pipeline's output units (HU for CT)."""
    from medsynth.data.transforms import IntensityMapping

    dataset, pairs = training_pairs(data_dir, splits)
    output = IntensityMapping.from_dict(intensity)
    return dataset, [(np.asarray(output.inverse(image), dtype=np.float32), label) for image, label in pairs]


def fit_quality(data_dir: str | Path, intensity: dict[str, Any], unit: str,
                splits: Sequence[str] = ("train",)) -> dict[str, Any]:
    """``quality.json`` record from the dataset's ``splits`` (never test) in the pipeline's output units."""
    from medsynth.pipelines.quality_gate import fit_quality_record

    dataset, cases = output_unit_pairs(data_dir, intensity, splits)
    return fit_quality_record(cases, dataset.labels, unit, splits)


def fit_segmenter(data_dir: str | Path, intensity: dict[str, Any], steps: int, out_dir: str | Path,
                  splits: Sequence[str] = ("train",), seed: int = 0, lr_schedule: str = "constant",
                  augmentation: str = "none") -> dict[str, Any]:
    """Train the agreement segmenter (MONAI SegResNet) on ``splits`` and export it to ``out_dir``.

    ``lr_schedule`` and ``augmentation`` are :class:`~medsynth.training.segmentation.SegmenterConfig`'s.
    Returns the ``quality.json`` segmenter record (its path is relative to the pipeline folder).
    """
    from medsynth.data.transforms import IntensityMapping
    from medsynth.training.segmentation import fit_agreement_segmenter, save_agreement_segmenter

    dataset, pairs = training_pairs(data_dir, splits)
    smallest = min(min(image.shape) for image, _ in pairs)
    patch = int(max(16, min(64, smallest // 8 * 8)))  # whole small volumes, 64^3 windows on large ones
    labels = {k: int(v) for k, v in dataset.labels.items() if k != "ignore"}
    segmenter = fit_agreement_segmenter(pairs, labels, IntensityMapping.from_dict(intensity), steps, patch, seed,
                                        lr_schedule=lr_schedule, augmentation=augmentation)
    save_agreement_segmenter(out_dir, segmenter)
    return {"kind": "segresnet", "path": Path(out_dir).name, "steps": int(steps), "patch": patch,
            "splits": list(splits), "num_cases": len(pairs), "lr_schedule": lr_schedule,
            "augmentation": augmentation}


def calibrate_segmenter(data_dir: str | Path, intensity: dict[str, Any], quality: dict[str, Any],
                        pipeline_dir: str | Path) -> dict[str, Any]:
    """Score the quality record's agreement segmenter on real cases: the val split, or the
    splits it was fit on when the dataset has no labelled val case. Returns the ``calibration``
    record of ``quality.json`` (:func:`~medsynth.pipelines.quality_gate.calibration_record`)."""
    from medsynth.pipelines.quality_gate import calibration_record, segmenter_from_record

    segmenter = dict(quality["segmenter"])
    if segmenter.get("kind") == "segresnet":
        segmenter["path"] = str((Path(pipeline_dir) / segmenter["path"]).resolve())
    try:
        splits: Sequence[str] = ("val",)
        dataset, cases = output_unit_pairs(data_dir, intensity, splits)
    except InputError:  # no labelled val case: the training cases, which flatter a trained segmenter
        splits = tuple(quality["splits"])
        dataset, cases = output_unit_pairs(data_dir, intensity, splits)
    labels = {k: int(v) for k, v in dataset.labels.items() if k != "ignore"}
    return calibration_record(segmenter_from_record({"segmenter": segmenter}), cases, labels, splits)


def _copy_tree_hashed(src: Path, dest: Path, pattern: str = "**/*") -> dict[str, str]:
    hashes = {}
    for file in sorted(p for p in src.glob(pattern) if p.is_file()):
        rel = file.relative_to(src).as_posix()
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest / rel) as tmp:
            shutil.copyfile(file, tmp)
        hashes[rel] = file_sha256(dest / rel)
    return hashes


def assemble_pipeline(autoencoder_dir: str | Path, dit_dir: str | Path, cache_dir: str | Path,
                      out_dir: str | Path, *, name: str | None = None, controlnet_dir: str | Path | None = None,
                      bank_dir: str | Path | None = None, data_dir: str | Path | None = None,
                      label_generator_dir: str | Path | None = None, refiner_dir: str | Path | None = None,
                      segmenter_steps: int = DEFAULT_SEGMENTER_STEPS, segmenter_lr_schedule: str = "constant",
                      segmenter_augmentation: str = "none") -> Path:
    """Write a pipeline folder from an autoencoder export, a DiT export and their latent cache.

    Args:
        autoencoder_dir: ``medsynth autoencoder fit`` export (config.json + model.safetensors).
        dit_dir: ``medsynth dit fit`` export (``RUN/export``).
        cache_dir: the latent cache the DiT was trained on (``medsynth encode``).
        out_dir: the pipeline folder (created; an existing pipeline there is replaced).
        name: pipeline name recorded in pipeline.json (default: ``<dataset>_pipeline``).
        controlnet_dir: optional ``medsynth controlnet fit`` export (``RUN/export``) trained on
            this DiT and cache; adds mask-conditioned generation and ``quality.json``.
        bank_dir: optional mask bank (``medsynth labels bank``) copied in as the default mask
            source; needs ``controlnet_dir``.
        data_dir: the dataset the cache was encoded from, for the quality ranges (default: the
            path recorded in ``cache.json``).
        label_generator_dir: optional label generator export (``medsynth labels fit``
            ``RUN/export``) with the model's label table; needs ``controlnet_dir``.
        refiner_dir: optional mask refiner export (``medsynth refiner fit`` ``RUN/export``)
            trained behind this autoencoder; mask-conditioned images are refined by it. Needs
            ``controlnet_dir``.
        segmenter_steps: with a ControlNet, train the quality gate's agreement segmenter (MONAI
            SegResNet) on the training split for this many steps and store it in
            ``segmenter/``; 0 keeps the intensity-threshold baseline.
        segmenter_lr_schedule, segmenter_augmentation: that segmenter's learning-rate schedule
            ("constant" or "poly") and patch augmentation ("none" or "standard"); see
            :class:`~medsynth.training.segmentation.SegmenterConfig`.

    Returns:
        ``out_dir``.

    Raises:
        InputError: unreadable exports or cache, or parts that do not belong together.
        ConfigError: a bank, label generator or refiner without a ControlNet.
    """
    from medsynth.pipelines.latent_cache import read_cache_stats

    ae_dir, dit_dir, cache, out = Path(autoencoder_dir), Path(dit_dir), Path(cache_dir), Path(out_dir)
    if isinstance(segmenter_steps, bool) or not isinstance(segmenter_steps, int) or segmenter_steps < 0:
        raise ConfigError(f"--segmenter-steps must be an integer >= 0 (0: threshold baseline), got {segmenter_steps!r}")
    from medsynth.training.segmentation import AUGMENTATIONS, LR_SCHEDULES

    if segmenter_lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--segmenter-lr-schedule must be one of {list(LR_SCHEDULES)}, got {segmenter_lr_schedule!r}")
    if segmenter_augmentation not in AUGMENTATIONS:
        raise ConfigError(f"--segmenter-augmentation must be one of {list(AUGMENTATIONS)}, "
                          f"got {segmenter_augmentation!r}")
    ae = read_export(ae_dir, kind="vqgan")
    dit = read_export(dit_dir, kind="dit")
    stats = read_cache_stats(cache)
    cache_json = cache / "cache.json"
    if not cache_json.is_file():
        raise InputError("missing cache.json; this is not a latent cache (run `medsynth encode`)", cache)
    header = json.loads(cache_json.read_text(encoding="utf-8"))
    if header.get("model_sha256") and header["model_sha256"] != ae.sha256:
        raise InputError(f"the latent cache was encoded by another autoencoder (sha256 "
                         f"{str(header['model_sha256'])[:12]}..., this one {ae.sha256[:12]}...); give the "
                         f"autoencoder the cache was made with", ae_dir)
    scale = float(stats["scale_factor"])
    trained_scale = dit.metadata.get("scale_factor")
    if trained_scale is not None and abs(float(trained_scale) - scale) > SCALE_TOLERANCE * abs(scale):
        raise InputError(f"the DiT was trained with latent scale factor {trained_scale}, but the cache's "
                         f"stats.json says {scale}; give the cache the DiT was trained on", dit_dir)
    latent_channels = int(ae.config.get("latent_channels", 0))
    dit_channels = int(dit.config["model"].get("in_channels", -1))
    if dit_channels != latent_channels:
        raise InputError(f"the DiT takes {dit_channels}-channel latents but the autoencoder makes "
                         f"{latent_channels}", dit_dir)
    controlnet_config = None
    if controlnet_dir is not None:
        controlnet_config = _check_controlnet(Path(controlnet_dir), dit_dir, header)
    bank = None
    if bank_dir is not None:
        if controlnet_dir is None:
            raise ConfigError("--bank needs --controlnet: masks from a bank condition the ControlNet")
        from medsynth.pipelines.mask_bank import BANK_FILE, MaskBank

        bank = MaskBank.load(bank_dir)  # InputError for a broken bank; refuses test splits
        cache_labels = {str(k): int(v) for k, v in dict(header.get("labels") or {}).items()}
        if cache_labels and bank.labels != cache_labels:
            raise InputError(f"the mask bank uses labels {bank.labels}, but the model's are {cache_labels}",
                             Path(bank_dir) / BANK_FILE)
    generator = None
    if label_generator_dir is not None:
        if controlnet_dir is None:
            raise ConfigError("--label-generator needs --controlnet: generated masks condition the ControlNet")
        generator = _check_label_generator(Path(label_generator_dir), header)
    refiner = None
    if refiner_dir is not None:
        if controlnet_dir is None:
            raise ConfigError("--refiner needs --controlnet: the refiner reads the mask an image was generated from")
        refiner = _check_refiner(Path(refiner_dir), ae.sha256, header)
    cases = _cache_cases(cache)
    modality = str(_most_common([r.get("modality") for r in cases]) or ae.metadata.get("modality") or "")
    if modality not in ("CT", "MR"):
        raise InputError(f"cannot tell the modality of the cached cases (got {modality!r}); the dataset's "
                         f"channel name must be CT or MR", cache)
    intensity, unit = output_intensity(modality, cases)
    defaults = training_defaults(cases)

    objective = dict(dit.config.get("objective") or {"name": "rectified_flow"})
    sampling = dict(dit.config.get("sampling") or {})
    options = dict(objective.get("options") or {})
    scheduler = {"objective": objective.get("name", "rectified_flow"), "sampler": sampling.get("sampler"),
                 "shift": float(sampling.get("shift", options.get("shift", 1.0))),
                 "num_train_timesteps": int(options.get("num_train_timesteps", 1000)),
                 "num_inference_steps": int(sampling.get("num_inference_steps", 30)),
                 "guidance_scale": float(sampling.get("guidance_scale", 1.0))}
    from medsynth.diffusion.schedulers import make_scheduler
    try:
        make_scheduler(scheduler["objective"], scheduler["sampler"], scheduler["num_train_timesteps"],
                       scheduler["shift"])
    except ConfigError as err:
        raise InputError(f"the DiT export's sampler settings are invalid: {err}", dit_dir / CONFIG_FILE) from None

    quality = None
    if controlnet_config is not None:
        data = data_dir if data_dir is not None else header.get("data")
        if not data or not Path(data).exists():
            raise InputError("the quality ranges are fit on the dataset's training split, but the cache does not "
                             "record a dataset folder that exists here; give it with --data DIR", cache)
        quality = fit_quality(data, intensity, unit)

    out.mkdir(parents=True, exist_ok=True)
    (out / PIPELINE_FILE).unlink(missing_ok=True)  # incomplete until rewritten at the end
    components: dict[str, Any] = {
        "autoencoder": {"kind": "vqgan", "path": "autoencoder", "files": _copy_export(ae_dir, out / "autoencoder"),
                        "source": str(ae_dir)},
        "dit": {"kind": "dit", "path": "dit", "files": _copy_export(dit_dir, out / "dit"), "source": str(dit_dir)},
    }
    text = dict(dit.config.get("text_encoder") or {})
    if text.get("kind") == "hf":
        # A frozen encoder is not copied (it can be GBs and has its own licence); it must be
        # reachable at the same name_or_path wherever the pipeline is loaded.
        components["text_encoder"] = {"kind": "hf", "path": "dit", "files": {},
                                      "name_or_path": text.get("name_or_path"), "external": True}
    else:
        components["text_encoder"] = {"kind": text.get("kind", "vocab"), "path": "dit", "files": {},
                                      "note": "weights stored in the DiT export under text_encoder."}
    if controlnet_config is not None:
        sampling_cn = dict(controlnet_config.get("sampling") or {})
        components["controlnet"] = {"kind": "controlnet", "path": "controlnet",
                                    "files": _copy_export(Path(controlnet_dir), out / "controlnet"),
                                    "source": str(controlnet_dir), "labels": dict(controlnet_config["labels"]),
                                    "mask_guidance_scale": sampling_cn.get("mask_guidance_scale"),
                                    "guidance_rescale": sampling_cn.get("guidance_rescale")}
        if segmenter_steps > 0:
            # The agreement check's segmenter: a SegResNet trained on the same training split;
            # the threshold baseline stays in the record for comparison.
            shutil.rmtree(out / SEGMENTER_DIR, ignore_errors=True)
            quality["baseline_segmenter"] = quality["segmenter"]
            quality["segmenter"] = fit_segmenter(data, intensity, segmenter_steps, out / SEGMENTER_DIR,
                                                 lr_schedule=segmenter_lr_schedule,
                                                 augmentation=segmenter_augmentation)
            components["segmenter"] = {"kind": "segmenter", "path": SEGMENTER_DIR,
                                       "files": {f: file_sha256(out / SEGMENTER_DIR / f) for f in (CONFIG_FILE, WEIGHTS_FILE)},
                                       "steps": int(segmenter_steps)}
        # The gate leaves out large classes its segmenter cannot find on real images: otherwise
        # an undertrained segmenter fails every generated image on them.
        quality["calibration"] = calibrate_segmenter(data, intensity, quality, out)
        write_json_atomic(out / QUALITY_FILE, quality)
        components["quality"] = {"kind": "quality", "path": ".",
                                 "files": {QUALITY_FILE: file_sha256(out / QUALITY_FILE)},
                                 "splits": quality["splits"], "num_cases": quality["num_cases"]}
    if bank is not None:
        shutil.rmtree(out / "bank", ignore_errors=True)
        components["bank"] = {"kind": "mask_bank", "path": "bank", "source": str(bank_dir),
                              "splits": list(bank.splits), "num_masks": len(bank),
                              "files": _copy_tree_hashed(Path(bank_dir), out / "bank")}
    if generator is not None:
        components["label_generator"] = {"kind": "label_generator", "path": "label_generator",
                                         "files": _copy_export(Path(label_generator_dir), out / "label_generator"),
                                         "source": str(label_generator_dir), "labels": dict(generator["labels"]),
                                         "sampling": dict(generator.get("sampling") or {}),
                                         "attributes": list(generator["dit"].get("attributes") or [])}
    if refiner is not None:
        components["refiner"] = {"kind": "mask_refiner", "path": "refiner",
                                 "files": _copy_export(Path(refiner_dir), out / "refiner"),
                                 "source": str(refiner_dir), "model": dict(refiner.get("model") or {})}
    from medsynth import __version__

    record = {
        "format": PIPELINE_FORMAT, "format_version": PIPELINE_VERSION, "medsynth_version": __version__,
        "name": name or f"{header.get('dataset') or 'medsynth'}_pipeline",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "components": components,
        "scheduler": scheduler,
        "latent": {"scale_factor": scale, "channels": latent_channels,
                   "downsample_factor": int(header.get("downsample_factor") or 0) or None,
                   "patch_size": list(dit.config["model"].get("patch_size", [])),
                   "note": "denoise gives latent * scale_factor; divide before decoding (quantize=True)"},
        "decode": {"window": header.get("window"), "overlap": header.get("overlap")},
        "intensity": intensity, "intensity_unit": unit, "modality": modality,
        "labels": dict(header.get("labels") or {"background": 0}),
        "defaults": defaults,
        "training_data": {"dataset": header.get("dataset"), "num_cases": len(cases),
                          "latent_cache": str(cache), "cache_model_sha256": header.get("model_sha256"),
                          "dit_trained_steps": dit.metadata.get("trained_steps")},
    }
    write_json_atomic(out / PIPELINE_FILE, record)
    return out


__all__ = ["assemble_pipeline", "training_defaults", "output_intensity", "fit_quality", "fit_segmenter",
           "calibrate_segmenter", "training_pairs"]
