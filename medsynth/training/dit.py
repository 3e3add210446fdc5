"""Lightning training of the stage-2 latent DiT on a latent cache, and its export.

Research code lives here (noising, condition dropout, EMA, per-timestep-bucket loss); the
Trainer owns devices, precision (bf16-mixed on GPU), DDP, checkpoints and logging.

The export folder (``config.json`` + ``model.safetensors``, written by
:func:`medsynth.io.checkpoint.save_export`) holds the EMA weights of the DiT under ``dit.`` and,
for a learned vocabulary encoder, of the text encoder under ``text_encoder.``; ``config.json``
records the model, text encoder, objective and sampler settings and the cache's
``scale_factor``, so sampling needs nothing else. A frozen Hugging Face encoder is referenced by
its ``name_or_path``, not copied.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from medsynth.diffusion import (bucket_losses, check_region_weighting, forget_sequence, make_objective,
                                region_label_values, region_weights, sample_condition_dropout)
from medsynth.diffusion.schedulers import check_objective
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, Export, load_state_strict, load_tensors, read_export,
                                    save_export)
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.text_encoder import TextEmbedding, TextEncoder, build_text_encoder
from medsynth.training.acceleration import check_compile_options, compile_in_place
from medsynth.training.callbacks import ExportOnTrainEnd
from medsynth.training.trainer import fit_steps, step_trainer

GENERATIVE_SPLITS = ("train", "val")  # the held-out "test" split is never trained on


@dataclass
class DiTTrainingConfig:
    """Optimisation settings (the ``training`` section of ``configs/dit/*.yaml``).

    Attributes:
        max_steps: optimiser steps.
        batch_size: latents per step (per device).
        lr, weight_decay: AdamW.
        text_drop_rate, metadata_drop_rate: condition dropout, drawn independently, so the
            model learns text-only and metadata-only generation for classifier-free guidance.
        ema_decay: decay of the exported exponential moving average of the weights.
        precision: Lightning precision ("32-true", "bf16-mixed", ...).
        gradient_clip: max gradient norm (0 disables).
        loss_buckets: the loss is also logged per this many equal timestep ranges.
        crop: latent crop ``(x, y, z)`` per sample, or None to use whole latents (which then
            must all have one shape to be batched).
        region_classes: label names whose latent voxels get ``region_loss_weight`` in the loss
            (e.g. ``[liver_lesion]``); needs a cache of a labelled dataset. Why: a lesion that a
            prompt asks for is one or two latent voxels, and an unweighted MSE lets the model
            leave it out (measured in docs/benchmarks/lesion_prompt_cpu_scanner_noise_f2.md).
        region_loss_weight: loss weight inside those classes (1 = no emphasis); a latent voxel
            counts when any of its image voxels carries one of the classes.
        seed: global seed.
        compile: ``torch.compile`` the trained network in place (GPU; off in every preset).
        compile_backend, compile_mode: passed to ``torch.compile`` ("inductor", "default").
    """

    max_steps: int = 2000
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    text_drop_rate: float = 0.1
    metadata_drop_rate: float = 0.1
    ema_decay: float = 0.999
    precision: str = "32-true"
    gradient_clip: float = 1.0
    loss_buckets: int = 4
    crop: tuple[int, int, int] | None = None
    region_classes: list[str] = field(default_factory=list)
    region_loss_weight: float = 1.0
    seed: int = 0
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_compile_options(self.compile, self.compile_backend, self.compile_mode)
        self.region_classes = check_region_weighting(self.region_classes, self.region_loss_weight)
        if self.crop is not None:
            self.crop = tuple(int(c) for c in self.crop)  # type: ignore[assignment]
            if len(self.crop) != 3 or min(self.crop) < 1:
                raise ConfigError(f"expects crop to be 3 positive ints (x, y, z) or null, but got crop={self.crop}")
        for name in ("text_drop_rate", "metadata_drop_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"expects 0 <= {name} <= 1, but got {name}={getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"expects 0 <= ema_decay < 1, but got ema_decay={self.ema_decay}")
        if self.max_steps < 1 or self.batch_size < 1 or self.loss_buckets < 1 or self.lr <= 0:
            raise ConfigError(f"expects max_steps, batch_size, loss_buckets >= 1 and lr > 0, but got "
                              f"max_steps={self.max_steps}, batch_size={self.batch_size}, "
                              f"loss_buckets={self.loss_buckets}, lr={self.lr}")

    @property
    def weights_regions(self) -> bool:
        """Whether the loss is weighted inside ``region_classes`` (needs label maps in the cache)."""
        return bool(self.region_classes) and self.region_loss_weight != 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DiTTrainingConfig":
        data = dict(data or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in section 'training'; valid keys are {valid}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Data: the latent cache
# ---------------------------------------------------------------------------------------------


def conditioning_record(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata for conditioning from a cache file's record: the case metadata, with modality and
    (image voxel) spacing filled in from the cache where the case does not give them."""
    record = dict(meta.get("metadata") or {})
    record.setdefault("modality", meta.get("modality"))
    if record.get("spacing") is None:
        record["spacing"] = meta.get("spacing")
    return record


class LatentCacheDataset(Dataset):
    """Cached latents of the generative splits, scaled by the cache's ``scale_factor``.

    Items: ``{"latent": (C, x, y, z) float32, "prompt": str, "metadata": dict}``, plus
    ``"label": (X, Y, Z)`` integer, as stored (image resolution, ``X = x * f``) when
    ``with_labels``; a crop then cuts the label map at the same place, so region loss weights stay
    on their voxels.

    Raises:
        InputError: no stats.json (unfinished cache), no latents in ``splits``, or a case without
            a label map when ``with_labels``.
        ConfigError: a split outside train/val (the test split is held out).
    """

    def __init__(self, cache_dir: str | Path, splits: Sequence[str] = ("train",),
                 crop: Sequence[int] | None = None, with_labels: bool = False) -> None:
        from medsynth.pipelines.latent_cache import read_cache_stats

        bad = sorted(set(splits) - set(GENERATIVE_SPLITS))
        if bad:
            raise ConfigError(f"the DiT trains on splits {list(GENERATIVE_SPLITS)} only, but got {bad}; the test "
                              f"split is held out for evaluation")
        self.root = Path(cache_dir)
        stats = read_cache_stats(self.root)
        self.scale_factor = float(stats["scale_factor"])
        self.label_table: dict[str, int] = {str(k): int(v) for k, v in (stats.get("labels") or {}).items()}
        self.crop = None if crop is None else tuple(int(c) for c in crop)
        self.items: list[tuple[Tensor, str, dict[str, Any]]] = []
        self.labels: list[Tensor] = []  # (X, Y, Z) per item, only when with_labels
        self.case_ids: list[str] = []
        for path in sorted((self.root / "latents").glob("*.safetensors")):
            tensors, meta = load_tensors(path)
            if meta.get("split") is not None and meta.get("split") not in splits:
                continue
            latent = tensors["latent"].float() * self.scale_factor  # (C, x, y, z)
            if with_labels:
                if "label" not in tensors:
                    raise InputError(f"case {meta.get('case_id', path.stem)!r} has no label map, but "
                                     "training.region_classes needs one for every case; encode a labelled "
                                     "dataset or leave region_classes empty", path)
                label = tensors["label"]  # kept as stored (int16): a 256^3 map in int64 is 134 MB
                if any(s % t for s, t in zip(label.shape, latent.shape[1:])):
                    raise InputError(f"label grid {tuple(label.shape)} is not a multiple of the latent grid "
                                     f"{tuple(latent.shape[1:])}; encode the cache again", path)
                self.labels.append(label)
            self.items.append((latent, str(meta.get("prompt") or ""), conditioning_record(meta)))
            self.case_ids.append(str(meta.get("case_id", path.stem)))
        if not self.items:
            raise InputError(f"no cached latents in splits {list(splits)}; run `medsynth encode` first", self.root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        latent, prompt, record = self.items[index]
        label = self.labels[index] if self.labels else None
        if self.crop is not None:
            latent, label = _random_crop(latent, self.crop, label)
        item = {"latent": latent, "prompt": prompt, "metadata": record}
        if label is not None:
            item["label"] = label
        return item


def _random_crop(latent: Tensor, crop: tuple[int, ...],
                 label: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Random ``crop`` window of ``(C, x, y, z)``; smaller axes are zero-padded (0 = the latent mean).

    ``label (X, Y, Z)`` at ``f`` times the latent grid is cut at the matching image window (padded
    with background 0).
    """
    pads = [max(0, c - s) for c, s in zip(crop, latent.shape[1:])]
    factor = None if label is None else [s // t for s, t in zip(label.shape, latent.shape[1:])]
    if any(pads):
        latent = nn.functional.pad(latent, (0, pads[2], 0, pads[1], 0, pads[0]))
        if label is not None:
            label = nn.functional.pad(label, (0, pads[2] * factor[2], 0, pads[1] * factor[1], 0, pads[0] * factor[0]))
    starts = [int(torch.randint(0, s - c + 1, ())) for s, c in zip(latent.shape[1:], crop)]
    latent = latent[:, starts[0]:starts[0] + crop[0], starts[1]:starts[1] + crop[1], starts[2]:starts[2] + crop[2]]
    if label is not None:
        lo = [s * f for s, f in zip(starts, factor)]
        hi = [(s + c) * f for s, c, f in zip(starts, crop, factor)]
        label = label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return latent, label


def collate_latents(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack latents ``(B, C, x, y, z)`` (and labels ``(B, X, Y, Z)`` when the items have them);
    prompts and metadata stay lists."""
    shapes = {tuple(it["latent"].shape) for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"cannot batch latents of different shapes {sorted(shapes)}; set training.crop "
                          f"(e.g. [8, 8, 8]) or batch_size 1")
    batch = {"latent": torch.stack([it["latent"] for it in items]), "prompt": [it["prompt"] for it in items],
             "metadata": [dict(it["metadata"]) for it in items]}
    if all("label" in it for it in items):
        batch["label"] = torch.stack([it["label"] for it in items])
    return batch


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------


class DiTModule(L.LightningModule):
    """DiT3D + text encoder + objective under Lightning, with an EMA copy for export.

    Args:
        model: :class:`DiTConfig` as a dict.
        text_encoder: :func:`build_text_encoder` config; a "vocab" encoder must carry its
            ``vocabulary`` (use :func:`text_encoder_config_for` to build it from the prompts).
        objective: ``{"name": ..., "options": {...}}`` for :func:`make_objective`.
        training: :class:`DiTTrainingConfig` as a dict.
        sampling: sampler settings recorded in the export (``sampler``, ``num_inference_steps``,
            ``guidance_scale``, ``shift``).
        metadata: what the model is trained on (scale_factor, cache, ...), recorded in the export.
        labels: the cache's label table (name -> value); needed when ``training.region_classes``
            is set, whose names must be in it.

    Batches come from :func:`collate_latents` (with ``label`` when region classes are set).
    """

    def __init__(self, model: dict[str, Any], text_encoder: dict[str, Any], objective: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None, labels: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = DiTConfig.from_dict(model)
        self.cfg = DiTTrainingConfig.from_dict(training)
        self.region_values = region_label_values(self.cfg.region_classes, labels) if self.cfg.weights_regions else []
        objective = dict(objective or {"name": "rectified_flow"})
        self.objective = make_objective(check_objective(objective.get("name", "rectified_flow")),
                                        **dict(objective.get("options") or {}))
        self.sampling = dict(sampling or {})
        self.metadata = dict(metadata or {})
        self.model = DiT3D(self.model_config)
        self.text_encoder = build_text_encoder(text_encoder)
        if self.text_encoder.dim != self.model_config.text_dim:
            raise ConfigError(f"the text encoder gives {self.text_encoder.dim}-d embeddings, but model.text_dim is "
                              f"{self.model_config.text_dim}; set them equal")
        # The exported weights: an exponential moving average (smoother samples than the raw
        # weights at the same step). Submodules, so checkpoints keep them and devices move them.
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.ema_text_encoder = (copy.deepcopy(self.text_encoder).requires_grad_(False)
                                 if self.text_encoder.trainable else None)
        self._frozen_text: dict[str, TextEmbedding] = {}
        if self.cfg.compile:  # after the EMA deepcopy: the EMA copy only runs at export
            compile_in_place(self.model, self.cfg.compile_backend, self.cfg.compile_mode)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def encode_text(self, prompts: Sequence[str]) -> TextEmbedding:
        """Trainable encoder: run it (with gradients). Frozen encoder: computed once per prompt, then reused."""
        if self.text_encoder.trainable:
            return self.text_encoder.encode(prompts)
        for p in set(prompts) - set(self._frozen_text):
            self._frozen_text[p] = self.text_encoder.encode([p]).to("cpu")
        return TextEmbedding.cat([self._frozen_text[p] for p in prompts]).to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = batch["latent"]  # (B, C, x, y, z), already scaled
        b = x0.shape[0]
        text = self.encode_text(batch["prompt"])
        # a share of MR cases train the model on "sequence not given" (a prompt that names none)
        metadata = forget_sequence(self.model.encode_metadata(batch["metadata"]), self.cfg.metadata_drop_rate)
        drop_text, drop_metadata = sample_condition_dropout(b, self.cfg.text_drop_rate, self.cfg.metadata_drop_rate,
                                                            device=self.device)
        xt, timesteps, noise = self.objective.training_inputs(x0)
        prediction = self.model(xt, timesteps, text, metadata, drop_text=drop_text, drop_metadata=drop_metadata)
        weights = None
        if self.region_values:
            label = batch["label"]  # (B, X, Y, Z) at image resolution
            factor = [s // t for s, t in zip(label.shape[1:], x0.shape[2:])]
            weights = region_weights(label, self.region_values, factor, self.cfg.region_loss_weight)
        out = self.objective.loss(prediction, x0, noise, timesteps, weights)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
        buckets = bucket_losses(out.per_sample, timesteps, self.cfg.loss_buckets, self.objective.num_train_timesteps)
        for name, value in buckets.items():
            self.log(f"train/loss_{name}", value, batch_size=b)
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.cfg.gradient_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.gradient_clip, gradient_clip_algorithm="norm")

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Warm-up of the decay (1 + n) / (10 + n): early averages are not dominated by the
        # random initial weights, which matters for short (demo) runs.
        n = self.global_step
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        pairs = [(self.ema, self.model)]
        if self.ema_text_encoder is not None:
            pairs.append((self.ema_text_encoder, self.text_encoder))
        for ema, live in pairs:
            ema_params = list(ema.parameters())
            live_params = [p.detach() for p in live.parameters()]
            torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)

    def export(self, directory: str | Path) -> Path:
        """Write the EMA weights and every setting sampling needs (see module docstring)."""
        metadata = {**self.metadata, "trained_steps": int(self.global_step), "training": self.cfg.to_dict()}
        encoder = self.ema_text_encoder if self.ema_text_encoder is not None else self.text_encoder
        return save_dit(directory, self.ema, encoder, dict(self.hparams.get("objective") or {"name": "rectified_flow"}),
                        self.sampling, metadata)


# ---------------------------------------------------------------------------------------------
# Export and load
# ---------------------------------------------------------------------------------------------


def save_dit(directory: str | Path, model: DiT3D, text_encoder: TextEncoder, objective: Mapping[str, Any],
             sampling: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Export a DiT (+ a trainable text encoder's weights) as ``config.json`` + ``model.safetensors``."""
    parts = nn.ModuleDict({"dit": model})
    if text_encoder.trainable:
        parts["text_encoder"] = text_encoder
    config = {"model": model.config.to_dict(), "text_encoder": text_encoder.config(),
              "objective": dict(objective), "sampling": dict(sampling or {})}
    return save_export(directory, parts, "dit", config, dict(metadata or {}))


def load_dit(directory: str | Path, device: torch.device | str = "cpu") -> tuple[DiT3D, TextEncoder, Export]:
    """Load a DiT export: ``(DiT3D in eval mode, text encoder, Export)`` on ``device``.

    Raises:
        InputError: missing/corrupt files, a non-DiT export, or weights that do not match.
        ConfigError: a frozen text encoder that cannot be found locally.
    """
    export = read_export(directory, kind="dit")
    cfg_path = Path(directory) / CONFIG_FILE
    try:
        config = DiTConfig.from_dict(export.config["model"])
        text_config = dict(export.config["text_encoder"])
    except (KeyError, TypeError, ConfigError) as err:
        raise InputError(f"invalid DiT config ({err}); re-export the model", cfg_path) from None
    model = DiT3D(config)
    encoder = build_text_encoder(text_config)
    parts = nn.ModuleDict({"dit": model})
    if encoder.trainable:
        parts["text_encoder"] = encoder
    load_state_strict(parts, export.state_dict, Path(directory) / WEIGHTS_FILE)
    return model.to(device).eval(), encoder.to(device).eval(), export


def text_encoder_config_for(config: Mapping[str, Any], prompts: Sequence[str]) -> dict[str, Any]:
    """A text-encoder config ready for :class:`DiTModule`: a "vocab" encoder gets its vocabulary
    built from ``prompts`` (the training prompts) so that it is saved with the hyperparameters."""
    config = dict(config)
    if config.get("kind", "vocab") == "vocab" and config.get("vocabulary") is None:
        encoder = build_text_encoder(config, prompts=prompts)
        return encoder.config()
    return config


def fit_dit(cache_dir: str | Path, out_dir: str | Path, run_config: Mapping[str, Any],
            accelerator: str = "auto", devices: int | str = "auto", max_steps: int | None = None,
            resume: str | Path | None = None, num_workers: int = 0, num_nodes: int = 1,
            strategy: str = "auto") -> Path:
    """Train a DiT on a latent cache and export it to ``out_dir/export``; returns the export folder.

    ``run_config`` is a parsed ``configs/dit/*.yaml`` (sections model, text_encoder, objective,
    sampling, training). Lightning checkpoints go to ``out_dir/checkpoints`` (``resume`` one).
    ``accelerator``, ``devices`` (per node), ``num_nodes`` and ``strategy`` go to the Trainer.
    """
    unknown = sorted(set(run_config) - {"model", "text_encoder", "objective", "sampling", "training"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the DiT config; valid sections are "
                          f"['model', 'text_encoder', 'objective', 'sampling', 'training']")
    training = DiTTrainingConfig.from_dict(run_config.get("training"))
    if max_steps is not None:
        training.max_steps = int(max_steps)
    L.seed_everything(training.seed, workers=True)
    data = LatentCacheDataset(cache_dir, ("train",), training.crop, with_labels=training.weights_regions)
    model_cfg = dict(run_config.get("model") or {})
    channels = data.items[0][0].shape[0]
    if model_cfg.get("in_channels", channels) != channels:
        raise ConfigError(f"model.in_channels={model_cfg['in_channels']} but the cached latents have {channels} "
                          f"channels; set in_channels to {channels}")
    model_cfg["in_channels"] = channels
    text_cfg = text_encoder_config_for(run_config.get("text_encoder") or {"kind": "vocab"},
                                       [prompt for _, prompt, _ in data.items])
    module = DiTModule(model_cfg, text_cfg, dict(run_config.get("objective") or {"name": "rectified_flow"}),
                       training.to_dict(), dict(run_config.get("sampling") or {}),
                       {"scale_factor": data.scale_factor, "latent_cache": str(cache_dir)},
                       labels=data.label_table)
    for case_id, (_, _, record) in zip(data.case_ids, data.items):  # fail before training, naming the case
        try:
            module.model.encode_metadata([record])
        except ConfigError as err:
            raise ConfigError(f"latent cache case {case_id!r}: {err}; fix prompts.jsonl and encode again") from None
    out = Path(out_dir)
    trainer = step_trainer(out, training.max_steps, out / "checkpoints", [ExportOnTrainEnd(out / "export")],
                           accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                           precision=training.precision)
    fit_steps(trainer, module, data, training.batch_size, collate_latents, num_workers, resume)
    return out / "export"


__all__ = ["DiTTrainingConfig", "DiTModule", "LatentCacheDataset", "collate_latents", "conditioning_record",
           "save_dit", "load_dit", "fit_dit", "text_encoder_config_for"]
