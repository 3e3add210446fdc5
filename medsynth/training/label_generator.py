"""Training of the label generator (``medsynth labels fit``) and its export.

Two stages, both under Lightning, both on the dataset's **train split only** (the held-out
test split never reaches a generative stage; val is left for checks):

1. the label autoencoder (:class:`~medsynth.models.label_generator.LabelAutoencoder`): one-hot
   label maps -> latent (/4 per axis) -> per-class logits, trained with cross-entropy + soft
   Dice. The decoder sees latents with a little Gaussian noise (``latent_noise``, relative to
   the latent's std), so it tolerates the small errors of sampled latents;
2. a :class:`~medsynth.models.dit.DiT3D` over the encoded latents (scaled to unit variance),
   conditioned on the case prompt, metadata (modality, region, spacing) and ``attributes``:
   ``volume:CLASS`` (the case's volume quantile of that class among training cases) and
   ``lesions:CLASS`` (its lesion count). It is trained by :class:`~medsynth.training.dit.DiTModule`
   (rectified flow by default, EMA, condition dropout); every attribute is also dropped
   independently (``attributes.drop_rate``), so any subset can be asked for at sampling.

All label maps go onto one grid: the training split's median spacing ("native spacing") and a
shape covering the largest field of view, rounded up to a multiple of ``factor x patch``.
Sampling makes maps on that grid and resamples them (nearest) to the output's own grid.

The export folder (``config.json`` + ``model.safetensors``, kind ``label_generator``) holds the
autoencoder (``autoencoder.``), the EMA DiT (``dit.``) and a learned text encoder
(``text_encoder.``); ``config.json`` records the label table, the grid, the latent scale factor,
sampler settings, and the training labels' statistics (per-class volumes in mL and lesion counts
per case, :mod:`medsynth.evaluation.label_statistics`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from medsynth.diffusion import expand_region_classes
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, Export, load_state_strict, read_export,
                                    read_lightning_checkpoint, save_export)
from medsynth.models.autoencoder_config import config_from_dict
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.label_generator import LESION_PREFIX, VOLUME_PREFIX, LabelAutoencoder, LabelAutoencoderConfig
from medsynth.models.text_encoder import TextEncoder, build_text_encoder
from medsynth.training.trainer import fit_steps, step_trainer

KIND = "label_generator"
SECTIONS: tuple[str, ...] = ("autoencoder", "autoencoder_training", "dit", "text_encoder", "objective", "sampling",
                             "dit_training", "attributes")


@dataclass
class LabelAETrainingConfig:
    """The ``autoencoder_training`` section.

    Attributes:
        max_steps, batch_size, lr: AdamW optimisation of the label autoencoder.
        dice_weight: weight of the soft Dice loss beside cross-entropy. Dice weighs every
            present class equally, so small organs are not drowned by the body and background.
        latent_noise: std of the Gaussian noise added to latents before decoding, relative to the
            batch's latent std: the decoder learns to absorb the DiT's sampling errors.
        class_weighting: "none", or "sqrt_inverse": cross-entropy weights ``sqrt(total / count)``
            per class in the batch, for classes of a few voxels (lesions) that plain
            cross-entropy + Dice can leave out.
        calibrate_volumes: after training, fit per-class logit offsets so that the decoded
            training maps hold each class's training volume (:func:`fit_class_offsets`). Class
            weighting and soft Dice push the argmax towards small classes: without it the tiny
            autoencoder decodes the phantoms' spine 1.39x and lesions 2.9x too large.
        seed: global seed.
    """

    max_steps: int = 1500
    batch_size: int = 4
    lr: float = 2e-3
    dice_weight: float = 1.0
    latent_noise: float = 0.1
    class_weighting: str = "none"
    calibrate_volumes: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.class_weighting not in ("none", "sqrt_inverse"):
            raise ConfigError(f"unknown class_weighting {self.class_weighting!r}; valid values are "
                              f"['none', 'sqrt_inverse']")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"expects max_steps, batch_size >= 1 and lr > 0, but got max_steps={self.max_steps}, "
                              f"batch_size={self.batch_size}, lr={self.lr}")
        if self.dice_weight < 0 or self.latent_noise < 0:
            raise ConfigError(f"expects dice_weight >= 0 and latent_noise >= 0, but got "
                              f"dice_weight={self.dice_weight}, latent_noise={self.latent_noise}")


@dataclass
class AttributeConfig:
    """The ``attributes`` section: which attributes the DiT is conditioned on.

    Attributes:
        volume_classes: classes with a ``volume:CLASS`` size-quantile attribute: "all" (every
            non-background class) or a list of names.
        lesion_counts: add ``lesions:CLASS`` (connected-component count) for every lesion class.
        drop_rate: probability that one attribute of a training sample is hidden (NaN).
    """

    volume_classes: str | list[str] = "all"
    lesion_counts: bool = True
    drop_rate: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.drop_rate <= 1:
            raise ConfigError(f"expects 0 <= drop_rate <= 1 in section 'attributes', but got {self.drop_rate}")
        if isinstance(self.volume_classes, str) and self.volume_classes != "all":
            raise ConfigError(f"volume_classes must be 'all' or a list of label names, but got "
                              f"{self.volume_classes!r}")

    def names(self, labels: Mapping[str, int]) -> tuple[str, ...]:
        """Attribute names for a label table (ConfigError for unknown class names)."""
        from medsynth.evaluation.label_statistics import lesion_classes

        foreground = [n for n, v in labels.items() if v != 0]
        chosen = foreground if self.volume_classes == "all" else list(self.volume_classes)
        unknown = sorted(set(chosen) - set(foreground))
        if unknown:
            raise ConfigError(f"attributes.volume_classes names {unknown}, which are not labels of the dataset; "
                              f"valid names are {foreground}")
        lesions = lesion_classes(labels) if self.lesion_counts else []
        return tuple([VOLUME_PREFIX + n for n in chosen] + [LESION_PREFIX + n for n in lesions])


def parse_label_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a parsed ``configs/labels/*.yaml`` (every section; ConfigError naming the bad key)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the label generator config; valid sections are "
                          f"{list(SECTIONS)}")
    from medsynth.diffusion import make_objective, make_scheduler
    from medsynth.training.dit import DiTTrainingConfig

    ae = dict(raw.get("autoencoder") or {})
    LabelAutoencoderConfig.from_dict({**ae, "num_classes": 2})
    config_from_dict(LabelAETrainingConfig, raw.get("autoencoder_training"), "autoencoder_training")
    dit = dict(raw.get("dit") or {})
    for key in ("in_channels", "attributes"):
        if key in dit:
            raise ConfigError(f"dit.{key} is set from the label autoencoder and the dataset; remove it")
    DiTConfig.from_dict(dit)
    DiTTrainingConfig.from_dict(raw.get("dit_training"))
    config_from_dict(AttributeConfig, raw.get("attributes"), "attributes")
    objective = dict(raw.get("objective") or {"name": "rectified_flow"})
    make_objective(objective.get("name", "rectified_flow"), **dict(objective.get("options") or {}))
    sampling = dict(raw.get("sampling") or {})
    bad = sorted(set(sampling) - {"sampler", "num_inference_steps", "guidance_scale", "shift"})
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in section 'sampling'; valid keys are "
                          f"['sampler', 'num_inference_steps', 'guidance_scale', 'shift']")
    make_scheduler(objective.get("name", "rectified_flow"), sampling.get("sampler"),
                   shift=float(sampling.get("shift", 1.0)))
    return {k: raw[k] for k in SECTIONS if raw.get(k) is not None}


# ---------------------------------------------------------------------------------------------
# Data: the train split's label maps on one grid
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelCases:
    """Training label maps on the native grid, with what conditions them.

    Attributes:
        labels: name -> value (the dataset table).
        arrays: ``(X, Y, Z)`` int64 maps on ``shape`` at ``spacing``.
        prompts, records: per case: text and conditioning metadata (modality, region, spacing, ...).
        statistics: per-class volumes (mL) and lesion counts of the original maps, per case.
    """

    labels: dict[str, int]
    case_ids: list[str]
    arrays: list[np.ndarray]
    prompts: list[str]
    records: list[dict[str, Any]]
    statistics: dict[str, Any]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    source: str = ""

    def attribute_values(self, names: Sequence[str]) -> list[dict[str, float]]:
        """Per case ``{attribute name: value}``: volume quantiles among the training cases, lesion counts."""
        from medsynth.evaluation.label_statistics import volume_quantile

        volumes, lesions = self.statistics["volumes_ml"], self.statistics["lesion_counts"]
        out = []
        for i in range(len(self.arrays)):
            values = {}
            for name in names:
                if name.startswith(VOLUME_PREFIX):
                    cls = name[len(VOLUME_PREFIX):]
                    values[name] = volume_quantile(volumes[cls], volumes[cls][i])
                else:
                    values[name] = float(lesions[name[len(LESION_PREFIX):]][i])
            out.append(values)
        return out


def read_label_cases(data_dir: str | Path, multiple: int) -> LabelCases:
    """Read the train split's label maps, in RAS, onto one grid (see module docstring).

    Raises:
        InputError: no labelled train case, a test case listed in train, no label table.
    """
    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import dataset_modality
    from medsynth.data.splits import HELD_OUT
    from medsynth.data.transforms import reorient_to_ras, resample_to_grid
    from medsynth.evaluation.label_statistics import case_statistics, collect_statistics
    from medsynth.io.reader import read_volume
    from medsynth.pipelines.mask_bank import centred_grid

    dataset = read_dataset(data_dir)
    if len(dataset.labels) < 2:
        raise InputError("the dataset's label table has no foreground label; the label generator needs labels",
                         dataset.root)
    held_out = set(dataset.splits.get(HELD_OUT, [])) if dataset.splits else set()
    cases = [c for c in dataset.cases_for("train") if c.label is not None]
    leaked = sorted(c.case_id for c in cases if c.case_id in held_out)
    if leaked:
        raise InputError(f"held-out test cases {leaked[:5]} are listed in the train split", dataset.root)
    if not cases:
        raise InputError("no labelled cases in the train split", dataset.root)
    volumes = [reorient_to_ras(read_volume(c.label, kind="label")) for c in cases]
    known = set(dataset.labels.values())
    for case, vol in zip(cases, volumes):
        bad = sorted(set(int(v) for v in np.unique(vol.array)) - known)
        if bad:
            raise InputError(f"label map of case {case.case_id!r} holds values {bad} that dataset.json does not "
                             f"define (known: {dataset.labels})", case.label)
    spacing = tuple(float(v) for v in np.median([v.spacing for v in volumes], axis=0))
    extent = np.max([np.asarray(v.shape) * np.asarray(v.spacing) for v in volumes], axis=0)
    shape = tuple(int(max(multiple, -(-round(e / s) // multiple) * multiple)) for e, s in zip(extent, spacing))
    arrays = []
    for vol in volumes:
        if vol.shape != shape or not np.allclose(vol.spacing, spacing):
            vol = resample_to_grid(vol, centred_grid(vol, shape, spacing))
        arrays.append(np.asarray(vol.array).astype(np.int64))
    modality = dataset_modality(dataset)
    records = []
    for case in cases:
        record = {k: v for k, v in dict(case.metadata or {}).items() if k in ("region", "sex", "age", "modality")}
        record.setdefault("modality", modality)
        record["spacing"] = list(spacing)
        records.append(record)
    stats = collect_statistics([case_statistics(v.array, dataset.labels, v.spacing) for v in volumes])
    return LabelCases(dict(dataset.labels), [c.case_id for c in cases], arrays, [c.prompt or "" for c in cases],
                      records, stats, shape, spacing, str(dataset.root))  # type: ignore[arg-type]


class LabelMapDataset(Dataset):
    """Items ``{"label": (X, Y, Z) int64}`` for the autoencoder stage."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [torch.from_numpy(a) for a in arrays]

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"label": self.arrays[index]}


class LabelLatentDataset(Dataset):
    """Items ``{"latent": (L, x, y, z), "prompt", "metadata"}`` for :class:`DiTModule`, with each
    attribute hidden at random (``drop_rate``) in ``metadata["attributes"]``; with ``maps``, also
    ``"label": (X, Y, Z)`` (the label map itself, for the DiT's region loss weights)."""

    def __init__(self, latents: Tensor, prompts: Sequence[str], records: Sequence[Mapping[str, Any]],
                 attributes: Sequence[Mapping[str, float]], drop_rate: float,
                 maps: Sequence[np.ndarray] | None = None) -> None:
        self.latents, self.prompts, self.records = latents, list(prompts), [dict(r) for r in records]
        self.attributes, self.drop_rate = [dict(a) for a in attributes], float(drop_rate)
        self.maps = None if maps is None else [torch.from_numpy(np.asarray(m, dtype=np.int64)) for m in maps]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kept = {k: v for k, v in self.attributes[index].items() if float(torch.rand(())) >= self.drop_rate}
        item = {"latent": self.latents[index], "prompt": self.prompts[index],
                "metadata": {**self.records[index], "attributes": kept}}
        if self.maps is not None:
            item["label"] = self.maps[index]
        return item


# ---------------------------------------------------------------------------------------------
# Stage 1: the label autoencoder
# ---------------------------------------------------------------------------------------------


