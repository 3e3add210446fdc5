"""Lightning training of the mask ControlNet over a frozen latent DiT, and its export.

``medsynth controlnet fit`` (CLI owned elsewhere) calls :func:`fit_controlnet`: it loads a DiT
export, copies its first blocks into a :class:`~medsynth.models.controlnet.ControlNet3D` and
trains only the copy on the latent cache's ``(latent, label)`` pairs. Research choices:

* the base DiT and its text encoder are frozen (``requires_grad_(False)``, not in the
  optimiser): the ControlNet can only *add* mask control, never damage text-conditioned quality;
* condition dropout with three independent rates (text, metadata, mask), so text-only,
  mask-only and unconditional predictions all exist for guidance with separate scales;
* an extra loss weight inside chosen label classes (``region_classes``, e.g. liver_lesion):
  a 5 mm lesion is a handful of latent voxels, so an unweighted MSE barely notices whether it
  is drawn and the model learns to leave it out;
* an EMA copy of the ControlNet is what gets exported.

Export (``config.json`` + ``model.safetensors``, kind ``controlnet``): the EMA ControlNet under
``controlnet.``, its config, the label table it was trained on (masks are one-hot over it), and
the base DiT export's path and sha256, so sampling can refuse a mismatched base.
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

from medsynth.diffusion import (check_region_weighting, make_objective, region_label_values, region_weights,
                                forget_sequence, sample_condition_dropout)
from medsynth.diffusion.schedulers import check_objective
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import Export, load_tensors, load_wrapped_export, save_export
from medsynth.models.controlnet import ControlNet3D, ControlNetConfig, one_hot_mask
from medsynth.models.dit import DiT3D
from medsynth.models.text_encoder import TextEmbedding, TextEncoder
from medsynth.training.acceleration import check_compile_options, compile_in_place
from medsynth.training.callbacks import ExportOnTrainEnd
from medsynth.training.trainer import fit_steps, step_trainer

GENERATIVE_SPLITS = ("train", "val")


@dataclass
class ControlNetTrainingConfig:
    """The ``training`` section of ``configs/controlnet/*.yaml``.

    Attributes:
        max_steps, batch_size, lr, weight_decay, ema_decay, precision, gradient_clip, seed:
            as for the DiT.
        text_drop_rate, metadata_drop_rate, mask_drop_rate: independent condition dropout.
        region_classes: label names whose voxels get ``region_loss_weight`` in the loss.
        region_loss_weight: loss weight inside those classes (1 = no emphasis); at latent
            resolution a class counts where any of its image voxels falls in the latent voxel.
        compile: ``torch.compile`` the ControlNet in place (GPU; off in every preset).
        compile_backend, compile_mode: passed to ``torch.compile`` ("inductor", "default").
    """

    max_steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    text_drop_rate: float = 0.1
    metadata_drop_rate: float = 0.1
    mask_drop_rate: float = 0.1
    region_classes: list[str] = field(default_factory=list)
    region_loss_weight: float = 1.0
    ema_decay: float = 0.999
    precision: str = "32-true"
    gradient_clip: float = 1.0
    seed: int = 0
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_compile_options(self.compile, self.compile_backend, self.compile_mode)
        self.region_classes = check_region_weighting(self.region_classes, self.region_loss_weight)
        for name in ("text_drop_rate", "metadata_drop_rate", "mask_drop_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"expects 0 <= {name} <= 1, but got {name}={getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"expects 0 <= ema_decay < 1, but got ema_decay={self.ema_decay}")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"expects max_steps, batch_size >= 1 and lr > 0, but got max_steps={self.max_steps}, "
                              f"batch_size={self.batch_size}, lr={self.lr}")

    @property
    def weights_regions(self) -> bool:
        """Whether the loss is weighted inside ``region_classes``."""
        return bool(self.region_classes) and self.region_loss_weight != 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ControlNetTrainingConfig":
        data = dict(data or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in section 'training'; valid keys are {valid}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Data: latents with their label maps
# ---------------------------------------------------------------------------------------------


class MaskedLatentDataset(Dataset):
    """Cached ``(latent, label)`` pairs of the generative splits.

    Items: ``{"latent": (C, x, y, z) float32 (scaled), "label": (X, Y, Z) int64, "prompt": str,
    "metadata": dict}`` with ``X = x * f`` (the cache stores labels at image resolution).

    Raises:
        ConfigError: a split outside train/val.
        InputError: no labelled latents in ``splits``.
    """

    def __init__(self, cache_dir: str | Path, splits: Sequence[str] = ("train",)) -> None:
        from medsynth.pipelines.latent_cache import read_cache_stats
        from medsynth.training.dit import conditioning_record

        bad = sorted(set(splits) - set(GENERATIVE_SPLITS))
        if bad:
            raise ConfigError(f"the ControlNet trains on splits {list(GENERATIVE_SPLITS)} only, but got {bad}; the "
                              f"test split is held out for evaluation")
        self.root = Path(cache_dir)
        self.scale_factor = float(read_cache_stats(self.root)["scale_factor"])
        self.items: list[dict[str, Any]] = []
        for path in sorted((self.root / "latents").glob("*.safetensors")):
            tensors, meta = load_tensors(path)
            if meta.get("split") not in splits or "label" not in tensors:
                continue
            self.items.append({"latent": tensors["latent"].float() * self.scale_factor,
                               "label": tensors["label"].long(), "prompt": str(meta.get("prompt") or ""),
                               "metadata": conditioning_record(meta), "case_id": str(meta.get("case_id", path.stem))})
        if not self.items:
            raise InputError(f"no cached latents with labels in splits {list(splits)}; run `medsynth encode` on a "
                             f"labelled dataset first", self.root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_masked(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack ``latent (B, C, x, y, z)`` and ``label (B, X, Y, Z)``; prompts and metadata stay lists."""
    shapes = {(tuple(it["latent"].shape), tuple(it["label"].shape)) for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"cannot batch cases of different grids {sorted(shapes)}; use batch_size 1 or "
                          f"prepare the dataset to one shape")
    return {"latent": torch.stack([it["latent"] for it in items]), "label": torch.stack([it["label"] for it in items]),
            "prompt": [it["prompt"] for it in items], "metadata": [dict(it["metadata"]) for it in items]}


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------


class ControlNetModule(L.LightningModule):
    """A frozen DiT (+ its text encoder) and a trainable ControlNet, with an EMA copy for export.

    Args:
        dit: the trained base model; frozen here.
        text_encoder: the encoder the DiT was trained with; frozen here.
        labels: label table (name -> value) of the masks; K = max value + 1 classes.
        controlnet: :class:`ControlNetConfig` fields other than ``dit`` and ``num_classes``
            (``num_blocks``, ``image_to_latent_factor``, ``embed_channels``).
        objective: the DiT's objective, ``{"name": ..., "options": {...}}``.
        training: :class:`ControlNetTrainingConfig` as a dict.
        sampling, metadata: recorded in the export.
    """

    def __init__(self, dit: DiT3D, text_encoder: TextEncoder, labels: Mapping[str, int],
                 controlnet: Mapping[str, Any] | None = None, objective: Mapping[str, Any] | None = None,
                 training: Mapping[str, Any] | None = None, sampling: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["dit", "text_encoder"])
        self.cfg = ControlNetTrainingConfig.from_dict(training)
        self.labels = {str(k): int(v) for k, v in labels.items()}
        self.region_values = region_label_values(self.cfg.region_classes, self.labels)
        options = dict(controlnet or {})
        bad = sorted(set(options) & {"dit", "num_classes"})
        if bad:
            raise ConfigError(f"controlnet config must not set {bad}: they come from the base DiT and the label table")
        objective = dict(objective or {"name": "rectified_flow"})
        self.objective = make_objective(check_objective(objective.get("name", "rectified_flow")),
                                        **dict(objective.get("options") or {}))
        self.sampling = dict(sampling or {})
        self.metadata = dict(metadata or {})
        self.dit = dit.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.controlnet = ControlNet3D.from_dit(dit, num_classes=max(self.labels.values()) + 1, **{
            "num_blocks": 2, "image_to_latent_factor": 4, **options})
        self.ema = copy.deepcopy(self.controlnet).requires_grad_(False)
        self._text_cache: dict[str, TextEmbedding] = {}
        if self.cfg.compile:  # after the EMA deepcopy: the EMA copy only runs at export
            compile_in_place(self.controlnet, self.cfg.compile_backend, self.cfg.compile_mode)

    def train(self, mode: bool = True) -> "ControlNetModule":
        # The frozen parts stay in eval mode whatever Lightning asks (matters once they have dropout).
        super().train(mode)
        self.dit.eval()
        self.text_encoder.eval()
        self.ema.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.AdamW(self.controlnet.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextEmbedding:
        """Frozen encoder: each prompt is encoded once, then reused."""
        for p in set(prompts) - set(self._text_cache):
            self._text_cache[p] = self.text_encoder.encode([p]).to("cpu")
        return TextEmbedding.cat([self._text_cache[p] for p in prompts]).to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0, label = batch["latent"], batch["label"]  # (B, C, x, y, z), (B, X, Y, Z)
        b = x0.shape[0]
        text = self.encode_text(batch["prompt"])
        # a share of MR cases train the model on "sequence not given" (a prompt that names none)
        metadata = forget_sequence(self.dit.encode_metadata(batch["metadata"]), self.cfg.metadata_drop_rate)
        drop_text, drop_metadata = sample_condition_dropout(b, self.cfg.text_drop_rate, self.cfg.metadata_drop_rate,
                                                            device=self.device)
        drop_mask = torch.rand(b, device=self.device) < self.cfg.mask_drop_rate
        mask = one_hot_mask(label, self.controlnet.config.num_classes, dtype=x0.dtype)
        xt, timesteps, noise = self.objective.training_inputs(x0)
        residuals = self.controlnet(xt, timesteps, text, metadata, mask, drop_text=drop_text,
                                    drop_metadata=drop_metadata, drop_mask=drop_mask)
        prediction = self.dit(xt, timesteps, text, metadata, drop_text=drop_text, drop_metadata=drop_metadata,
                              block_residuals=residuals)
        plain = self.objective.loss(prediction, x0, noise, timesteps)
        loss = plain.loss
        if self.cfg.weights_regions:
            weights = region_weights(label, self.region_values,
                                     self.controlnet.config.image_to_latent_factor, self.cfg.region_loss_weight)
            loss = self.objective.loss(prediction, x0, noise, timesteps, weights).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/mse", plain.loss, batch_size=b)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.cfg.gradient_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.gradient_clip, gradient_clip_algorithm="norm")

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.global_step
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))  # warm-up, as for the DiT
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.controlnet.parameters()],
                             1.0 - decay)

    def export(self, directory: str | Path) -> Path:
        """Write the EMA ControlNet, its label table and the base DiT reference."""
        metadata = {**self.metadata, "trained_steps": int(self.global_step), "training": self.cfg.to_dict()}
        return save_controlnet(directory, self.ema, self.labels, dict(self.hparams.get("objective") or
                                                                     {"name": "rectified_flow"}),
                               self.sampling, metadata)


# ---------------------------------------------------------------------------------------------
# Export and load
# ---------------------------------------------------------------------------------------------


def save_controlnet(directory: str | Path, model: ControlNet3D, labels: Mapping[str, int],
                    objective: Mapping[str, Any], sampling: Mapping[str, Any] | None = None,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Export ``config.json`` + ``model.safetensors`` (kind ``controlnet``)."""
    config = {"model": model.config.to_dict(), "labels": dict(labels), "objective": dict(objective),
              "sampling": dict(sampling or {})}
    return save_export(directory, nn.ModuleDict({"controlnet": model}), "controlnet", config, dict(metadata or {}))


def load_controlnet(directory: str | Path, device: torch.device | str = "cpu") -> tuple[ControlNet3D, Export]:
    """Load a ControlNet export (eval mode) and its record (labels under ``export.config["labels"]``)."""
    return load_wrapped_export(directory, "controlnet", lambda config: ControlNet3D(ControlNetConfig.from_dict(config)),
                               "controlnet", "ControlNet", device)  # type: ignore[return-value]


def check_base_dit(controlnet: ControlNet3D, export: Export, dit: DiT3D, dit_export: Export | None = None) -> None:
    """ConfigError when a ControlNet is paired with a DiT of another shape or another export."""
    if controlnet.config.dit.to_dict() != dit.config.to_dict():
        raise ConfigError("the ControlNet was trained for a DiT of another shape; use the DiT export it was "
                          f"trained on ({export.metadata.get('base_dit', 'unknown')})")
    want = export.metadata.get("base_dit_sha256")
    if dit_export is not None and want and dit_export.sha256 and want != dit_export.sha256:
        raise ConfigError(f"the ControlNet was trained on DiT export {export.metadata.get('base_dit')} "
                          f"(sha256 {want[:12]}...), but got {dit_export.path} (sha256 {dit_export.sha256[:12]}...)")


def fit_controlnet(dit_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, run_config: Mapping[str, Any],
                   accelerator: str = "auto", devices: int | str = "auto", max_steps: int | None = None,
                   resume: str | Path | None = None, num_workers: int = 0, num_nodes: int = 1,
                   strategy: str = "auto") -> Path:
    """Train a ControlNet for the DiT export ``dit_dir`` on a latent cache; returns ``out_dir/export``.

    ``run_config`` is a parsed ``configs/controlnet/*.yaml`` (sections controlnet, sampling,
    training). The objective is the DiT's own (from its export), so they cannot disagree.
    Lightning checkpoints go to ``out_dir/checkpoints``; ``resume`` continues from one (its
    ``last.ckpt``). ``accelerator``, ``devices`` (per node), ``num_nodes`` and ``strategy`` go to
    the Trainer.
    """
    from medsynth.pipelines.latent_cache import read_cache_stats
    from medsynth.training.dit import load_dit

    unknown = sorted(set(run_config) - {"controlnet", "sampling", "training"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the ControlNet config; valid sections are "
                          f"['controlnet', 'sampling', 'training']")
    training = ControlNetTrainingConfig.from_dict(run_config.get("training"))
    if max_steps is not None:
        training.max_steps = int(max_steps)
    L.seed_everything(training.seed, workers=True)
    dit, text_encoder, dit_export = load_dit(dit_dir)
    stats = read_cache_stats(cache_dir)
    labels = stats.get("labels") or _cache_labels(cache_dir)
    data = MaskedLatentDataset(cache_dir, ("train",))
    options = dict(run_config.get("controlnet") or {})
    factor = _cache_factor(cache_dir)
    if factor is not None:
        given = options.setdefault("image_to_latent_factor", factor)
        if ControlNetConfig(image_to_latent_factor=given).image_to_latent_factor != (factor,) * 3:
            raise ConfigError(f"controlnet.image_to_latent_factor={given!r}, but the latent cache was encoded with "
                              f"downsample_factor {factor}; leave it out to use the cache's")
    item = data.items[0]
    implied = [s // q for s, q in zip(item["label"].shape, item["latent"].shape[1:])]
    if any(s % q for s, q in zip(item["label"].shape, item["latent"].shape[1:])):
        raise InputError(f"case {item['case_id']!r}: label grid {tuple(item['label'].shape)} is not a multiple of "
                         f"its latent grid {tuple(item['latent'].shape[1:])}; re-encode the dataset", cache_dir)
    options.setdefault("image_to_latent_factor", tuple(implied))
    module = ControlNetModule(dit, text_encoder, labels, options, dit_export.config.get("objective"),
                              training.to_dict(), dict(run_config.get("sampling") or {}),
                              {"base_dit": str(dit_dir), "base_dit_sha256": dit_export.sha256,
                               "latent_cache": str(cache_dir), "scale_factor": data.scale_factor})
    out = Path(out_dir)
    trainer = step_trainer(out, training.max_steps, out / "checkpoints", [ExportOnTrainEnd(out / "export")],
                           accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                           precision=training.precision)
    fit_steps(trainer, module, data, training.batch_size, collate_masked, num_workers, resume)
    return out / "export"


def _cache_header(cache_dir: str | Path) -> dict[str, Any]:
    from medsynth.pipelines.latent_cache import read_cache_header

    return read_cache_header(cache_dir)


def _cache_labels(cache_dir: str | Path) -> dict[str, int]:
    labels = _cache_header(cache_dir).get("labels")
    if not labels:
        raise InputError("the latent cache records no label table; encode a labelled dataset", cache_dir)
    return {str(k): int(v) for k, v in labels.items()}


def _cache_factor(cache_dir: str | Path) -> int | None:
    factor = _cache_header(cache_dir).get("downsample_factor")
    return None if factor is None else int(factor)


__all__ = ["ControlNetTrainingConfig", "ControlNetModule", "MaskedLatentDataset", "collate_masked",
           "save_controlnet", "load_controlnet", "check_base_dit", "fit_controlnet"]
