"""Pretrained feature-network weights: local files only, sha256-checked, loaded with weights_only.

Nothing here downloads. A user passes ``--features NAME=PATH[:SHA256]``:

* if ``SHA256`` is given, the file's hash must equal it;
* else if :data:`KNOWN_WEIGHTS` has a hash for ``NAME``, the file's hash must equal that;
* else (hash unknown to medsynth and not given) the file is refused: nothing unverified ever
  produces a reported number. The error prints the file's sha256 so the user can compare it
  with the one the weights' publisher states, and pin it.

A mismatch is refused with an error naming the file, both hashes and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medsynth.errors import ConfigError, InputError

log = logging.getLogger(__name__)

KNOWN_WEIGHTS: dict[str, str | None] = {
    # Official hashes are not pinned yet (None = unknown): until they are, the user must pass
    # NAME=PATH:SHA256 (checked against the publisher's value); an unpinned file is refused.
    "radimagenet_resnet50": None,   # Warvito/radimagenet-models conversion (Keras layout)
    "medicalnet_resnet10": None,    # Tencent MedicalNet resnet_10_23dataset.pth
    "medicalnet_resnet50": None,    # Tencent MedicalNet resnet_50_23dataset.pth
}
"""Pretrained extractor name -> sha256 of its weight file (None: not known to medsynth)."""

# Keys of heads the protocol drops (MedicalNet's segmentation decoder, classifier heads).
HEAD_PREFIXES: tuple[str, ...] = ("conv_seg.", "fc.", "classifier.")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class WeightsSpec:
    """A ``NAME=PATH[:SHA256]`` request from the command line.

    Attributes:
        name: extractor name, a key of :data:`KNOWN_WEIGHTS`.
        path: the local weight file.
        sha256: the hash the user pinned, or None.
    """

    name: str
    path: Path
    sha256: str | None = None


def parse_weights_spec(text: str) -> WeightsSpec:
    """Parse ``NAME=PATH`` or ``NAME=PATH:SHA256`` (ConfigError naming the text otherwise)."""
    if "=" not in text:
        raise ConfigError(f"--features expects NAME=PATH[:SHA256] with NAME one of {sorted(KNOWN_WEIGHTS)}, "
                          f"got {text!r}")
    name, rest = text.split("=", 1)
    name = name.strip()
    if name not in KNOWN_WEIGHTS:
        raise ConfigError(f"unknown feature extractor {name!r}; pretrained extractors are "
                          f"{sorted(KNOWN_WEIGHTS)} (the weight-free default needs no --features)")
    sha = None
    head, sep, tail = rest.rpartition(":")
    if sep and _SHA256.match(tail):
        rest, sha = head, tail.lower()
    if not rest:
        raise ConfigError(f"--features {text!r}: the weight file path is empty")
    return WeightsSpec(name=name, path=Path(rest).expanduser(), sha256=sha)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class VerifiedWeights:
    """A weight file whose hash was computed and, where possible, checked.

    Attributes:
        name, path: as requested.
        sha256: the file's actual hash (always recorded).
        verified: True when it matched a pinned or known hash; False when nothing to check against.
        expected_from: "user", "known" or None.
    """

    name: str
    path: Path
    sha256: str
    verified: bool
    expected_from: str | None


def verify_weights(spec: WeightsSpec, known: Mapping[str, str | None] = KNOWN_WEIGHTS) -> VerifiedWeights:
    """Hash ``spec.path`` and check it against the pinned or known hash.

    Raises:
        InputError: the file is missing or its hash differs from the expected one.
    """
    path = spec.path
    if not path.is_file():
        raise InputError(f"weights for {spec.name!r} not found; pass an existing local file as "
                         f"--features {spec.name}=PATH[:SHA256] (medsynth never downloads weights)", path)
    actual = sha256_file(path)
    expected, source = (spec.sha256, "user") if spec.sha256 else (known.get(spec.name), "known")
    if expected is None:
        raise InputError(f"refusing unverified weights for {spec.name!r}: medsynth knows no sha256 for this "
                         f"extractor and none was pinned; this file's sha256 is {actual}. Compare it with the "
                         f"value its publisher states, then pass --features {spec.name}=PATH:{actual}", path)
    if actual != expected.lower():
        what = "the sha256 you pinned" if source == "user" else f"the known sha256 of {spec.name}"
        raise InputError(f"wrong weight file for {spec.name!r}: sha256 {actual} does not match {what} "
                         f"{expected.lower()}; use the original release file", path)
    return VerifiedWeights(spec.name, path, actual, verified=True, expected_from=source)


def extract_state_dict(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """The parameter dict inside a checkpoint: unwraps ``{"state_dict": ...}`` and ``module.`` prefixes."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("not a state_dict: expected a mapping of parameter names to tensors "
                         "(optionally under 'state_dict')", source)
    state = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DataParallel
        if not key.startswith(HEAD_PREFIXES):
            state[key] = value
    return state


def load_weights(model: nn.Module, weights: VerifiedWeights) -> nn.Module:
    """Load a verified file into ``model`` strictly (``torch.load(weights_only=True)``).

    Raises:
        InputError: unreadable file, or keys/shapes that do not match the architecture (the
            message lists the first missing and unexpected keys).
    """
    try:
        obj = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors have many types; all mean "not a torch weight file"
        raise InputError(f"cannot load weights for {weights.name!r} with torch.load(weights_only=True): "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", weights.path) from err
    state = extract_state_dict(obj, weights.path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(f"weights do not fit the {weights.name} architecture: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})",
                         weights.path)
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise InputError(f"weights do not fit the {weights.name} architecture: shape mismatch {wrong[:3]}",
                         weights.path)
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent in old files
    return model.eval()