def soft_dice_loss(logits: Tensor, onehot: Tensor, eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice over the classes present in the batch: ``(B, K, X, Y, Z)`` x2 -> scalar."""
    probs = logits.float().softmax(dim=1)
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)  # (K,)
    present = onehot.sum(dims) > 0
    return 1 - dice[present].mean()


class LabelAutoencoderModule(L.LightningModule):
    """Cross-entropy + soft Dice training of :class:`LabelAutoencoder` (batches from :class:`LabelMapDataset`)."""

    def __init__(self, model: dict[str, Any], training: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = LabelAutoencoder(LabelAutoencoderConfig.from_dict(model))
        self.cfg: LabelAETrainingConfig = config_from_dict(LabelAETrainingConfig, training, "autoencoder_training")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        label = batch["label"]  # (B, X, Y, Z)
        onehot = self.model.one_hot(label)  # (B, K, X, Y, Z)
        latent = self.model.encode(onehot)
        if self.cfg.latent_noise > 0:
            latent = latent + self.cfg.latent_noise * latent.detach().std() * torch.randn_like(latent)
        logits = self.model.decode(latent)
        weight = None
        if self.cfg.class_weighting == "sqrt_inverse":
            counts = onehot.sum(dim=(0, 2, 3, 4)).float()  # (K,)
            weight = torch.where(counts > 0, (counts.sum() / counts.clamp(min=1)).sqrt(), torch.zeros_like(counts))
            weight = weight / weight[counts > 0].mean()
        ce = F.cross_entropy(logits.float(), label, weight=weight)
        dice = soft_dice_loss(logits, onehot)
        loss = ce + self.cfg.dice_weight * dice
        self.log_dict({"ae/loss": loss, "ae/ce": ce, "ae/dice_loss": dice}, prog_bar=True, batch_size=label.shape[0])
        return loss


# ---------------------------------------------------------------------------------------------
# Export and load
# ---------------------------------------------------------------------------------------------


def save_label_generator(directory: str | Path, autoencoder: LabelAutoencoder, dit: DiT3D,
                         text_encoder: TextEncoder, record: Mapping[str, Any],
                         metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the export (see module docstring). ``record`` holds labels, grid, latent, objective,
    sampling, metadata_defaults and statistics."""
    parts = nn.ModuleDict({"autoencoder": autoencoder, "dit": dit})
    if text_encoder.trainable:
        parts["text_encoder"] = text_encoder
    config = {"autoencoder": autoencoder.config.to_dict(), "dit": dit.config.to_dict(),
              "text_encoder": text_encoder.config(), **dict(record)}
    return save_export(directory, parts, KIND, config, dict(metadata or {}))


def load_label_generator(directory: str | Path, device: torch.device | str = "cpu"
                         ) -> tuple[LabelAutoencoder, DiT3D, TextEncoder, Export]:
    """Load an export: ``(autoencoder, DiT, text encoder, Export)``, in eval mode on ``device``.

    Raises:
        InputError: missing/corrupt files, another kind of export, or weights that do not match.
    """
    export = read_export(directory, kind=KIND)
    cfg_path = Path(directory) / CONFIG_FILE
    try:
        ae = LabelAutoencoder(LabelAutoencoderConfig.from_dict(export.config["autoencoder"]))
        dit = DiT3D(DiTConfig.from_dict(export.config["dit"]))
        encoder = build_text_encoder(dict(export.config["text_encoder"]))
        missing = [k for k in ("labels", "grid", "latent", "statistics") if k not in export.config]
        if missing:
            raise KeyError(f"missing sections {missing}")
    except (KeyError, TypeError, ConfigError) as err:
        raise InputError(f"invalid label generator config ({err}); re-export the model", cfg_path) from None
    parts = nn.ModuleDict({"autoencoder": ae, "dit": dit})
    if encoder.trainable:
        parts["text_encoder"] = encoder
    load_state_strict(parts, export.state_dict, Path(directory) / WEIGHTS_FILE)
    return ae.to(device).eval(), dit.to(device).eval(), encoder.to(device).eval(), export


# ---------------------------------------------------------------------------------------------
# The two-stage fit
# ---------------------------------------------------------------------------------------------


# Top-level key of every labels-fit checkpoint: which stage wrote it and, for the DiT stage, the
# trained label autoencoder, so a DiT checkpoint alone is enough to resume.
STAGE_KEY = "medsynth_label_generator"
STAGES = ("autoencoder", "dit")


class _RecordStage(L.Callback):
    """Writes :data:`STAGE_KEY` into each checkpoint of one stage (and the autoencoder into the DiT's)."""

    def __init__(self, stage: str, autoencoder: LabelAutoencoder | None = None, autoencoder_steps: int = 0) -> None:
        self.stage, self.autoencoder, self.autoencoder_steps = stage, autoencoder, int(autoencoder_steps)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        record: dict[str, Any] = {"stage": self.stage}
        if self.autoencoder is not None:
            record.update(autoencoder_config=self.autoencoder.config.to_dict(),
                          autoencoder_state=self.autoencoder.state_dict(), autoencoder_steps=self.autoencoder_steps)
        checkpoint[STAGE_KEY] = record


def read_stage_checkpoint(path: str | Path) -> dict[str, Any]:
    """The :data:`STAGE_KEY` record of a labels-fit checkpoint (``{"stage": ..., ...}``).

    Raises:
        ConfigError: the file is not a Lightning checkpoint written by ``labels fit``.
    """
    record = read_lightning_checkpoint(path).get(STAGE_KEY)
    if not isinstance(record, dict) or record.get("stage") not in STAGES:
        raise ConfigError(f"--resume {path} is not a `labels fit` checkpoint; give OUT/checkpoints/autoencoder/"
                          f"last.ckpt or OUT/checkpoints/dit/last.ckpt of a labels fit run")
    return record


@torch.no_grad()
def encode_labels(model: LabelAutoencoder, arrays: Sequence[np.ndarray], batch_size: int = 4) -> Tensor:
    """Label maps -> latents ``(N, L, x, y, z)`` (float32, CPU)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(arrays), batch_size):
        label = torch.from_numpy(np.stack(arrays[i:i + batch_size])).to(device)
        out.append(model.encode(model.one_hot(label)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_dice(model: LabelAutoencoder, latents: Tensor, arrays: Sequence[np.ndarray],
                        labels: Mapping[str, int], class_offsets: Sequence[float] | None = None,
                        batch_size: int = 4) -> dict[str, float]:
    """Per-class Dice of the autoencoder's reconstruction of the training maps (pooled over cases),
    decoded with ``class_offsets`` (see :func:`fit_class_offsets`) when given."""
    inter, total = Counter(), Counter()
    device = next(model.parameters()).device
    for i in range(0, len(arrays), batch_size):
        recon = model.decode_labels(latents[i:i + batch_size].to(device), allowed=sorted(labels.values()),
                                    class_offsets=class_offsets).cpu().numpy()  # (B, X, Y, Z)
        truth = np.stack(arrays[i:i + batch_size])
        for name, value in labels.items():
            a, b = recon == value, truth == value
            inter[name] += int((a & b).sum())
            total[name] += int(a.sum() + b.sum())
    return {name: round(2.0 * inter[name] / total[name], 4) for name, value in labels.items()
            if value != 0 and total[name]}


@dataclass
class VolumeCalibration:
    """Result of :func:`fit_class_offsets`.

    Attributes:
        class_offsets: ``K`` logit offsets, one per label value (0 for values the dataset lacks).
        volume_ratio_before, volume_ratio_after: per class name, decoded / true voxel count over
            the calibration maps without and with the offsets (1.0 = the training volume).
        cases: how many training maps it was fit on.
    """

    class_offsets: list[float]
    volume_ratio_before: dict[str, float]
    volume_ratio_after: dict[str, float]
    cases: int


@torch.no_grad()
def fit_class_offsets(model: LabelAutoencoder, latents: Tensor, arrays: Sequence[np.ndarray],
                      labels: Mapping[str, int], max_cases: int = 32, iterations: int = 60, rate: float = 0.5,
                      max_offset: float = 4.0, batch_size: int = 4) -> VolumeCalibration:
    """Per-class logit offsets under which the decoded training maps hold the training volumes.

    Why: the label autoencoder is trained with class-weighted cross-entropy and soft Dice, which
    both move the decision boundary towards the smaller class; its argmax then over-segments
    small and thin classes (tiny config on CT phantoms: spine 1.39x, lesions 2.9x, body 0.93x).
    Adding ``b_k`` to the logits of class ``k`` undoes that prior shift: starting from 0, each
    iteration adds ``rate * log((true + 1) / (decoded + 1))`` per class, bounded to
    ``[-max_offset, max_offset]``. The shapes stay the autoencoder's; only the class volumes move.

    Only voxels whose two largest logits lie within ``2 * max_offset`` of each other can change
    class under such offsets, so only those are kept in memory: the fit is exact, and cheap.

    Args:
        latents: ``(N, L, x, y, z)`` encodings of ``arrays``.
        arrays: the training label maps ``(X, Y, Z)`` (int).
        labels: the dataset's table; values outside it are never decoded.
        max_cases: fit on at most this many maps, evenly spaced (bounds memory on large datasets).
    """
    device = next(model.parameters()).device
    k = model.config.num_classes
    allowed = sorted(int(v) for v in labels.values())
    chosen = np.unique(np.linspace(0, len(arrays) - 1, min(len(arrays), max_cases)).round().astype(int))
    target, settled = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    open_voxels = []
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start:start + batch_size]
        logits = model.allowed_logits(model.decode(latents[idx].to(device)), allowed).float().cpu()
        flat = logits.permute(0, 2, 3, 4, 1).reshape(-1, k)  # (voxels, K)
        top = flat.topk(min(2, k), dim=1).values
        sure = (top[:, 0] - top[:, -1]) > 2 * max_offset
        settled += torch.bincount(flat[sure].argmax(dim=1), minlength=k).double()
        open_voxels.append(flat[~sure])
        truth = torch.from_numpy(np.stack([np.asarray(arrays[i]) for i in idx]).astype(np.int64)).reshape(-1)
        target += torch.bincount(truth, minlength=k).double()
    undecided = torch.cat(open_voxels)

    def decoded(offsets: Tensor) -> Tensor:
        return settled + torch.bincount((undecided + offsets).argmax(dim=1), minlength=k).double()

    present = torch.zeros(k, dtype=torch.bool)
    present[allowed] = True
    offsets = torch.zeros(k)
    before = decoded(offsets)
    for _ in range(iterations):
        step = rate * torch.log((target + 1) / (decoded(offsets) + 1)).float()
        offsets = torch.where(present, offsets + step, offsets).clamp(-max_offset, max_offset)
    # argmax is unchanged by a common shift: anchor the first value at 0 (values outside the table stay 0)
    offsets = torch.where(present, offsets - offsets[allowed[0]], torch.zeros_like(offsets))
    after = decoded(offsets)

    def ratios(counts: Tensor) -> dict[str, float]:
        return {name: round(float(counts[v] / target[v]), 3) for name, v in labels.items() if target[v] > 0}

    return VolumeCalibration([round(float(o), 4) for o in offsets], ratios(before), ratios(after), len(chosen))


def fit_label_generator(data_dir: str | Path, out_dir: str | Path, run_config: Mapping[str, Any],
                        accelerator: str = "auto", devices: int | str = "auto",
                        max_steps: int | None = None, resume: str | Path | None = None, num_nodes: int = 1,
                        strategy: str = "auto") -> Path:
    """Train the label autoencoder, then the label DiT, on the train split; export to ``out_dir/export``.

    Args:
        data_dir: a prepared dataset folder (with splits.json and labels).
        out_dir: run folder; the export goes to ``out_dir/export``, each stage's Lightning
            checkpoints to ``out_dir/checkpoints/autoencoder`` and ``out_dir/checkpoints/dit``.
        run_config: a parsed ``configs/labels/*.yaml`` (see :func:`parse_label_config`).
        accelerator, devices, num_nodes, strategy: for both stages' Trainers (devices per node).
        max_steps: caps the optimiser steps of each stage (tests, quick runs).
        resume: a checkpoint of either stage. An autoencoder checkpoint continues the autoencoder,
            then trains the DiT from scratch; a DiT checkpoint takes the trained autoencoder from
            the checkpoint (it is not retrained) and continues the DiT.

    Returns:
        The export folder.

    Raises:
        ConfigError: ``resume`` is not a labels-fit checkpoint, or its autoencoder has another
            architecture than the config's.
    """
    from medsynth.training.dit import DiTModule, DiTTrainingConfig, collate_latents, text_encoder_config_for

    run_config = parse_label_config(run_config)
    ae_train: LabelAETrainingConfig = config_from_dict(LabelAETrainingConfig, run_config.get("autoencoder_training"),
                                                 "autoencoder_training")
    dit_train = DiTTrainingConfig.from_dict(run_config.get("dit_training"))
    attr_cfg: AttributeConfig = config_from_dict(AttributeConfig, run_config.get("attributes"), "attributes")
    if max_steps is not None:
        ae_train.max_steps = min(ae_train.max_steps, int(max_steps))
        dit_train.max_steps = min(dit_train.max_steps, int(max_steps))
    dit_dict = dict(run_config.get("dit") or {})
    ae_dict = dict(run_config.get("autoencoder") or {})
    factor = LabelAutoencoderConfig.from_dict({**ae_dict, "num_classes": 2}).downsample_factor
    patch = max(DiTConfig.from_dict(dit_dict).patch_size)
    out = Path(out_dir)

    resumed = None if resume is None else read_stage_checkpoint(resume)
    resume_stage = None if resumed is None else resumed["stage"]
    # checkpoints as for `dit fit`, one folder per stage; no logger (the stages report through the export)
    trainer_options = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy,
                       "logger": False, "enable_model_summary": False}

    L.seed_everything(ae_train.seed, workers=True)
    data = read_label_cases(data_dir, factor * patch)
    names = attr_cfg.names(data.labels)
    ae_dict["num_classes"] = max(data.labels.values()) + 1
    if resume_stage == "dit":
        # The first stage is finished: take its weights from the checkpoint instead of retraining
        # them (the DiT's latents, and so its checkpoint, only fit that very autoencoder).
        autoencoder, ae_steps = _carried_autoencoder(resumed, ae_dict, resume)
    else:
        ae_module = LabelAutoencoderModule(ae_dict, asdict(ae_train))
        trainer = step_trainer(out, ae_train.max_steps, out / "checkpoints" / "autoencoder",
                               [_RecordStage("autoencoder")], precision="32-true", **trainer_options)
        fit_steps(trainer, ae_module, LabelMapDataset(data.arrays), ae_train.batch_size,
                  resume=None if resume_stage is None else resume)
        autoencoder, ae_steps = ae_module.model.cpu().eval().requires_grad_(False), int(ae_module.global_step)

    latents = encode_labels(autoencoder, data.arrays)  # (N, L, x, y, z)
    calibration = None
    if ae_train.calibrate_volumes:
        calibration = fit_class_offsets(autoencoder, latents, data.arrays, data.labels)
    offsets = None if calibration is None else calibration.class_offsets
    recon_dice = reconstruction_dice(autoencoder, latents, data.arrays, data.labels, offsets)
    scale = float(1.0 / max(float(latents.std()), 1e-6))
    attributes = data.attribute_values(names)
    dit_dict.update(in_channels=autoencoder.config.latent_channels, attributes=list(names))
    text_cfg = text_encoder_config_for(run_config.get("text_encoder") or {"kind": "vocab"}, data.prompts)
    objective = dict(run_config.get("objective") or {"name": "rectified_flow"})
    sampling = {"sampler": None, "num_inference_steps": 10, "guidance_scale": 1.0, "shift": 1.0,
                **dict(run_config.get("sampling") or {})}
    dit_train.region_classes = expand_region_classes(dit_train.region_classes, data.labels)
    L.seed_everything(dit_train.seed, workers=True)
    dit_module = DiTModule(dit_dict, text_cfg, objective, dit_train.to_dict(), sampling, {"scale_factor": scale},
                           labels=data.labels)
    for case_id, record in zip(data.case_ids, data.records):  # fail before training, naming the case
        try:
            dit_module.model.encode_metadata([record])
        except ConfigError as err:
            raise ConfigError(f"train case {case_id!r}: {err}; fix its metadata (prompts.jsonl)") from None
    dataset = LabelLatentDataset(latents * scale, data.prompts, data.records, attributes, attr_cfg.drop_rate,
                                 maps=data.arrays if dit_train.weights_regions else None)
    trainer = step_trainer(out, dit_train.max_steps, out / "checkpoints" / "dit",
                           [_RecordStage("dit", autoencoder, ae_steps)], precision=dit_train.precision,
                           **trainer_options)
    fit_steps(trainer, dit_module, dataset, dit_train.batch_size, collate_latents,
              resume=resume if resume_stage == "dit" else None)
    if not trainer.is_global_zero:
        return out / "export"
    encoder = dit_module.ema_text_encoder if dit_module.ema_text_encoder is not None else dit_module.text_encoder
    regions = Counter(str(r.get("region")) for r in data.records if r.get("region") is not None)
    record = {"labels": data.labels, "objective": objective, "sampling": sampling,
              "grid": {"shape": list(data.shape), "spacing": list(data.spacing)},
              "latent": {"scale_factor": scale, "downsample_factor": factor},
              "decoding": {"class_offsets": offsets},
              "metadata_defaults": {"modality": data.records[0].get("modality"),
                                    "region": regions.most_common(1)[0][0] if regions else None},
              "statistics": {**data.statistics, "splits": ["train"], "case_ids": data.case_ids}}
    metadata = {"dataset": data.source, "trained_steps": {"autoencoder": ae_steps,
                                                          "dit": int(dit_module.global_step)},
                "autoencoder_reconstruction_dice": recon_dice,
                "volume_calibration": None if calibration is None else asdict(calibration),
                "training": {"autoencoder_training": asdict(ae_train), "dit_training": dit_train.to_dict(),
                             "attributes": asdict(attr_cfg)}}
    return save_label_generator(out / "export", autoencoder, copy.deepcopy(dit_module.ema).cpu().eval(),
                                copy.deepcopy(encoder).cpu().eval(), record, metadata)


def _carried_autoencoder(record: Mapping[str, Any], ae_dict: Mapping[str, Any],
                         path: str | Path) -> tuple[LabelAutoencoder, int]:
    """The trained label autoencoder a DiT-stage checkpoint carries, and its step count.

    Raises:
        ConfigError: the carried autoencoder has another architecture than the config asks for
            (the checkpoint belongs to another config or dataset).
    """
    carried = LabelAutoencoderConfig.from_dict(record["autoencoder_config"])
    wanted = LabelAutoencoderConfig.from_dict(dict(ae_dict))
    if carried.to_dict() != wanted.to_dict():
        raise ConfigError(f"--resume {path} holds a label autoencoder {carried.to_dict()}, but the config and "
                          f"dataset give {wanted.to_dict()}; resume with the run's own config and dataset")
    model = LabelAutoencoder(carried)
    model.load_state_dict(record["autoencoder_state"])
    return model.eval().requires_grad_(False), int(record.get("autoencoder_steps", 0))


__all__ = ["LabelAETrainingConfig", "AttributeConfig", "LabelCases", "read_label_cases", "LabelMapDataset",
           "LabelLatentDataset", "LabelAutoencoderModule",
           "soft_dice_loss", "save_label_generator", "load_label_generator", "fit_label_generator",
           "parse_label_config", "encode_labels", "reconstruction_dice", "fit_class_offsets", "VolumeCalibration",
           "read_stage_checkpoint", "KIND", "STAGE_KEY", "VOLUME_PREFIX", "LESION_PREFIX", "SECTIONS"]
