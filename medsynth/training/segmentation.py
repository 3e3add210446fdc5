"""The downstream segmenter of the segmentation benchmark: data, Lightning module, inference.

Every benchmark condition (real only, real + synthetic, synthetic only) trains the *same* MONAI
network with the *same* budget of optimiser steps (not epochs: an epoch over a set that is 2.5x
larger would be 2.5x more updates, so "more data" would silently mean "more training"). Each
step draws ``batch_size`` cases uniformly from the pooled training cases and one random patch of
``patch^3`` voxels from each (volumes smaller than the patch are padded first). The weights after
the last step are the model; there is no checkpoint selection on validation data, which keeps
all conditions on equal footing. Inference is MONAI sliding-window over the whole volume.

Research code (network, loss, optimiser) is in :class:`SegmentationModule`; devices, precision
and DDP belong to the Lightning Trainer built in :func:`train_segmenter`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet, SwinUNETR, UNet
from monai.transforms import (ClassesToIndicesd, Compose, RandAdjustContrastd, RandAffined, RandCropByLabelClassesd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
                              RandSpatialCropd, SpatialPadd)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medsynth.errors import ConfigError

NETWORKS: tuple[str, ...] = ("segresnet", "unet", "swinunetr")
LR_SCHEDULES: tuple[str, ...] = ("constant", "poly")
AUGMENTATIONS: tuple[str, ...] = ("none", "standard")
# nnU-Net's polynomial decay: lr * (1 - step / steps) ** 0.9
POLY_EXPONENT = 0.9


@dataclass(frozen=True)
class SegmenterConfig:
    """Settings shared by every condition of one benchmark run.

    Attributes:
        network: "segresnet" (default, MONAI's strong 3D baseline), "unet" or "swinunetr".
        patch: edge of the cubic training / sliding-window patch in voxels. 32 fits a CPU smoke
            run; 96-128 is usual on GPUs. SwinUNETR needs a multiple of 32, at least 64.
        steps: optimiser steps per training run, the same for every condition.
        batch_size: patches per step.
        lr: AdamW learning rate; 1e-3 converges within a few hundred steps on phantoms and is
            a common SegResNet / UNet setting with AdamW.
        accelerator, devices: passed to the Lightning Trainer ("cpu", "gpu", "auto"; 1, 2, ...).
        precision: Trainer precision; "32-true" on CPU, "bf16-mixed" is fine on recent GPUs.
        foreground_oversampling: share of patches centred on a voxel of one foreground class,
            drawn uniformly among the classes present in the case (nnU-Net centres one patch in
            three on foreground). 0 (default) keeps uniform random crops, the benchmark's
            protocol. Matters only when the volume is larger than the patch: a lesion that fills
            0.1 % of a 64^3 volume is in few 32^3 random crops.
        lr_schedule: "constant" (default, the benchmark's protocol) or "poly", nnU-Net's decay
            ``lr * (1 - step / steps) ** 0.9`` to 0 at the last step. At a high constant rate the
            weights of the last step are one noisy point of the trajectory, so a longer run can
            end worse than a shorter one; the decay lets it settle.
        augmentation: "none" (default, the benchmark's protocol) or "standard": each patch is
            randomly rotated (up to 15 degrees per axis), scaled (+/- 15 %), blurred, given noise,
            and changed in brightness, contrast and gamma (:func:`standard_augmentation`). No
            flips: left and right organs are separate classes. Without it, a 32^3 SegResNet
            trained 8000 steps on the 112 training phantoms of a 160-case CT demo scores its
            training cases 0.95-0.97 and held-out ones 0.71-0.87 (spleen lowest).
    """

    network: str = "segresnet"
    patch: int = 32
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-3
    accelerator: str = "auto"
    devices: int | str = "auto"
    precision: str = "32-true"
    foreground_oversampling: float = 0.0
    lr_schedule: str = "constant"
    augmentation: str = "none"

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ConfigError(f"--network must be one of {list(NETWORKS)}, got {self.network!r}")
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 16 or self.patch % 8:
            raise ConfigError(f"--patch must be an integer >= 16 and a multiple of 8 (three 2x downsamplings), "
                              f"got {self.patch!r}")
        if self.network == "swinunetr" and (self.patch % 32 or self.patch < 64):
            # Five 2x stages: 32 divides the patch; at 32 the bottleneck is 1 voxel, which
            # instance norm cannot normalise, so 64 is the smallest usable patch.
            raise ConfigError(f"--network swinunetr needs --patch a multiple of 32 and >= 64, got {self.patch}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {self.augmentation!r}")
        if not 0.0 <= self.foreground_oversampling <= 1.0:
            raise ConfigError(f"foreground_oversampling must be between 0 and 1 (a share of patches), "
                              f"got {self.foreground_oversampling}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_network(name: str, num_classes: int) -> nn.Module:
    """A 3D MONAI segmentation network: ``(B, 1, X, Y, Z)`` image -> ``(B, C, X, Y, Z)`` logits.

    Args:
        name: one of :data:`NETWORKS`.
        num_classes: output channels ``C``, background included.
    """
    if name == "segresnet":
        # MONAI's defaults (init_filters=8, blocks (1, 2, 2, 4)): small enough for CPU smoke runs.
        return SegResNet(spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=8)
    if name == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=2, norm="instance")
    if name == "swinunetr":
        return SwinUNETR(in_channels=1, out_channels=num_classes, feature_size=24, spatial_dims=3)
    raise ConfigError(f"network must be one of {list(NETWORKS)}, got {name!r}")


@dataclass
class SegCase:
    """One training or test case, already normalised and on the benchmark's label table.

    Attributes:
        case_id: the case id in its dataset.
        source: "real" or "synthetic".
        image: ``(X, Y, Z)`` float32 in the model range (about ``[-1, 1]``).
        label: ``(X, Y, Z)`` int64 values of the real dataset's label table.
        spacing: voxel size in mm ``(sx, sy, sz)``, used by HD95 / NSD.
    """

    case_id: str
    source: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def standard_augmentation(seed: int) -> Compose:
    """nnU-Net-like patch augmentation without mirroring, seeded by ``seed``.

    Works on a dict with ``image`` ``(1, P, P, P)`` in the model range (about ``[-1, 1]``) and
    ``label`` ``(1, P, P, P)``; the label is resampled nearest, so it stays a label map. The
    probabilities and ranges follow nnU-Net's defaults, scaled to the model range (noise sd 0.02
    is 20 HU under the CT window), with no mirroring because left and right organs are separate
    classes and no elastic deformation, which costs more than the step itself on a CPU.
    """
    keys = ("image", "label")
    transforms = Compose([
        RandAffined(keys=keys, prob=0.3, rotate_range=(np.pi / 12,) * 3, scale_range=(0.15,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandGaussianNoised(keys="image", prob=0.15, mean=0.0, std=0.02),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", factors=0.15, prob=0.15),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.15),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.15),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


class PatchDataset(Dataset):
    """``steps * batch_size`` random patches from uniformly drawn cases.

    Item ``i`` is a dict with ``image`` ``(1, P, P, P)`` float32 and ``label`` ``(1, P, P, P)``
    int64. The case sequence, the crop kinds and the crop positions depend only on ``seed``, so a
    condition trained twice with one seed sees the same patches (single-process loading).
    With ``foreground_oversampling`` f > 0, a share f of the patches is centred on a voxel of a
    foreground class chosen uniformly among those present in the case (MONAI
    ``RandCropByLabelClassesd``; ``num_classes`` classes, background never chosen); cases without
    foreground fall back to a random crop. With ``augmentation="standard"`` each patch is then
    augmented (:func:`standard_augmentation`, its own random stream, so the crops stay the same).
    """

    def __init__(self, cases: Sequence[SegCase], patch: int, length: int, seed: int,
                 foreground_oversampling: float = 0.0, num_classes: int | None = None,
                 augmentation: str = "none") -> None:
        if not cases:
            raise ConfigError("a training condition has no cases")
        if foreground_oversampling > 0 and (num_classes is None or num_classes < 2):
            raise ConfigError(f"foreground oversampling needs num_classes >= 2 (background + one class), "
                              f"got {num_classes}")
        if augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
        self.cases = list(cases)
        self.length = int(length)
        rng = np.random.default_rng(seed)
        self.order = rng.integers(0, len(self.cases), self.length)
        self.centred = rng.random(self.length) < foreground_oversampling
        keys = ("image", "label")
        # Pad first so every volume holds a full patch: small phantoms and thin slabs still train.
        self.pad = SpatialPadd(keys=keys, spatial_size=(patch,) * 3)
        # Compose seeds its crop from ``seed`` as before oversampling existed: same patches at f = 0.
        self.random_crop = Compose([self.pad, RandSpatialCropd(keys=keys, roi_size=(patch,) * 3, random_size=False)])
        self.random_crop.set_random_state(seed=seed)
        self.class_crop = None
        self.has_foreground = [bool((c.label > 0).any()) for c in self.cases]
        # Voxel indices of every class per case, found once on first use: MONAI would otherwise
        # scan the whole label map again for every centred patch.
        self.class_indices: dict[int, dict[str, Any]] = {}
        if foreground_oversampling > 0:
            self.find_classes = ClassesToIndicesd(keys="label", num_classes=num_classes)
            self.class_crop = RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=(patch,) * 3,
                                                      ratios=[0] + [1] * (num_classes - 1), num_classes=num_classes,
                                                      num_samples=1, indices_key="label_cls_indices", warn=False)
            self.class_crop.set_random_state(seed=seed + 1)
        self.augment = standard_augmentation(seed + 2) if augmentation == "standard" else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        case_index = int(self.order[index])
        case = self.cases[case_index]
        item = {"image": torch.from_numpy(case.image[None]), "label": torch.from_numpy(case.label[None])}
        if self.class_crop is not None and self.centred[index] and self.has_foreground[case_index]:
            item = self.pad(item)
            if case_index not in self.class_indices:
                self.class_indices[case_index] = self.find_classes({"label": item["label"]})["label_cls_indices"]
            item = self.class_crop({**item, "label_cls_indices": self.class_indices[case_index]})[0]
        else:
            item = self.random_crop(item)
        if self.augment is not None:
            item = self.augment({"image": item["image"], "label": item["label"]})
        return {"image": torch.as_tensor(item["image"]).float(), "label": torch.as_tensor(item["label"]).long()}


class SegmentationModule(L.LightningModule):
    """A MONAI network trained with Dice + cross-entropy (MONAI ``DiceCELoss``) and AdamW, at a
    constant rate or with nnU-Net's polynomial decay over ``total_steps`` (``lr_schedule="poly"``)."""

    def __init__(self, network: str, num_classes: int, lr: float, lr_schedule: str = "constant",
                 total_steps: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(network, num_classes)
        # softmax + one-hot target: the multi-class Dice of nnU-Net-style training; CE keeps
        # gradients alive for classes absent from a patch.
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, X, Y, Z)`` -> ``(B, C, X, Y, Z)`` logits."""
        return self.net(image)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=False, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-5)
        schedule = self.hparams.get("lr_schedule", "constant")
        if schedule == "constant":
            return optimizer
        if schedule != "poly" or not self.hparams.get("total_steps"):
            raise ConfigError(f"lr_schedule {schedule!r} needs to be 'poly' with total_steps >= 1 "
                              f"(got total_steps={self.hparams.get('total_steps')!r}), or 'constant'")
        total = int(self.hparams.total_steps)
        decay = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1.0 - min(step, total) / total) ** POLY_EXPONENT)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def train_segmenter(cases: Sequence[SegCase], num_classes: int, config: SegmenterConfig, seed: int) -> SegmentationModule:
    """Train one segmenter for exactly ``config.steps`` optimiser steps.

    Args:
        cases: the pooled training cases of one condition (real and/or synthetic).
        num_classes: classes of the real label table, background included.
        config: network, patch, steps, devices.
        seed: seeds the weights, the case order and the crops.

    Returns:
        The trained module in eval mode (on the CPU when training used another device).
    """
    L.seed_everything(seed, workers=True, verbose=False)
    module = SegmentationModule(config.network, num_classes, config.lr, config.lr_schedule, config.steps)
    data = PatchDataset(cases, config.patch, config.steps * config.batch_size, seed,
                        config.foreground_oversampling, num_classes, config.augmentation)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=False, num_workers=0, drop_last=True)
    # One Trainer per condition and seed: its start-up banner (devices, tips) would repeat
    # dozens of times, so Lightning's info lines are muted for the run.
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    trainer = L.Trainer(max_steps=config.steps, max_epochs=-1, accelerator=config.accelerator,
                        devices=config.devices, precision=config.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=False)
    try:
        trainer.fit(module, loader)
    finally:
        quiet.setLevel(level)
    if trainer.global_step != config.steps:  # the budget is the protocol: never report a shorter run
        raise ConfigError(f"training stopped after {trainer.global_step} of {config.steps} steps")
    return module.cpu().eval()


@torch.no_grad()
def predict_volume(module: SegmentationModule, image: np.ndarray, patch: int, device: str | torch.device = "cpu",
                   sw_batch_size: int = 4) -> np.ndarray:
    """Sliding-window segmentation of one normalised ``(X, Y, Z)`` image -> ``(X, Y, Z)`` int64 labels.

    Windows of ``patch^3`` overlap by half and are blended with Gaussian weights; volumes smaller
    than the patch are padded by MONAI and cropped back.
    """
    module = module.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    logits = sliding_window_inference(x, (patch,) * 3, sw_batch_size, module, overlap=0.5, mode="gaussian")
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The agreement segmenter of the quality checks: trained on real data, stored with a pipeline
# ---------------------------------------------------------------------------------------------

SEGMENTER_KIND = "segmenter"
# The agreement segmenter is trained at assemble time on a budget of a few hundred steps. With
# AdamW at 1e-3 a SegResNet has not yet separated background from body after 80 steps on one
# phantom (Dice 0.1); at 1e-2 it reaches 0.98 after 40 (measured, 16^3, CPU), and stays stable.
AGREEMENT_LR = 1e-2


@dataclass
class TrainedSegmenter:
    """A trained MONAI segmenter behind the ``predict(image) -> label`` interface of the quality
    gate and of mask fidelity (:class:`medsynth.evaluation.mask_fidelity.Segmenter`).

    Attributes:
        module: the trained network (eval mode).
        intensity: the mapping from the images' units (HU / normalised output units) to the
            model range the network was trained in (``forward``).
        patch: sliding-window edge in voxels.
        labels: name -> value of the network's output channels (channel ``c`` predicts the
            class whose value is ``c``).
        steps: optimiser steps it was trained for (recorded).
    """

    module: SegmentationModule
    intensity: Any
    patch: int
    labels: dict[str, int]
    steps: int
    device: str = "cpu"
    name: str = "SegResNet trained on the real training split"

    def predict(self, image: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` image in output units -> ``(X, Y, Z)`` int64 label values."""
        normalised = np.asarray(self.intensity.forward(np.asarray(image, dtype=np.float32)), dtype=np.float32)
        return predict_volume(self.module, normalised, self.patch, self.device)


def fit_agreement_segmenter(cases: Sequence[tuple[np.ndarray, np.ndarray]], labels: dict[str, int],
                            intensity: Any, steps: int, patch: int = 32, seed: int = 0,
                            accelerator: str = "auto", lr: float = AGREEMENT_LR,
                            foreground_oversampling: float = 0.0, lr_schedule: str = "constant",
                            augmentation: str = "none") -> TrainedSegmenter:
    """Train the quality checks' segmenter on real ``(image, label)`` training pairs.

    Args:
        cases: ``(X, Y, Z)`` images in the model range (about ``[-1, 1]``) and integer label
            maps whose values are ``labels``' values (background 0).
        labels: name -> value; the network predicts ``max(value) + 1`` channels.
        intensity: the output-units -> model-range mapping applied before :meth:`predict`.
        steps, patch, seed: SegResNet budget (see :class:`SegmenterConfig`).
        lr: AdamW learning rate; see :data:`AGREEMENT_LR`.
        foreground_oversampling: share of patches centred on foreground (see
            :class:`SegmenterConfig`); for volumes larger than ``patch`` with rare classes.
        lr_schedule: "constant" or "poly" (see :class:`SegmenterConfig`).
        augmentation: "none" or "standard" (see :class:`SegmenterConfig`).

    Raises:
        ConfigError: no cases, bad budget.
    """
    if not cases:
        raise ConfigError("the agreement segmenter needs labelled real training cases; none were given")
    config = SegmenterConfig(network="segresnet", patch=patch, steps=steps, accelerator=accelerator, devices=1,
                             lr=lr, foreground_oversampling=foreground_oversampling, lr_schedule=lr_schedule,
                             augmentation=augmentation)
    seg_cases = [SegCase(f"case_{i}", "real", np.asarray(img, np.float32), np.asarray(lab, np.int64), (1.0, 1.0, 1.0))
                 for i, (img, lab) in enumerate(cases)]
    num_classes = max(int(v) for v in labels.values()) + 1
    module = train_segmenter(seg_cases, num_classes, config, seed)
    return TrainedSegmenter(module, intensity, patch, dict(labels), steps)


def save_agreement_segmenter(directory: Any, segmenter: TrainedSegmenter) -> None:
    """Export ``segmenter`` (``config.json`` + ``model.safetensors``) to ``directory``."""
    from medsynth.io.checkpoint import save_export

    num_classes = max(segmenter.labels.values()) + 1
    save_export(directory, segmenter.module.net, SEGMENTER_KIND,
                {"network": "segresnet", "num_classes": num_classes, "patch": segmenter.patch,
                 "labels": segmenter.labels, "intensity": segmenter.intensity.to_dict()},
                {"steps": segmenter.steps, "trained_on": "real training split"})


def load_agreement_segmenter(directory: Any, device: str = "cpu") -> TrainedSegmenter:
    """Load an export written by :func:`save_agreement_segmenter`.

    Raises:
        InputError: missing/corrupt files or weights of another shape.
    """
    from medsynth.data.transforms import IntensityMapping
    from medsynth.io.checkpoint import load_state_strict, read_export

    export = read_export(directory, kind=SEGMENTER_KIND)
    config = export.config
    module = SegmentationModule(str(config["network"]), int(config["num_classes"]), 1e-3)
    load_state_strict(module.net, export.state_dict, export.path)
    return TrainedSegmenter(module.eval(), IntensityMapping.from_dict(config["intensity"]), int(config["patch"]),
                            {str(k): int(v) for k, v in dict(config["labels"]).items()},
                            int(export.metadata.get("steps", 0)), device)
