"""Sliding-window (tiled) encode and decode of whole volumes of any size.

Peak activation memory depends on the window, not on the volume: the network only ever sees one
window (or ``tile_batch`` windows) at a time; the volume and its latent live in output canvases
(on ``output_device``, e.g. CPU while the network runs on a GPU). Neighbouring windows overlap
and are blended with separable linear ramps, so seams are averaged away instead of showing as
steps. Windows start on multiples of the downsampling factor so latent and image tiles map
exactly onto each other.

Why results differ slightly from a whole-volume pass: the receptive field of a window ends at
its border, and GroupNorm statistics are computed per window. The overlap (default a quarter of
the window) keeps both effects small; tests state the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from medsynth.errors import ConfigError, InputError
from medsynth.models.vqgan import VQGAN

Triple = tuple[int, int, int]


def _triple(value: int | tuple[int, ...] | None, default: Triple, name: str) -> Triple:
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ConfigError(f"expects {name} to be an int or 3 ints, but got {name}={value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window start offsets covering ``[0, size)``; the last window ends exactly at ``size``."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    starts = [min(i * stride, size - window) for i in range(n)]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1D blending weights: rising linearly over ``overlap`` voxels at each end, 1 inside.

    Never zero, so a voxel covered by one window only still gets its value back after
    normalising by the weight sum.
    """
    w = torch.ones(n, device=device)
    k = min(overlap, n // 2)
    if k > 0:
        ramp = torch.arange(1, k + 1, device=device, dtype=torch.float32) / (k + 1)
        w[:k] = ramp
        w[n - k:] = ramp.flip(0)
    return w


def blend_weights(window: Triple, overlap: Triple, device: torch.device) -> torch.Tensor:
    """``(X, Y, Z)`` separable blending weights for one window."""
    wx, wy, wz = (_ramp(n, o, device) for n, o in zip(window, overlap))
    return wx[:, None, None] * wy[None, :, None] * wz[None, None, :]


def _axis_weight_sums(shape: Triple, window: Triple, overlap: Triple, device: torch.device) -> list[torch.Tensor]:
    """Per-axis sums of the 1D ramps over all window starts. Windows form a grid and the weights
    are separable, so the total weight at ``(x, y, z)`` is ``sx[x] * sy[y] * sz[z]``: no
    volume-sized weight canvas is needed."""
    sums = []
    for size, w, o in zip(shape, window, overlap):
        acc = torch.zeros(size, device=device)
        ramp = _ramp(w, o, device)
        for s in _starts(size, w, w - o):
            acc[s:s + w] += ramp
        sums.append(acc)
    return sums


def _normalise_(canvas: torch.Tensor, sums: list[torch.Tensor]) -> torch.Tensor:
    """Divide ``canvas`` ``(B, C, X, Y, Z)`` in place by the separable weight sum, one x-slice
    at a time (no full-size temporary)."""
    plane = sums[1][:, None] * sums[2][None, :]
    for i in range(canvas.shape[2]):
        canvas[:, :, i].div_(plane * sums[0][i])
    return canvas


def _tiles(shape: Triple, window: Triple, overlap: Triple) -> Iterator[Triple]:
    grids = [_starts(s, w, w - o) for s, w, o in zip(shape, window, overlap)]
    for i in grids[0]:
        for j in grids[1]:
            for k in grids[2]:
                yield (i, j, k)


def _plan(model: VQGAN, window: int | tuple[int, ...] | None,
          overlap: int | tuple[int, ...] | None) -> tuple[Triple, Triple]:
    """Validate the window/overlap in image voxels against the model's downsampling factor."""
    f = model.downsample_factor
    window = _triple(window, model.config.patch_size, "window")
    overlap = _triple(overlap, tuple(max(f, (w // 4) // f * f) for w in window), "overlap")  # type: ignore[arg-type]
    for w, o in zip(window, overlap):
        if w < f or w % f:
            raise ConfigError(f"expects window entries to be positive multiples of the downsampling "
                              f"factor {f}, but got window={window}")
        if o < 0 or o % f or o >= w:
            raise ConfigError(f"expects overlap entries to be multiples of {f} in [0, window), but got "
                              f"overlap={overlap} for window={window}")
    return window, overlap


def _check_volume(model: VQGAN, x: torch.Tensor, what: str, channels: int) -> None:
    if x.ndim != 5:
        raise InputError(f"expects a (B, C, X, Y, Z) {what}, but got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise InputError(f"expects {channels} channel(s) in the {what}, but got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); the model was trained with {channels}")
    if any(s < 1 for s in x.shape[2:]):
        raise InputError(f"the {what} is empty: shape {tuple(x.shape)}")


def _model_device(model: VQGAN) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_tiled(model: VQGAN, x: torch.Tensor, window: int | tuple[int, ...] | None = None,
                 overlap: int | tuple[int, ...] | None = None, tile_batch: int = 1,
                 output_device: torch.device | str | None = None) -> torch.Tensor:
    """Continuous latent of a whole volume, one window at a time.

    Args:
        model: the autoencoder (its mode is left as is; call ``eval()`` first).
        x: ``(B, C, X, Y, Z)`` image in model intensity space, any size; padded (edge
            replicate) to a multiple of the downsampling factor f, which the caller gets back
            as the latent's extent ``ceil(X / f)``.
        window: window in image voxels (default: the training patch size).
        overlap: overlap between windows in image voxels (default: a quarter of the window).
        tile_batch: windows encoded per forward pass (memory vs speed).
        output_device: where the latent canvas lives (default: ``x``'s device).

    Returns:
        ``(B, L, ceil(X/f), ceil(Y/f), ceil(Z/f))`` float32 latent.
    """
    _check_volume(model, x, "image", model.config.in_channels)
    f = model.downsample_factor
    window, overlap = _plan(model, window, overlap)
    out_dev = torch.device(output_device) if output_device is not None else x.device
    dev = _model_device(model)
    b, _, *size = x.shape
    padded = tuple(math.ceil(s / f) * f for s in size)
    pad = [p - s for s, p in zip(size, padded)]
    if any(pad):
        # F.pad takes (last axis first); replicate avoids inventing an edge the encoder sees.
        x = F.pad(x.float(), (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    window = tuple(min(w, p) for w, p in zip(window, padded))  # type: ignore[assignment]
    lat_window = tuple(w // f for w in window)
    lat_overlap = tuple(min(o, w - f) // f for o, w in zip(overlap, window))
    weights = blend_weights(lat_window, lat_overlap, out_dev)  # type: ignore[arg-type]
    lat_size = tuple(p // f for p in padded)
    canvas = torch.zeros((b, model.config.latent_channels, *lat_size), device=out_dev)
    img_overlap = tuple(lo * f for lo in lat_overlap)
    starts = list(_tiles(padded, window, img_overlap))  # type: ignore[arg-type]
    for n in range(0, len(starts), tile_batch):
        group = starts[n:n + tile_batch]
        crops = torch.cat([x[:, :, i:i + window[0], j:j + window[1], k:k + window[2]] for i, j, k in group])
        z = model.encode(crops.to(dev)).float().to(out_dev)  # (len(group)*B, L, wx, wy, wz)
        for t, (i, j, k) in enumerate(group):
            li, lj, lk = i // f, j // f, k // f
            sl = (slice(None), slice(None), slice(li, li + lat_window[0]), slice(lj, lj + lat_window[1]),
                  slice(lk, lk + lat_window[2]))
            canvas[sl] += z[t * b:(t + 1) * b] * weights
    return _normalise_(canvas, _axis_weight_sums(lat_size, lat_window, lat_overlap, out_dev))  # type: ignore[arg-type]


@torch.no_grad()
def decode_tiled(model: VQGAN, z: torch.Tensor, window: int | tuple[int, ...] | None = None,
                 overlap: int | tuple[int, ...] | None = None, quantize: bool = True,
                 tile_batch: int = 1, output_device: torch.device | str | None = None,
                 output_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Image of a whole latent, one window at a time.

    Args:
        model: the autoencoder.
        z: ``(B, L, x, y, z)`` continuous latent (e.g. from :func:`encode_tiled` or a diffusion
            sample); quantised once, whole, before tiling when ``quantize`` (quantisation is
            per latent voxel, so this costs no window memory).
        window, overlap: in *image* voxels, as for :func:`encode_tiled`.
        output_shape: crop the result to this ``(X, Y, Z)`` (undo :func:`encode_tiled`'s padding).

    Returns:
        ``(B, C, f*x, f*y, f*z)`` float32 image (or ``output_shape``).
    """
    _check_volume(model, z, "latent", model.config.latent_channels)
    f = model.downsample_factor
    window, overlap = _plan(model, window, overlap)
    out_dev = torch.device(output_device) if output_device is not None else z.device
    dev = _model_device(model)
    b, _, *lat_size = z.shape
    z = z.float()
    if quantize:
        z = torch.cat([model.quantize(zi.unsqueeze(0).to(dev)).quantized.to(z.device) for zi in z])
    lat_window = tuple(min(w // f, s) for w, s in zip(window, lat_size))
    lat_overlap = tuple(min(o // f, lw - 1) if lw > 1 else 0 for o, lw in zip(overlap, lat_window))
    img_window = tuple(lw * f for lw in lat_window)
    weights = blend_weights(img_window, tuple(lo * f for lo in lat_overlap), out_dev)  # type: ignore[arg-type]
    size = tuple(s * f for s in lat_size)
    canvas = torch.zeros((b, model.config.in_channels, *size), device=out_dev)
    starts = list(_tiles(tuple(lat_size), lat_window, lat_overlap))  # type: ignore[arg-type]
    for n in range(0, len(starts), tile_batch):
        group = starts[n:n + tile_batch]
        crops = torch.cat([z[:, :, i:i + lat_window[0], j:j + lat_window[1], k:k + lat_window[2]]
                           for i, j, k in group])
        x = model.decoder(crops.to(dev)).float().to(out_dev)
        for t, (i, j, k) in enumerate(group):
            sl = (slice(None), slice(None), slice(i * f, i * f + img_window[0]),
                  slice(j * f, j * f + img_window[1]), slice(k * f, k * f + img_window[2]))
            canvas[sl] += x[t * b:(t + 1) * b] * weights
    img_overlap = tuple(lo * f for lo in lat_overlap)
    out = _normalise_(canvas, _axis_weight_sums(size, img_window, img_overlap, out_dev))  # type: ignore[arg-type]
    if output_shape is not None:
        out = out[:, :, :output_shape[0], :output_shape[1], :output_shape[2]]
    return out


@torch.no_grad()
def reconstruct_tiled(model: VQGAN, x: torch.Tensor, window: int | tuple[int, ...] | None = None,
                      overlap: int | tuple[int, ...] | None = None, tile_batch: int = 1,
                      output_device: torch.device | str | None = None) -> torch.Tensor:
    """Encode, quantise and decode ``x`` ``(B, C, X, Y, Z)`` window by window; same shape out."""
    z = encode_tiled(model, x, window, overlap, tile_batch, output_device)
    return decode_tiled(model, z, window, overlap, True, tile_batch, output_device,
                        output_shape=tuple(x.shape[2:]))  # type: ignore[arg-type]
