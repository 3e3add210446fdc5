"""Model exports without Lightning: ``config.json`` + ``model.safetensors`` in one folder.

An export folder is what every later stage loads (``--model DIR``). ``config.json`` records the
model kind, its config dict and what the model was trained for (modality, spacing, intensity
mapping, ...); ``model.safetensors`` holds the weights (no pickle, so loading a file from
someone else cannot run code). Both files are written atomically; a folder that cannot be
trusted (missing file, bad JSON, truncated weights, keys or shapes that do not match the
config) raises :class:`~medsynth.errors.InputError` naming the file and the problem.

Also here: reading a Lightning training checkpoint (to see which run wrote it before resuming),
and loading a user's local feature network for the optional perceptual loss, checked
against the sha256 the user gives, since nothing in medsynth downloads weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import atomic_path, write_json_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class Export:
    """What an export folder holds.

    Attributes:
        kind: model kind, e.g. "vqgan".
        config: the model config as a dict.
        state_dict: weights (CPU tensors).
        metadata: what the model was trained for (free-form, JSON-friendly).
        sha256: hash of ``model.safetensors`` (recorded in provenance by later stages).
        path: the folder.
    """

    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    path: Path | None = None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_export(directory: str | Path, model: nn.Module, kind: str, config: dict[str, Any],
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and config to ``directory`` (created if needed).

    Weights go first and ``config.json`` last, so a folder with a ``config.json`` is complete.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "medsynth", "kind": kind})
    record = {"format": "medsynth", "format_version": FORMAT_VERSION, "kind": kind,
              "config": config, "metadata": metadata or {},
              "weights_sha256": file_sha256(directory / WEIGHTS_FILE)}
    write_json_atomic(directory / CONFIG_FILE, record)
    return directory


def read_export(directory: str | Path, kind: str | None = None) -> Export:
    """Read an export folder written by :func:`save_export`.

    Raises:
        InputError: missing/corrupt files, a different model kind, or a hash mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise InputError("model folder does not exist; expected a folder with config.json and "
                         "model.safetensors (the export of `medsynth autoencoder fit`)", directory)
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(f"missing {p.name}; a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}", directory)
    try:
        record = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err.__class__.__name__}: {err}); re-export the model", cfg_path) from None
    if not isinstance(record, dict) or record.get("format") != "medsynth" or "config" not in record:
        raise InputError("not a medsynth model config (needs \"format\": \"medsynth\", \"kind\" and "
                         "\"config\")", cfg_path)
    if kind is not None and record.get("kind") != kind:
        raise InputError(f"holds a {record.get('kind')!r} model, but a {kind!r} model is needed", cfg_path)
    digest = file_sha256(w_path)
    expected = record.get("weights_sha256")
    if expected and expected != digest:
        raise InputError(f"weights sha256 {digest[:12]}... does not match the {expected[:12]}... recorded "
                         f"in {CONFIG_FILE}; the file is corrupt or was replaced", w_path)
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"cannot read weights ({err}); the file is truncated or not safetensors", w_path) from None
    return Export(kind=str(record.get("kind")), config=dict(record["config"]), state_dict=state,
                  metadata=dict(record.get("metadata") or {}), sha256=digest, path=directory)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path | None) -> None:
    """``model.load_state_dict(state)`` with an InputError naming missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:2]}")
        raise InputError("weights do not match config.json (" + "; ".join(parts) + ")", source)
    model.load_state_dict(state)


def load_wrapped_export(directory: str | Path, kind: str, build: Callable[[dict[str, Any]], nn.Module],
                        key: str, what: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Export]:
    """Load an export whose weights sit under ``key`` of a ``ModuleDict`` (ControlNet, mask
    refiner): ``build(config["model"])`` makes the model, which is returned in eval mode on
    ``device`` with its record.

    Raises:
        InputError: a broken export, another kind, or a ``model`` config ``build`` refuses
            (``what`` names the model in the message).
    """
    export = read_export(directory, kind=kind)
    try:
        model = build(export.config["model"])
    except (KeyError, TypeError, ConfigError) as err:
        raise InputError(f"invalid {what} config ({err}); re-export the model", Path(directory) / CONFIG_FILE) from None
    load_state_strict(nn.ModuleDict({key: model}), export.state_dict, Path(directory) / WEIGHTS_FILE)
    return model.to(device).eval(), export


def save_autoencoder(directory: str | Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Export a :class:`~medsynth.models.vqgan.VQGAN` (its ``config`` is stored as config.json)."""
    return save_export(directory, model, "vqgan", model.config.to_dict(), metadata)


def load_autoencoder(directory: str | Path, device: torch.device | str = "cpu"):
    """Load an autoencoder export: returns ``(VQGAN in eval mode on device, Export)``."""
    from medsynth.models.autoencoder_config import VQGANConfig
    from medsynth.models.vqgan import VQGAN

    export = read_export(directory, kind="vqgan")
    try:
        config = VQGANConfig.from_dict(export.config)
    except (ConfigError, TypeError) as err:
        raise InputError(f"invalid model config: {err}", Path(directory) / CONFIG_FILE) from None
    model = VQGAN(config)
    load_state_strict(model, export.state_dict, Path(directory) / WEIGHTS_FILE)
    return model.to(device).eval(), export


def load_feature_network(path: str | Path, sha256: str) -> nn.Module:
    """Load a local TorchScript (``.pt``) or torch.export (``.pt2``) feature network for the
    perceptual loss, after checking its hash.

    The network maps ``(B, 1, X, Y, Z)`` to a feature tensor or a list/tuple of them (e.g. a
    MedicalNet ResNet exported with ``torch.jit.script``). Nothing is downloaded.

    Raises:
        ConfigError: missing file, sha256 mismatch, or not a TorchScript archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"perceptual feature network {path} does not exist; give a local TorchScript file "
                          f"(medsynth never downloads weights)")
    digest = file_sha256(path)
    if digest != str(sha256).lower():
        raise ConfigError(f"perceptual feature network {path} has sha256 {digest}, but the config expects "
                          f"{sha256}; refusing to use unverified weights")
    try:
        if path.suffix == ".pt2":  # torch.export archive
            return torch.export.load(str(path)).module()
        net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"perceptual feature network {path} is not a TorchScript (.pt) or torch.export "
                          f"(.pt2) archive ({str(err).splitlines()[0]})") from None
    return net.eval()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write named tensors (+ a JSON metadata record) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"medsynth": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_tensors`; InputError naming the file when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {}).get("medsynth", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"cannot read tensors ({err}); delete the file and rerun to rewrite it", path) from None
    return tensors, meta


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict of a Lightning ``.ckpt`` file (on the CPU), to inspect before resuming from it.

    ``weights_only=False``: a Lightning checkpoint holds hyper-parameters and loop state, not only
    tensors; it is the user's own run file, which Lightning itself loads the same way.

    Raises:
        ConfigError: the file cannot be read as a checkpoint (one line naming the file and why).
    """
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as err:  # any unreadable file gets the same one-line answer
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--resume {path} is not a readable Lightning checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"--resume {path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint
