"""``medsynth refiner fit``: train the mask refiner (:mod:`medsynth.models.mask_refiner`) on a latent cache.

Each train case of the cache gives a triple: its cached latent (what the DiT learns to make), its
label map (what the ControlNet is conditioned on) and its real image, read from the dataset the
cache was encoded from. A step decodes a batch of whole latents with the frozen autoencoder
(tiled exactly as the pipeline decodes), after adding Gaussian noise of ``latent_noise`` x the
cache's latent standard deviation (sampled latents are never exact encodings, and a refiner that
only saw exact ones would be brittle), and trains the refiner to map (decoded image, one-hot
label map) to the real image under an L1 loss.

Everything the steps need is held in memory (latent, label and model-range image per case): fine
for the phantoms and for datasets of a few hundred cropped volumes. ``patch_size`` crops the
decoded volumes before the refiner sees them, to bound the refiner's compute. The crop is taken
*after* decoding, never from the latent: the decoder's GroupNorm statistics depend on the extent
it decodes, and a decoded 16^3 latent crop is far from the same region of a whole decode (L1 0.28
against 0.027 in the model range on the 32^3 CT phantoms).

After training, the export records the refiner's effect on the val split (mean absolute error
and PSNR of the decoded images and of the refined ones against the real images, in model units),
so a run that learned nothing is visible before the refiner goes into a pipeline.
"""

from __future__ import annotations

import copy
import math
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

from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import Export, load_wrapped_export, save_export
from medsynth.models.autoencoder_config import config_from_dict
from medsynth.models.controlnet import one_hot_mask
from medsynth.models.mask_refiner import MaskRefiner3D, MaskRefinerConfig
from medsynth.models.vqgan import VQGAN
from medsynth.training.callbacks import ExportOnTrainEnd
from medsynth.training.trainer import fit_steps, step_trainer

KIND = "mask_refiner"
SECTIONS = ("refiner", "training")


@dataclass
class MaskRefinerTrainingConfig:
    """Optimisation settings of ``refiner fit`` (the ``training`` section of ``configs/refiner/*.yaml``).

    Attributes:
        max_steps, batch_size, lr, weight_decay, seed, precision: as for the other ``fit`` commands.
        patch_size: the image-voxel region ``(X, Y, Z)`` (even) the refiner trains on per case and
            step, cut from the whole decoded volume; None: whole volumes.
        latent_noise: std of the noise added to each latent before decoding, as a fraction of
            the cache's latent std (0 = exact round trips only).
        ema_decay: of the exported weights.
    """

    max_steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    patch_size: tuple[int, int, int] | None = None
    latent_noise: float = 0.3
    ema_decay: float = 0.99
    precision: str = "32-true"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, bool) or int(self.max_steps) < 1:
            raise ConfigError(f"expects training.max_steps >= 1, but got {self.max_steps!r}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise ConfigError(f"expects training.batch_size >= 1, but got {self.batch_size!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"expects training.lr > 0, but got {self.lr!r}")
        if not 0.0 <= float(self.latent_noise) <= 1.0:
            raise ConfigError(f"expects training.latent_noise in [0, 1] (a fraction of the latent std), but got "
                              f"{self.latent_noise!r}")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ConfigError(f"expects training.ema_decay in [0, 1), but got {self.ema_decay!r}")
        if self.patch_size is not None:
            size = tuple(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,) * 3
            if len(size) != 3 or any(isinstance(s, bool) or int(s) < 2 for s in size):
                raise ConfigError(f"expects training.patch_size as 3 integers >= 2 (or null for whole volumes), but "
                                  f"got {self.patch_size!r}")
            self.patch_size = tuple(int(s) for s in size)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patch_size"] = None if self.patch_size is None else list(self.patch_size)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "MaskRefinerTrainingConfig":
        return config_from_dict(cls, dict(data or {}), "training")


class RefinerCases(Dataset):
    """The cache's train cases as ``{"latent": (L, x, y, z) unscaled, "label": (X, Y, Z) int64,
    "image": (1, X, Y, Z) float32 model range, "crop": (2, 3) int64}``: ``crop`` holds the start
    and size (image voxels) of the region the step trains on, drawn at random on every access
    when ``patch_size`` is given (even starts, so the refiner's halving lines up), else the whole
    volume. See :func:`crop_batch`."""

    def __init__(self, items: Sequence[Mapping[str, Tensor]], patch_size: Sequence[int] | None = None) -> None:
        self.items = list(items)
        self.patch = None if patch_size is None else tuple(int(p) for p in patch_size)
        if self.patch is not None and any(p % 2 for p in self.patch):
            raise ConfigError(f"expects training.patch_size to be even per axis (the refiner halves each axis "
                              f"once), but got {list(self.patch)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.items[index]
        shape = item["label"].shape
        size = list(shape) if self.patch is None else [min(p, s) for p, s in zip(self.patch, shape)]
        start = [2 * int(torch.randint(0, (s - c) // 2 + 1, ()).item()) for s, c in zip(shape, size)]
        return {**item, "crop": torch.tensor([start, size], dtype=torch.int64)}


def crop_batch(volumes: Tensor, crops: Tensor) -> Tensor:
    """Cut each sample's region out of ``volumes (B, ..., X, Y, Z)``: ``crops (B, 2, 3)`` holds
    start and size per sample (one size for the whole batch); returns ``(B, ..., x, y, z)``."""
    out = []
    for volume, (start, size) in zip(volumes, crops.tolist()):
        out.append(volume[(..., *(slice(a, a + n) for a, n in zip(start, size)))])
    return torch.stack(out)


def read_refiner_cases(cache_dir: str | Path, data_dir: str | Path | None, factor: int,
                       splits: Sequence[str] = ("train",)) -> tuple[list[dict[str, Tensor]], dict[str, int]]:
    """Cached latents and labels of ``splits`` paired with their real images (model range).

    Args:
        cache_dir: a ``medsynth encode`` cache of a labelled dataset.
        data_dir: the prepared dataset it was encoded from (default: the one the cache names).
        factor: the autoencoder's downsampling factor.

    Returns:
        ``(items, labels)``: one dict per case (see :class:`RefinerCases`) and the label table.

    Raises:
        InputError: no labelled cases in ``splits``, a case missing from the dataset, or an
            image whose grid is not ``factor`` x its latent grid.
    """
    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import load_case
    from medsynth.io.checkpoint import load_tensors
    from medsynth.pipelines.latent_cache import read_cache_header

    header = read_cache_header(cache_dir)
    source = Path(data_dir) if data_dir is not None else Path(str(header.get("data", "")))
    if not (source / "dataset.json").is_file():
        raise InputError(f"the dataset the cache was encoded from ({source}) is not there; give its prepared "
                         f"folder with --data", cache_dir)
    dataset = read_dataset(source)
    by_id = {c.case_id: c for c in dataset.cases}
    items = []
    for path in sorted((Path(cache_dir) / "latents").glob("*.safetensors")):
        tensors, meta = load_tensors(path)
        if meta.get("split") not in splits or "label" not in tensors:
            continue
        case_id = str(meta.get("case_id", path.stem))
        if case_id not in by_id:
            raise InputError(f"cached case {case_id!r} is not in the dataset {source}; give the dataset the cache "
                             f"was encoded from", cache_dir)
        _, array, _, _ = load_case(dataset, by_id[case_id], with_label=False)
        latent = tensors["latent"].float()
        if tuple(array.shape) != tuple(s * factor for s in latent.shape[1:]):
            raise InputError(f"case {case_id!r}: image grid {tuple(array.shape)} is not {factor} x its latent grid "
                             f"{tuple(latent.shape[1:])}; prepare the dataset with --multiple-of {factor} and "
                             f"encode it again", source)
        items.append({"latent": latent, "label": tensors["label"].long(),
                      "image": torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]})
    if not items:
        raise InputError(f"no cached latents with labels in splits {list(splits)}; run `medsynth encode` on a "
                         f"labelled dataset first", cache_dir)
    return items, {str(k): int(v) for k, v in dict(header.get("labels") or dataset.labels).items()}


def collate_refiner(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the cases of a batch (they must share one grid: prepare the dataset to one shape, or
    use batch size 1)."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"cannot batch cases of different grids {sorted(shapes)}; prepare the dataset to one "
                          f"shape or use batch_size 1")
    return {key: torch.stack([it[key] for it in items]) for key in ("latent", "label", "image", "crop")}


def decode_noisy(autoencoder: VQGAN, latent: Tensor, noise_std: float) -> Tensor:
    """Decode whole latents ``(B, L, x, y, z)`` after adding ``N(0, noise_std^2)``, tiled as the
    pipeline decodes: ``(B, 1, X, Y, Z)``."""
    from medsynth.models.tiling import decode_tiled

    with torch.no_grad():
        if noise_std > 0:
            latent = latent + noise_std * torch.randn_like(latent)
        return decode_tiled(autoencoder, latent, quantize=True)


class MaskRefinerModule(L.LightningModule):
    """Trains :class:`MaskRefiner3D` over a frozen autoencoder (see module docstring)."""

    def __init__(self, autoencoder: VQGAN, num_classes: int, refiner: Mapping[str, Any] | None = None,
                 training: Mapping[str, Any] | None = None, latent_std: float = 1.0,
                 metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["autoencoder"])
        self.cfg = MaskRefinerTrainingConfig.from_dict(training)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.model = MaskRefiner3D(MaskRefinerConfig.from_dict({**dict(refiner or {}), "num_classes": int(num_classes)}))
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.noise_std = float(self.cfg.latent_noise) * float(latent_std)
        self.metadata = dict(metadata or {})

    def train(self, mode: bool = True) -> "MaskRefinerModule":
        super().train(mode)
        self.autoencoder.eval()
        self.ema.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        crops = batch["crop"]
        decoded = crop_batch(decode_noisy(self.autoencoder, batch["latent"], self.noise_std), crops)  # (B, 1, x, y, z)
        label, image = crop_batch(batch["label"], crops), crop_batch(batch["image"], crops)
        refined = self.model(decoded, one_hot_mask(label, self.model.config.num_classes, dtype=decoded.dtype))
        loss = F.l1_loss(refined, image)
        b = decoded.shape[0]
        self.log("train/l1", loss, prog_bar=True, batch_size=b)
        self.log("train/l1_decoded", F.l1_loss(decoded, image), batch_size=b)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.cfg.ema_decay)

    def export(self, directory: str | Path) -> Path:
        metadata = {**self.metadata, "trained_steps": int(self.global_step), "training": self.cfg.to_dict()}
        return save_mask_refiner(directory, self.ema, metadata.pop("labels", {}), metadata)


@torch.no_grad()
def refinement_scores(autoencoder: VQGAN, refiner: MaskRefiner3D,
                      items: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
    """Mean absolute error and PSNR (peak-to-peak 2, the model range) of the decoded and of the
    refined images against the real ones, over ``items`` (exact latents, no noise)."""
    errors: dict[str, list[float]] = {"decoded": [], "refined": []}
    mse: dict[str, list[float]] = {"decoded": [], "refined": []}
    from medsynth.models.tiling import decode_tiled

    for item in items:
        decoded = decode_tiled(autoencoder, item["latent"][None], quantize=True)
        refined = refiner(decoded, one_hot_mask(item["label"][None], refiner.config.num_classes, decoded.dtype))
        for name, image in (("decoded", decoded), ("refined", refined)):
            diff = image[0] - item["image"]
            errors[name].append(float(diff.abs().mean()))
            mse[name].append(float((diff ** 2).mean()))
    out: dict[str, float] = {"cases": float(len(items))}
    for name in errors:
        out[f"{name}_mae"] = round(float(np.mean(errors[name])), 5)
        out[f"{name}_psnr_db"] = round(float(np.mean([10 * math.log10(4.0 / max(m, 1e-12)) for m in mse[name]])), 3)
    return out


def save_mask_refiner(directory: str | Path, model: MaskRefiner3D, labels: Mapping[str, int],
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Export ``config.json`` + ``model.safetensors`` (kind ``mask_refiner``); ``metadata`` should
    name the autoencoder (``autoencoder_sha256``) the refiner was trained behind."""
    config = {"model": model.config.to_dict(), "labels": dict(labels)}
    return save_export(directory, nn.ModuleDict({"refiner": model}), KIND, config, dict(metadata or {}))


def load_mask_refiner(directory: str | Path, device: torch.device | str = "cpu") -> tuple[MaskRefiner3D, Export]:
    """Load a refiner export (eval mode) and its record."""
    return load_wrapped_export(directory, KIND, lambda config: MaskRefiner3D(MaskRefinerConfig.from_dict(config)),
                               "refiner", "mask refiner", device)  # type: ignore[return-value]


def fit_mask_refiner(autoencoder_dir: str | Path, cache_dir: str | Path, out_dir: str | Path,
                     run_config: Mapping[str, Any], data_dir: str | Path | None = None,
                     accelerator: str = "auto", devices: int | str = "auto", max_steps: int | None = None,
                     resume: str | Path | None = None, num_nodes: int = 1, strategy: str = "auto") -> Path:
    """Train a refiner behind the autoencoder export ``autoencoder_dir`` on the cache's train split;
    returns ``out_dir/export`` (Lightning checkpoints in ``out_dir/checkpoints``).

    Raises:
        ConfigError: unknown config sections or bad values.
        InputError: the cache was encoded by another autoencoder, or its cases cannot be read.
    """
    from medsynth.io.checkpoint import load_autoencoder
    from medsynth.pipelines.latent_cache import read_cache_header

    unknown = sorted(set(run_config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the refiner config; valid sections are {list(SECTIONS)}")
    training = MaskRefinerTrainingConfig.from_dict(run_config.get("training"))
    if max_steps is not None:
        training.max_steps = int(max_steps)
    autoencoder, ae_export = load_autoencoder(autoencoder_dir)
    header = read_cache_header(cache_dir)
    if header.get("model_sha256") and header["model_sha256"] != ae_export.sha256:
        raise InputError(f"the cache was encoded by the autoencoder {str(header['model_sha256'])[:12]}..., not by "
                         f"{autoencoder_dir} ({ae_export.sha256[:12]}...); give the cache's own autoencoder",
                         cache_dir)
    factor = int(autoencoder.downsample_factor)
    L.seed_everything(training.seed, workers=True)
    items, labels = read_refiner_cases(cache_dir, data_dir, factor)
    latent_std = float(torch.cat([it["latent"].flatten() for it in items]).std())
    val_items = _val_items(cache_dir, data_dir, factor)
    module = MaskRefinerModule(autoencoder, max(labels.values()) + 1, dict(run_config.get("refiner") or {}),
                               training.to_dict(), latent_std,
                               {"labels": labels, "autoencoder": str(autoencoder_dir),
                                "autoencoder_sha256": ae_export.sha256, "latent_cache": str(cache_dir),
                                "latent_std": round(latent_std, 6)})
    out = Path(out_dir)
    trainer = step_trainer(out, training.max_steps, out / "checkpoints", [_ScoreThenExport(out / "export", val_items)],
                           accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                           precision=training.precision)
    fit_steps(trainer, module, RefinerCases(items, training.patch_size), training.batch_size,
              collate_refiner, resume=resume)
    return out / "export"


def _val_items(cache_dir: str | Path, data_dir: str | Path | None, factor: int) -> list[dict[str, Tensor]]:
    try:
        return read_refiner_cases(cache_dir, data_dir, factor, splits=("val",))[0]
    except InputError:
        return []  # a cache without a labelled val split: the export records no scores


class _ScoreThenExport(ExportOnTrainEnd):
    """Scores the EMA refiner on the val cases (see :func:`refinement_scores`), then exports."""

    def __init__(self, directory: str | Path, val_items: Sequence[Mapping[str, Tensor]]) -> None:
        super().__init__(directory)
        self.val_items = list(val_items)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero and self.val_items:
            ae = copy.deepcopy(pl_module.autoencoder).cpu().float()
            pl_module.metadata["val_scores"] = refinement_scores(ae, copy.deepcopy(pl_module.ema).cpu().float(),
                                                                 self.val_items)
        super().on_train_end(trainer, pl_module)


__all__ = ["MaskRefinerTrainingConfig", "MaskRefinerModule", "RefinerCases", "read_refiner_cases",
           "collate_refiner", "crop_batch", "decode_noisy", "refinement_scores", "save_mask_refiner", "load_mask_refiner",
           "fit_mask_refiner", "KIND", "SECTIONS"]
