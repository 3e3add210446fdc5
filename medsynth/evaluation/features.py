"""Feature extractors for the evaluation: what each number is computed from, and its cache.

Two kinds:

* ``2.5d`` extractors embed 2D slices: per volume they return ``{"xy": (S, D), "yz": ..., "zx": ...}``
  for the central slices of each plane (see :mod:`medsynth.evaluation.preprocessing`);
* ``3d`` extractors embed a whole volume: ``{"volume": (1, D)}``.

Available extractors:

* ``radimagenet_resnet50`` (2.5D, pretrained, local weights): MAISI's 2.5D FID features,
  2048-d spatial mean of the last ResNet-50 stage.
* ``medicalnet_resnet10`` / ``medicalnet_resnet50`` (3D, pretrained, local weights): 512-d /
  2048-d global average of the last stage.
* ``medsynth_random2d`` / ``medsynth_random3d`` (the weight-free default): fixed-seed random
  convolutional projections (:class:`~medsynth.evaluation.networks_random.RandomProjectionNet`),
  240-d. Deterministic by seed; their numbers are comparable **only within medsynth** (same
  extractor id), never with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.errors import ConfigError
from medsynth.evaluation.networks_2d import RadImageNetResNet50
from medsynth.evaluation.networks_3d import MedicalNetResNet
from medsynth.evaluation.networks_random import DEFAULT_SEED, DEFAULT_WIDTHS, RandomProjectionNet
from medsynth.evaluation.preprocessing import (PLANES, Protocol, normalise_slices, slice_stack,
                                               zscore_volume)
from medsynth.evaluation.weights import (KNOWN_WEIGHTS, VerifiedWeights, WeightsSpec, load_weights,
                                         verify_weights)
from medsynth.io.atomic import atomic_path

SLICE_BATCH = 32
DEFAULT_EXTRACTORS: tuple[str, ...] = ("medsynth_random2d", "medsynth_random3d")


class FeatureExtractor(ABC):
    """A frozen network plus how it is fed; see the module docstring for the output layout.

    Attributes:
        name: extractor name (``radimagenet_resnet50``, ``medsynth_random3d``, ...).
        kind: ``"2.5d"`` or ``"3d"``.
        weights: the verified weight file, or None for the weight-free default.
        comparable: what its numbers may be compared with (recorded in reports).
    """

    kind: str

    def __init__(self, name: str, network: nn.Module, weights: VerifiedWeights | None, comparable: str) -> None:
        self.name, self.network, self.weights, self.comparable = name, network.eval(), weights, comparable

    @property
    def identity(self) -> str:
        """A string that changes whenever the features could change (name, weights, seed)."""
        if self.weights is not None:
            return f"{self.name}@{self.weights.sha256}"
        net = self.network
        return f"{self.name}@seed{getattr(net, 'seed', '')}-widths{list(getattr(net, 'widths', ()))}"

    def record(self) -> dict[str, Any]:
        """The reproducibility record of this extractor."""
        return {"name": self.name, "kind": self.kind, "identity": self.identity,
                "weights_path": None if self.weights is None else str(self.weights.path),
                "weights_sha256": None if self.weights is None else self.weights.sha256,
                "weights_verified": None if self.weights is None else self.weights.verified,
                "feature_dim": int(getattr(self.network, "feature_dim", 0)),
                "comparable": self.comparable}

    @abstractmethod
    def extract(self, prepared: np.ndarray, protocol: Protocol) -> dict[str, np.ndarray]:
        """Features of one prepared ``(X, Y, Z)`` volume (float64 arrays, see module doc)."""


def _spatial_mean(out: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)``; already-pooled ``(B, C)`` passes through."""
    return out if out.ndim == 2 else out.mean(dim=tuple(range(2, out.ndim)))


class SliceExtractor(FeatureExtractor):
    """2.5D: central slices of each plane through a 2D network, spatial mean -> ``(S, D)``."""

    kind = "2.5d"

    @torch.no_grad()
    def extract(self, prepared: np.ndarray, protocol: Protocol) -> dict[str, np.ndarray]:
        out = {}
        for plane in PLANES:
            slices = normalise_slices(slice_stack(prepared, plane, protocol.center_ratio), protocol.channel_means)
            rows = [_spatial_mean(self.network(slices[i:i + SLICE_BATCH])) for i in range(0, len(slices), SLICE_BATCH)]
            out[plane] = torch.cat(rows).double().numpy()
        return out


class VolumeExtractor(FeatureExtractor):
    """3D: z-scored volume through a 3D network, global mean -> ``(1, D)``."""

    kind = "3d"

    @torch.no_grad()
    def extract(self, prepared: np.ndarray, protocol: Protocol) -> dict[str, np.ndarray]:
        return {"volume": _spatial_mean(self.network(zscore_volume(prepared))).double().numpy()}


RANDOM_NOTE = ("random-projection features (fixed-seed random conv net, no pretrained weights); "
               "deterministic by seed; comparable only within medsynth reports using the same extractor id")


def build_extractor(name: str, spec: WeightsSpec | None = None) -> FeatureExtractor:
    """Build an extractor by name; pretrained ones need a :class:`WeightsSpec` (local file).

    Raises:
        ConfigError: unknown name, or a pretrained extractor without weights.
        InputError: missing / wrong weight file (see :func:`~medsynth.evaluation.weights.verify_weights`).
    """
    if name == "medsynth_random2d":
        return SliceExtractor(name, RandomProjectionNet(2, in_channels=3, widths=DEFAULT_WIDTHS, seed=DEFAULT_SEED),
                              None, RANDOM_NOTE)
    if name == "medsynth_random3d":
        return VolumeExtractor(name, RandomProjectionNet(3, in_channels=1, widths=DEFAULT_WIDTHS, seed=DEFAULT_SEED),
                               None, RANDOM_NOTE)
    if name not in KNOWN_WEIGHTS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose from "
                          f"{sorted((*DEFAULT_EXTRACTORS, *KNOWN_WEIGHTS))}")
    if spec is None:
        raise ConfigError(f"{name} needs local weights: --features {name}=PATH[:SHA256]")
    verified = verify_weights(spec)
    if name == "radimagenet_resnet50":
        return SliceExtractor(name, load_weights(RadImageNetResNet50(), verified), verified,
                              "published 2.5D FIDs computed with the same weights and protocol (e.g. MAISI)")
    depth = 10 if name.endswith("10") else 50
    return VolumeExtractor(name, load_weights(MedicalNetResNet(depth), verified), verified,
                           "3D FIDs computed with the same MedicalNet weights, spacing and crop")


@dataclass
class FeatureCache:
    """Per-case feature cache: ``root/<protocol+case hash>.npz``, one entry per image file.

    The key hashes the image file's bytes, the modality and the protocol, so any change to the
    file or the settings misses the cache; inside an entry each extractor's arrays are stored
    under ``<identity>/<plane>``, so adding an extractor keeps the others.
    """

    root: Path | None

    @staticmethod
    def key(file_sha256: str, modality: str | None, protocol: Protocol) -> str:
        text = json.dumps({"file": file_sha256, "modality": modality, "protocol": protocol.to_dict()},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def load(self, key: str) -> dict[str, np.ndarray]:
        if self.root is None or not (self.root / f"{key}.npz").is_file():
            return {}
        try:
            with np.load(self.root / f"{key}.npz") as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):  # a corrupt entry is recomputed, never trusted
            return {}

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        with atomic_path(self.root / f"{key}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
