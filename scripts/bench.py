"""Performance of the medsynth generative stack, side by side with its reference points, in one run.

Sections (``--only``, comma-separated; default all):

* ``stages``   training step time and peak memory per stage: VQ-GAN (generator + discriminator
               step), latent DiT, ControlNet (base frozen), and MONAI's AutoencoderKL for reference.
* ``models``   our DiT3D vs diffusers' ``WanTransformer3DModel`` vs MONAI's ``DiffusionModelUNet`` at
               matched parameter count (within +-10 %) on identical latents: training step, forward,
               peak memory, then the same number of training steps for each (same batches, same
               noise, same optimiser) and the held-out loss + a sample-quality proxy reached.
* ``tokens``   how forward / training cost grows with the token count (latent grids 8^3, 16^3, 32^3).
* ``sampling`` time and memory per volume at 64^3, 128^3, 256^3 images (and 512x512x256 on CUDA):
               latent 16^3 / 32^3 / 64^3 with the 4x autoencoder and tiled decode; rectified flow
               at 10 / 30 steps vs DDIM 50 / DDPM 1000, ours vs the MONAI latent-diffusion baseline
               (AutoencoderKL + DiffusionModelUNet) vs Wan.

Usage:
    python scripts/bench.py --device cpu --out docs/benchmarks               # everything (~10 min on 2 cores)
    python scripts/bench.py --quick --out /tmp/bench                        # tiny sizes, seconds (the test)
    python scripts/bench.py --device cuda --precision bf16 --compile --out docs/benchmarks
    python scripts/bench.py --only models,tokens --train-steps 200

Results: ``OUT/bench_<device>.json`` (each section replaces its own key, so sections can be rerun
alone) and ``OUT/bench_<device>.md`` (regenerated from the JSON). Every model is randomly
initialised: nothing downloads.

Measurement: wall time is the median of ``repeats`` calls after ``warmup`` calls (CUDA is
synchronised around each). Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` minus what
was allocated before; on CPU it is the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident set before. glibc keeps freed small blocks, so on CPU
the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` = 1 MiB: every tensor above 1 MiB
is then returned to the system when freed and cannot hide inside an earlier measurement's peak.
Items whose estimated time exceeds ``--budget`` seconds are recorded as skipped, with the estimate.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SECTIONS: tuple[str, ...] = ("stages", "models", "tokens", "sampling")
LATENT_CHANNELS = 8  # the tiny VQ-GAN's latent channels
FACTOR = 4  # the tiny VQ-GAN's downsampling per axis
TEXT_TOKENS = 8  # length of the fixed text context every denoiser cross-attends to
CPU_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_WAIT_POLICY": "PASSIVE"}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run (full or ``--quick``).

    Attributes:
        hidden, depth, heads, text_dim: our DiT (the ``tiny`` preset in a full run); the other
            denoisers are sized to its parameter count.
        latent: latent edge of the ``models`` section (image edge = 4x).
        batch: latents per training step.
        train_steps: optimiser steps per model for "loss reached after the same budget".
        eval_latents: held-out latents (loss) and generated samples (quality proxy).
        sample_steps: rectified-flow / DDIM steps of the quality-proxy samples.
        token_grids: latent edges of the ``tokens`` section.
        image_sizes: image shapes of the ``sampling`` section.
        stage_image: image edge of the stage-1 training steps.
        max_tokens: the ``sampling`` section picks the smallest DiT patch (1, 2, 4) giving at most
            this many tokens (the attention cost of a CPU run must stay bounded).
        repeats, warmup: timed calls per measurement.
    """

    name: str
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    text_dim: int = 64
    latent: int = 8
    batch: int = 2
    train_steps: int = 100
    eval_latents: int = 16
    sample_steps: int = 10
    token_grids: tuple[int, ...] = (8, 16, 32)
    image_sizes: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (128, 128, 128), (256, 256, 256))
    stage_image: int = 32
    max_tokens: int = 512
    repeats: int = 3
    warmup: int = 1


FULL = Scale("full")
QUICK = Scale("quick", hidden=32, depth=2, heads=2, text_dim=16, latent=8, batch=2, train_steps=3, eval_latents=4,
              sample_steps=2, token_grids=(4, 8), image_sizes=((32, 32, 32), (64, 64, 64)), stage_image=16,
              max_tokens=64, repeats=1, warmup=1)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that a measurement's
    allocations cannot reuse pages an earlier one left resident (its peak would then read 0)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS delta is then a lower bound
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``peak_mb`` = peak memory inside the block minus memory before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated minus memory_allocated before (tensors only, no cache)"
        if _reset_peak_rss() and _proc_status_mb("VmHWM") is not None:
            return ("peak RSS delta: VmHWM (reset via /proc/self/clear_refs) minus VmRSS before, after "
                    "gc + malloc_trim(0); "
                    f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}, "
                    f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
        return "unavailable on this OS (no /proc/self/status); peak_mb is null"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _release_free_memory()
            self._ok = _reset_peak_rss()
            self._before = _proc_status_mb("VmRSS") or 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20 - self._before, 1)
        elif self._ok:
            hwm = _proc_status_mb("VmHWM")
            self.peak_mb = None if hwm is None else round(max(0.0, hwm - self._before), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW_CALL_S = 2.0  # a cold call slower than this is warm-up enough: time one more call only
TIMING_METHOD = (f"perf_counter wall time, CUDA synchronised; median of repeats after warm-up; a call whose cold "
                 f"run takes > {SLOW_CALL_S:g} s is timed once more only; peak memory from the cold call")


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Median wall time of ``repeats`` calls after ``warmup`` calls, and the peak memory of the
    first call (a cold call: its allocations are the ones a single sampling / training run makes).

    Calls whose cold run takes longer than ``SLOW_CALL_S`` are timed once more only (their
    one-off overheads are small relative to them), which keeps a CPU run within its budget.
    """
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - t0
    if first > SLOW_CALL_S and warmup > 0:
        warmup, repeats = 1, min(repeats, 1)
    # warmup == 0: the cold call is the (first) measured one, for items too slow to run twice.
    times = [first] if warmup == 0 else []
    for i in range(max(0, warmup - 1) + repeats - len(times)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if warmup == 0 or i >= warmup - 1:
            times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "repeats": len(times), "first_call_s": round(first, 4), "peak_mb": mem.peak_mb}


class Runner:
    """Shared state of one run: device, precision, scale, time budget and skip bookkeeping."""

    def __init__(self, args: argparse.Namespace, scale: Scale) -> None:
        self.device = torch.device(args.device)
        self.scale = scale
        self.budget = float(args.budget)
        self.autocast = args.precision == "bf16"
        self.autocast_dtype = torch.bfloat16 if self.autocast else None  # for the sampling loop's own switch
        self.compile = bool(args.compile)
        self.channels_last = bool(args.channels_last)
        self.seed = int(args.seed)

    def ctx(self) -> Any:
        """bf16 autocast on request (GPU path; CPU bf16 matmuls are slow on most CPUs)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def prepare(self, model: nn.Module, conv: bool = False) -> nn.Module:
        """Move to the device; channels-last 3D for convolutional models and torch.compile on request."""
        model = model.to(self.device)
        if conv and self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if self.compile:
            model.compile()  # in place: state_dict keys stay the same
        return model

    def time(self, fn: Callable[[], object], repeats: int | None = None, warmup: int | None = None) -> dict[str, Any]:
        def run() -> object:
            with self.ctx():
                return fn()
        return measure(run, self.device, self.scale.warmup if warmup is None else warmup,
                       self.scale.repeats if repeats is None else repeats)

    def over_budget(self, estimate_s: float | None) -> bool:
        return estimate_s is not None and estimate_s > self.budget

    def skipped(self, what: str, estimate_s: float | None, reason: str = "") -> dict[str, Any]:
        why = reason or f"estimated {estimate_s:.0f} s > budget {self.budget:.0f} s on {self.device.type}"
        print(f"  skip {what}: {why}", flush=True)
        return {"skipped": True, "reason": why, "estimated_s": None if estimate_s is None else round(estimate_s, 1)}


def _extrapolate(points: Sequence[tuple[float, float]], x: float, exponent: float | None = None) -> float | None:
    """Extrapolate a cost to size ``x`` from measured ``(size, seconds)`` points: the log-log
    slope of the last two points (or ``exponent`` with one point), never below 1 (cost is at least
    linear in size)."""
    pts = [(s, t) for s, t in points if s > 0 and t > 0]
    if not pts:
        return None
    if exponent is None:
        exponent = 1.0
        if len(pts) >= 2:
            (s0, t0), (s1, t1) = pts[-2], pts[-1]
            exponent = max(1.0, math.log(t1 / t0) / math.log(s1 / s0)) if s1 != s0 else 1.0
    s, t = pts[-1]
    return t * (x / s) ** exponent


def available_mb(device: torch.device) -> float | None:
    """Memory a new allocation can get: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return _proc_meminfo_mb("MemAvailable")


def _proc_meminfo_mb(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


MEMORY_FRACTION = 0.4  # skip an item whose extrapolated peak exceeds this share of the free memory


def _loglog_slope(points: Sequence[tuple[float, float]]) -> float | None:
    pts = [(math.log(s), math.log(t)) for s, t in points if s > 0 and t and t > 0]
    if len(pts) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return round(float(np.polyfit(xs, ys, 1)[0]), 2)


# ---------------------------------------------------------------------------------------------
# Models: ours, Wan, MONAI UNet, all behind the DiT3D call signature so `denoise` drives each
# ---------------------------------------------------------------------------------------------


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fixed_context(scale: Scale, seed: int) -> Tensor:
    """One fixed "prompt" ``(1, T, text_dim)``: every denoiser pays for cross-attention to text."""
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(1, TEXT_TOKENS, scale.text_dim, generator=g)


class Conditioned(nn.Module):
    """Any denoiser behind :class:`~medsynth.models.dit.DiT3D`'s call signature, with a fixed text
    context, so the one sampling loop (:func:`medsynth.pipelines.sampling.denoise`) and the same
    training loop drive every model. Guidance/drop arguments are accepted and ignored (the
    benchmark samples without guidance)."""

    def __init__(self, kind: str, model: nn.Module, context: Tensor) -> None:
        super().__init__()
        self.kind, self.model = kind, model
        self.register_buffer("context", context, persistent=False)

    def forward(self, x: Tensor, timesteps: Tensor, text: object = None, metadata: object = None, *,
                drop_text: object = None, drop_metadata: object = None, block_residuals: object = None) -> Tensor:
        """``x (B, C, X, Y, Z)``, ``timesteps (B,)`` on [0, 1000) -> prediction ``(B, C, X, Y, Z)``."""
        context = self.context.expand(x.shape[0], -1, -1).to(x.dtype)
        if self.kind == "ours":
            from medsynth.models.text_encoder import TextEmbedding

            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
            return self.model(x, timesteps, TextEmbedding(context, mask, context.mean(1)))
        if self.kind == "wan":
            return self.model(x, timesteps, context, return_dict=False)[0]
        return self.model(x, timesteps, context)


def build_ours(scale: Scale, patch: int) -> nn.Module:
    from medsynth.models.dit import DiT3D, DiTConfig

    return DiT3D(DiTConfig(in_channels=LATENT_CHANNELS, patch_size=(patch,) * 3, hidden_size=scale.hidden,
                           depth=scale.depth, num_heads=scale.heads, text_dim=scale.text_dim))


def _wan(hidden: int, heads: int, layers: int, ffn: int, text_dim: int, patch: int) -> nn.Module:
    from diffusers import WanTransformer3DModel

    # rope_max_seq_len bounds the token grid per axis; 1024 covers 512^3 latents at patch 1.
    return WanTransformer3DModel(patch_size=(patch,) * 3, num_attention_heads=heads,
                                 attention_head_dim=hidden // heads, in_channels=LATENT_CHANNELS,
                                 out_channels=LATENT_CHANNELS, text_dim=text_dim, freq_dim=256, ffn_dim=ffn,
                                 num_layers=layers, rope_max_seq_len=1024)


def _unet(channels: tuple[int, int, int], text_dim: int) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    # MONAI's LDM recipe: attention only below full resolution, cross-attention to the text there.
    return DiffusionModelUNet(spatial_dims=3, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                              num_res_blocks=1, channels=channels, attention_levels=(False, True, True),
                              norm_num_groups=8, num_head_channels=8, with_conditioning=True,
                              cross_attention_dim=text_dim)


@functools.lru_cache(maxsize=4)
def match_sizes(scale: Scale) -> dict[str, Any]:
    """Wan and UNet hyper-parameters whose parameter count is closest to our DiT's.

    Wan keeps our width and heads and searches depth and MLP width; the UNet searches its three
    level widths (multiples of 8). Models are built on the meta device, so the search is cheap.
    """
    with torch.device("meta"):
        target = count(build_ours(scale, 1))
        wan_best: tuple[float, dict[str, int]] | None = None
        for layers in range(1, 3 * scale.depth + 1):
            for mult in (2, 3, 4):
                cfg = {"hidden": scale.hidden, "heads": scale.heads, "layers": layers, "ffn": mult * scale.hidden}
                n = count(_wan(**cfg, text_dim=scale.text_dim, patch=1))
                if wan_best is None or abs(n - target) < abs(wan_best[0] - target):
                    wan_best = (n, cfg)
        unet_best: tuple[float, tuple[int, int, int]] | None = None
        def eighths(v: float) -> int:
            return max(8, int(round(v / 8)) * 8)

        # Level-width families (ratios to the first level); parameters grow with the first width,
        # so each family is walked upwards only until it passes the target.
        for ratios in ((1, 1, 1), (1, 1.5, 1.5), (1, 2, 2), (1, 1.5, 2), (1, 2, 4)):
            for a in range(8, 257, 8):
                channels = tuple(eighths(a * r) for r in ratios)
                n = count(_unet(channels, scale.text_dim))  # type: ignore[arg-type]
                if unet_best is None or abs(n - target) < abs(unet_best[0] - target):
                    unet_best = (n, channels)  # type: ignore[assignment]
                if n > target:
                    break
    assert wan_best is not None and unet_best is not None
    return {"ours": {"params": target, "hidden": scale.hidden, "depth": scale.depth, "heads": scale.heads},
            "wan": {"params": int(wan_best[0]), **wan_best[1]},
            "unet": {"params": int(unet_best[0]), "channels": list(unet_best[1]), "num_res_blocks": 1,
                     "attention_levels": [False, True, True]},
            "rule": "closest parameter count to ours; Wan: same width/heads, search depth 1..3x and MLP 2-4x; "
                    "UNet: search level widths (multiples of 8, 5 width-ratio families), 1 res block, attention "
                    "below full resolution",
            "within_10_percent": all(abs(v - target) <= 0.1 * target for v in (wan_best[0], unet_best[0]))}


def build_denoiser(kind: str, sizes: dict[str, Any], scale: Scale, patch: int, context: Tensor) -> Conditioned:
    if kind == "ours":
        model = build_ours(scale, patch)
    elif kind == "wan":
        w = sizes["wan"]
        model = _wan(w["hidden"], w["heads"], w["layers"], w["ffn"], scale.text_dim, patch)
    elif kind == "unet":
        model = _unet(tuple(sizes["unet"]["channels"]), scale.text_dim)
    else:
        raise ValueError(f"unknown denoiser kind {kind!r}; valid kinds are ['ours', 'wan', 'unet']")
    return Conditioned(kind, model, context)


# ---------------------------------------------------------------------------------------------
# Latents: identical for every model
# ---------------------------------------------------------------------------------------------


def make_latents(scale: Scale, seed: int, count_: int, cache: Path | None) -> tuple[Tensor, dict[str, Any]]:
    """``(count_, 8, L, L, L)`` unit-scale latents and where they came from.

    With ``cache`` (a ``medsynth encode`` folder) its latents are used, cropped to ``L``; else CT
    phantoms are encoded by a randomly initialised tiny VQ-GAN (seeded): not a trained latent
    space, but deterministic, spatially structured and identical for every model, which is what
    a side-by-side comparison needs. Scaled by 1 / std, as the latent cache's ``scale_factor`` does.
    """
    edge = scale.latent
    if cache is not None:
        from medsynth.io.checkpoint import load_tensors

        files = sorted((cache / "latents").glob("*.safetensors"))
        if not files:
            raise SystemExit(f"--latent-cache {cache}: no latents/*.safetensors there; run `medsynth encode` first")
        lat = []
        for path in files:
            z = load_tensors(path)[0]["latent"].float()
            if min(z.shape[1:]) < edge or z.shape[0] != LATENT_CHANNELS:
                raise SystemExit(f"--latent-cache latent {path.name} has shape {tuple(z.shape)}; need "
                                 f"({LATENT_CHANNELS}, >={edge}, >={edge}, >={edge})")
            starts = [(s - edge) // 2 for s in z.shape[1:]]
            lat.append(z[:, starts[0]:starts[0] + edge, starts[1]:starts[1] + edge, starts[2]:starts[2] + edge])
        z = torch.stack(lat)
        z = z[torch.arange(count_) % len(z)]
        source = f"latent cache {cache} ({len(files)} cases, centre crops {edge}^3, repeated to {count_})"
    else:
        from medsynth.data.phantoms import generate_phantom
        from medsynth.data.transforms import IntensityMapping
        from medsynth.models import VQGAN
        from medsynth.models import preset as vq_preset

        torch.manual_seed(seed)
        vq = VQGAN(vq_preset("tiny")).eval()
        mapping = IntensityMapping.ct_window()
        images = [torch.from_numpy(np.asarray(mapping.forward(generate_phantom("ct", edge * FACTOR, seed=seed + i)
                                                              .image.array), np.float32)) for i in range(count_)]
        with torch.no_grad():
            z = torch.cat([vq.encode(im[None, None]) for im in images])
        source = (f"{count_} CT phantoms {edge * FACTOR}^3 (seeds {seed}..{seed + count_ - 1}) encoded by a randomly "
                  f"initialised tiny VQ-GAN (torch seed {seed})")
    scale_factor = float(1.0 / z.std())
    return z * scale_factor, {"source": source, "scale_factor": round(scale_factor, 4), "shape": list(z.shape[1:])}


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _train_step_fn(model: nn.Module, objective: Any, x0: Tensor, runner: Runner,
                   optimizer: torch.optim.Optimizer | None = None) -> Callable[[], float]:
    opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    gen = torch.Generator().manual_seed(runner.seed)

    def step() -> float:
        return _optimise_once(model, objective, x0, gen, opt, runner)
    return step


def _optimise_once(model: nn.Module, objective: Any, x0: Tensor, gen: torch.Generator,
                   opt: torch.optim.Optimizer, runner: Runner) -> float:
    """One denoiser training step on ``x0`` ``(B, C, X, Y, Z)``; returns the loss."""
    xt, t, noise = objective.training_inputs(x0, gen)
    with runner.ctx():
        loss = objective.loss(model(xt, t), x0, noise, t).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def section_stages(runner: Runner) -> dict[str, Any]:
    """Training step of each stage on its natural input (timed and peak memory)."""
    from monai.networks.nets import AutoencoderKL

    from medsynth.diffusion import make_objective
    from medsynth.models import VQGAN
    from medsynth.models import preset as vq_preset
    from medsynth.models.autoencoder_config import DiscriminatorConfig
    from medsynth.models.controlnet import ControlNet3D
    from medsynth.models.discriminator import PatchDiscriminator3d
    from medsynth.training.losses import ReconstructionLoss, discriminator_loss, generator_adversarial_loss

    s, dev = runner.scale, runner.device
    torch.manual_seed(runner.seed)
    rows: list[dict[str, Any]] = []
    image = torch.rand(1, 1, s.stage_image, s.stage_image, s.stage_image, device=dev) * 2 - 1

    vq = runner.prepare(VQGAN(vq_preset("tiny")), conv=True)
    # 3 strided layers need >= 32^3 (instance norm needs more than one voxel at the end)
    layers = 3 if s.stage_image >= 32 else 2
    disc = runner.prepare(PatchDiscriminator3d(DiscriminatorConfig(channels=16, num_layers=layers)), conv=True)
    rec_loss = ReconstructionLoss(1.0, 0.2).to(dev)
    opt_g = torch.optim.Adam(vq.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4)

    def vq_step() -> None:
        recon, q = vq(image)
        loss = rec_loss(recon, image)["total"] + q.loss + 0.05 * generator_adversarial_loss(disc(recon))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss = discriminator_loss(disc(image), disc(recon.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    rows.append({"stage": "1 autoencoder: medsynth VQ-GAN tiny (G + D step, adversarial on)",
                 "input": f"image 1x{s.stage_image}^3", "params": count(vq) + count(disc), **runner.time(vq_step)})

    kl = runner.prepare(AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32),
                                      num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                                      latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                                      with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False), conv=True)
    opt_kl = torch.optim.Adam(kl.parameters(), lr=1e-3)

    def kl_step() -> None:
        recon, mu, sigma = kl(image)
        kld = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        loss = rec_loss(recon, image)["total"] + 1e-6 * kld
        opt_kl.zero_grad(set_to_none=True)
        loss.backward()
        opt_kl.step()

    rows.append({"stage": "1 autoencoder: MONAI AutoencoderKL 8-16-32 (reference, no discriminator)",
                 "input": f"image 1x{s.stage_image}^3", "params": count(kl), **runner.time(kl_step)})
    del vq, disc, kl

    context = fixed_context(s, runner.seed).to(dev)
    dit = runner.prepare(build_ours(s, 1))
    wrapped = Conditioned("ours", dit, context)
    x0 = torch.randn(s.batch, LATENT_CHANNELS, s.latent, s.latent, s.latent, device=dev)
    objective = make_objective("rectified_flow")
    rows.append({"stage": "2 latent DiT (ours, rectified flow)", "input": f"latent {s.batch}x8x{s.latent}^3",
                 "params": count(dit), **runner.time(_train_step_fn(wrapped, objective, x0, runner))})

    control = runner.prepare(ControlNet3D.from_dit(dit, num_blocks=max(1, s.depth // 2), num_classes=4,
                                                   image_to_latent_factor=FACTOR))
    dit.requires_grad_(False)
    labels = torch.randint(0, 4, (s.batch, s.latent * FACTOR, s.latent * FACTOR, s.latent * FACTOR), device=dev)
    mask = torch.nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    opt_c = torch.optim.AdamW(control.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(runner.seed)
    from medsynth.models.text_encoder import TextEmbedding

    text = TextEmbedding(context.expand(s.batch, -1, -1), torch.ones(s.batch, TEXT_TOKENS, dtype=torch.bool,
                                                                      device=dev), context.mean(1).expand(s.batch, -1))

    def control_step() -> None:
        xt, t, noise = objective.training_inputs(x0, gen)
        residuals = control(xt, t, text, None, mask)
        loss = objective.loss(dit(xt, t, text, block_residuals=residuals), x0, noise, t).loss
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    rows.append({"stage": f"3 ControlNet ({max(1, s.depth // 2)} blocks, base DiT frozen)",
                 "input": f"latent {s.batch}x8x{s.latent}^3 + mask 4x{s.latent * FACTOR}^3",
                 "params": count(control), **runner.time(control_step)})
    return {"rows": rows, "note": "median step time after warm-up; peak memory of the first (cold) step"}


def _heldout_loss(model: nn.Module, objective: Any, latents: Tensor, runner: Runner) -> float:
    """Mean loss over held-out latents at 8 fixed timesteps with fixed noise (same for every model)."""
    gen = torch.Generator().manual_seed(runner.seed + 1)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad(), runner.ctx():
        for t_value in np.linspace(62.5, 937.5, 8):
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            t = torch.full((latents.shape[0],), float(t_value), device=latents.device)
            xt = objective.add_noise(latents, noise, t)
            total += float(objective.loss(model(xt, t), latents, noise, t).loss)
            n += 1
    model.train()
    return total / n


def _features(z: Tensor) -> np.ndarray:
    """Per-latent features for the quality proxy: channel means, channel stds and channel
    gradient energies (spatial structure) ``(N, 3C)``."""
    z = z.float().cpu()
    grad = sum((z.diff(dim=d) ** 2).flatten(2).mean(2) for d in (2, 3, 4))
    return torch.cat([z.flatten(2).mean(2), z.flatten(2).std(2), grad], dim=1).numpy().astype(np.float64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets ``(N, F)``."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # With fewer samples than features the covariances are singular; a small ridge (as pytorch-fid
    # does on failure) keeps sqrtm finite without changing the distance noticeably.
    ridge = 1e-6 * np.eye(len(mu_a))
    covmean = np.real(linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def section_models(runner: Runner, cache: Path | None) -> dict[str, Any]:
    """Matched-size denoisers on identical latents: cost, then loss/quality after the same budget."""
    from medsynth.diffusion import make_objective, make_scheduler
    from medsynth.pipelines.sampling import denoise

    s, dev = runner.scale, runner.device
    sizes = match_sizes(s)
    latents, data = make_latents(s, runner.seed, 4 * s.eval_latents, cache)
    train, heldout = latents[:3 * s.eval_latents].to(dev), latents[3 * s.eval_latents:].to(dev)
    context = fixed_context(s, runner.seed).to(dev)
    lat_shape = (s.batch, LATENT_CHANNELS, s.latent, s.latent, s.latent)
    noise_fd = frechet(_features(torch.randn_like(heldout)), _features(heldout))
    ref_fd = frechet(_features(train[:len(heldout)]), _features(heldout))
    runs = [("ours", 1, "rectified_flow"), ("ours", 2, "rectified_flow"), ("wan", 1, "rectified_flow"),
            ("unet", 1, "rectified_flow"), ("unet", 1, "epsilon"), ("ours", 1, "epsilon")]
    rows = []
    for kind, patch, objective_name in runs:
        label = {"ours": "medsynth DiT3D", "wan": "diffusers WanTransformer3DModel",
                 "unet": "MONAI DiffusionModelUNet"}[kind]
        label += f" (patch {patch})" if kind != "unet" else ""
        print(f"  models: {label}, {objective_name}", flush=True)
        torch.manual_seed(runner.seed)  # same init stream for every model
        model = build_denoiser(kind, sizes, s, patch, context)
        runner.prepare(model)
        objective = make_objective(objective_name)
        x_cost = torch.randn(lat_shape, generator=torch.Generator().manual_seed(runner.seed)).to(dev)
        row: dict[str, Any] = {"model": label, "objective": objective_name, "params": count(model.model),
                               "tokens": (s.latent // patch) ** 3 if kind != "unet" else None}
        row["train_step"] = runner.time(_train_step_fn(model, objective, x_cost, runner))
        with torch.no_grad():
            row["forward"] = runner.time(lambda: model(x_cost, torch.full((s.batch,), 500.0, device=dev)))
        # Same budget for all: the same batches (index stream), noise and timesteps, AdamW 3e-4.
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        gen, pick = torch.Generator().manual_seed(runner.seed), torch.Generator().manual_seed(runner.seed + 2)
        losses = []
        t0 = time.perf_counter()
        for _ in range(s.train_steps):
            idx = torch.randint(0, len(train), (s.batch,), generator=pick)
            losses.append(_optimise_once(model, objective, train[idx.to(dev)], gen, opt, runner))
        _sync(dev)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        # the mean over the whole run: steadier than the 3-call median on a shared CPU
        row["train_s_per_step"] = round(row["train_seconds"] / s.train_steps, 3)
        row["train_loss_last10"] = round(float(np.mean(losses[-10:])), 4)
        row["heldout_loss"] = round(_heldout_loss(model, objective, heldout, runner), 4)
        model.eval()
        sampler = "euler" if objective_name == "rectified_flow" else "ddim"
        gen_s = torch.Generator().manual_seed(runner.seed + 3)
        t0 = time.perf_counter()
        samples = denoise(model, make_scheduler(objective_name, sampler), tuple(heldout.shape),
                          num_inference_steps=s.sample_steps, generator=gen_s, autocast_dtype=runner.autocast_dtype)
        _sync(dev)
        row["sample_seconds"] = round(time.perf_counter() - t0, 2)
        row["sampler"] = f"{sampler} {s.sample_steps} steps"
        row["latent_fd"] = round(frechet(_features(samples), _features(heldout)), 3)
        rows.append(row)
        del model, opt
    return {"sizes": sizes, "data": data, "batch": s.batch, "train_steps": s.train_steps,
            "latent_grid": [s.latent] * 3, "heldout_latents": len(heldout), "rows": rows,
            "latent_fd_reference": {"train_vs_heldout": round(ref_fd, 3), "noise_vs_heldout": round(noise_fd, 3)},
            "notes": ["held-out loss: mean over 8 fixed timesteps (62.5..937.5) with fixed noise; comparable "
                      "only between rows of the same objective",
                      "latent_fd: Frechet distance between Gaussian fits of 24 features per latent (channel "
                      "mean, std, gradient energy) of generated vs held-out latents; a rough quality proxy on "
                      "few samples: train-vs-held-out is the floor, noise-vs-held-out the ceiling",
                      "optimiser for every row: AdamW lr 3e-4, grad clip 1.0, identical batches and noise"]}


def section_tokens(runner: Runner) -> dict[str, Any]:
    """Forward and training-step cost vs token count for ours and Wan (patch 1 and 2) and the UNet."""
    from medsynth.diffusion import make_objective

    s, dev = runner.scale, runner.device
    sizes = match_sizes(s)
    context = fixed_context(s, runner.seed).to(dev)
    objective = make_objective("rectified_flow")
    rows, fits = [], {}
    for kind, patch in (("ours", 1), ("ours", 2), ("wan", 1), ("wan", 2), ("unet", 1)):
        points: list[tuple[float, float]] = []
        for grid in s.token_grids:
            n = (grid // patch) ** 3 if kind != "unet" else grid ** 3
            name = f"{kind} p{patch}" if kind != "unet" else "unet"
            row: dict[str, Any] = {"model": name, "latent_grid": grid, "tokens": n if kind != "unet" else None,
                                   "voxels": grid ** 3}
            if kind == "unet" and grid < 8:
                row.update(runner.skipped(f"tokens {name} grid {grid}", None, "the 3-level UNet needs a latent "
                                          ">= 8 per axis (GroupNorm over a 1-voxel lowest level)"))
                rows.append(row)
                continue
            # attention is quadratic: assume exponent 2 for the transformers until two points exist
            estimate = _extrapolate(points, n, None if len(points) >= 2 else (2.0 if kind != "unet" else 1.0))
            # forward + training step (~3 forwards), each a cold call + warm-up + repeats
            total = None if estimate is None else 4 * estimate * (s.warmup + s.repeats)
            if runner.over_budget(total):
                row.update(runner.skipped(f"tokens {name} grid {grid}", total))
                rows.append(row)
                continue
            torch.manual_seed(runner.seed)
            model = runner.prepare(build_denoiser(kind, sizes, s, patch, context))
            x = torch.randn(1, LATENT_CHANNELS, grid, grid, grid, device=dev)
            with torch.no_grad():
                row["forward"] = runner.time(lambda: model(x, torch.full((1,), 500.0, device=dev)))
            row["train_step"] = runner.time(_train_step_fn(model, objective, x, runner))
            points.append((n, row["forward"]["median_s"]))
            rows.append(row)
            del model
        fits[f"{kind} p{patch}" if kind != "unet" else "unet"] = _loglog_slope(points)
    return {"rows": rows, "batch": 1, "forward_time_exponent_vs_tokens": fits,
            "note": "exponent = log-log slope of forward time vs tokens (voxels for the UNet); 1 = linear, "
                    "2 = attention-bound. Small grids are overhead-bound, so slopes there understate the "
                    "asymptote."}


def _decode_ours(vq: nn.Module, z: Tensor, window: int) -> Tensor:
    from medsynth.models import decode_tiled

    return decode_tiled(vq, z, window=window, overlap=window // 4)


def _decode_monai(kl: nn.Module, z: Tensor, window: int) -> Tensor:
    from monai.inferers import sliding_window_inference

    # MONAI's own tiled decode (as MAISI does it): latent windows, Gaussian blending, output 4x larger.
    lat_window = min(window // FACTOR, min(z.shape[2:]))
    with torch.no_grad():
        return sliding_window_inference(z, lat_window, 1, kl.decode_stage_2_outputs, overlap=0.25, mode="gaussian")


def section_sampling(runner: Runner) -> dict[str, Any]:
    """Per-volume sampling: denoiser step cost x steps + tiled decode, and one end-to-end check."""
    from monai.networks.nets import AutoencoderKL

    from medsynth.diffusion import make_scheduler
    from medsynth.models import VQGAN
    from medsynth.models import preset as vq_preset
    from medsynth.pipelines.sampling import denoise

    s, dev = runner.scale, runner.device
    sizes = match_sizes(s)
    context = fixed_context(s, runner.seed).to(dev)
    image_sizes = list(s.image_sizes)
    if dev.type == "cuda" and s.name == "full":
        image_sizes.append((512, 512, 256))
    torch.manual_seed(runner.seed)
    vq = runner.prepare(VQGAN(vq_preset("tiny")).eval(), conv=True)
    kl = runner.prepare(AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32),
                                      num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                                      latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                                      with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval(),
                        conv=True)
    window = 64  # the autoencoder bench's window; a quick run's volumes fit in one window
    samplers = [("rectified flow (euler)", "rectified_flow", "euler", 10), ("rectified flow (euler)", "rectified_flow",
                                                                            "euler", 30),
                ("DDIM", "epsilon", "ddim", 50), ("DDPM", "epsilon", "ddpm", 1000)]
    steps_rows, decode_rows, volume_rows, e2e = [], [], [], []
    history: dict[str, list[tuple[float, float]]] = {}
    mem_history: dict[str, list[tuple[float, float]]] = {}
    for shape in image_sizes:
        lat = tuple(v // FACTOR for v in shape)
        voxels = float(np.prod(lat))
        patch = next((p for p in (1, 2, 4) if voxels / p ** 3 <= s.max_tokens), 4)
        per_step: dict[str, float | None] = {}
        for kind in ("ours", "wan", "unet"):
            name = kind if kind == "unet" else f"{kind} p{patch}"
            n = voxels / patch ** 3 if kind != "unet" else voxels
            row: dict[str, Any] = {"image": list(shape), "latent": list(lat), "model": name,
                                   "tokens": int(n) if kind != "unet" else None}
            key = kind
            estimate = _extrapolate(history.get(key, []), n, 1.0 if kind == "unet" else None)
            # Memory can be quadratic in tokens (MONAI's UNet attention materialises N x N scores:
            # ~21 GB at a 64^3 latent, which the OOM killer ended on a 23 GB machine), so extrapolate
            # it with exponent 2 and skip what would not fit.
            mem_estimate = _extrapolate(mem_history.get(key, []), n, 2.0)
            free = available_mb(dev)
            if mem_estimate is not None and free is not None and mem_estimate > MEMORY_FRACTION * free:
                row.update(runner.skipped(f"sampling step {name} {shape}", estimate,
                                          f"estimated peak memory {mem_estimate:.0f} MB (quadratic extrapolation) "
                                          f"> {MEMORY_FRACTION:.0%} of the {free:.0f} MB available"))
                per_step[kind] = estimate
                row["estimated_step_s"] = None if estimate is None else round(estimate, 3)
                steps_rows.append(row)
                continue
            if runner.over_budget(None if estimate is None else estimate * 3):
                row.update(runner.skipped(f"sampling step {name} {shape}", estimate * 3))
                per_step[kind] = None if estimate is None else estimate
                row["estimated_step_s"] = None if estimate is None else round(estimate, 3)
                steps_rows.append(row)
                continue
            torch.manual_seed(runner.seed)
            model = runner.prepare(build_denoiser(kind, sizes, s, patch, context)).eval()
            x = torch.randn(1, LATENT_CHANNELS, *lat, device=dev)
            with torch.no_grad():
                big = estimate is not None and estimate > 2
                row.update(runner.time(lambda: model(x, torch.full((1,), 500.0, device=dev)),
                                       repeats=1 if big else None, warmup=1))
            row["params"] = count(model.model)
            history.setdefault(key, []).append((n, row["median_s"]))
            if row.get("peak_mb"):
                mem_history.setdefault(key, []).append((n, row["peak_mb"]))
            per_step[kind] = row["median_s"]
            steps_rows.append(row)
            if kind == "ours" and shape == image_sizes[0]:
                # End to end through the one sampling loop + tiled decode, to check the additive model.
                sched = make_scheduler("rectified_flow")
                t0 = time.perf_counter()
                z = denoise(model, sched, (1, LATENT_CHANNELS, *lat), num_inference_steps=s.sample_steps,
                            generator=torch.Generator().manual_seed(0), autocast_dtype=runner.autocast_dtype)
                with runner.ctx():
                    _decode_ours(vq, z, window)
                _sync(dev)
                e2e.append({"image": list(shape), "pipeline": f"ours p{patch} + VQ-GAN tiled decode",
                            "sampler": f"rectified flow euler {s.sample_steps}",
                            "seconds": round(time.perf_counter() - t0, 2)})
            del model
        decode_s: dict[str, float | None] = {}
        for name, decoder, fn in (("medsynth VQ-GAN tiny, decode_tiled", vq, _decode_ours),
                                  ("MONAI AutoencoderKL 8-16-32, sliding_window_inference", kl, _decode_monai)):
            row = {"image": list(shape), "decoder": name, "window": min(window, min(shape))}
            estimate = _extrapolate(history.get(name, []), float(np.prod(shape)), 1.0)
            if runner.over_budget(estimate):
                row.update(runner.skipped(f"decode {name} {shape}", estimate))
                decode_s[name] = estimate
                decode_rows.append(row)
                continue
            z = torch.randn(1, LATENT_CHANNELS, *lat, device=dev)
            with torch.no_grad():
                row.update(runner.time(lambda: fn(decoder, z, window), repeats=1, warmup=0))
            history.setdefault(name, []).append((float(np.prod(shape)), row["median_s"]))
            decode_s[name] = row["median_s"]
            decode_rows.append(row)
        for label, kind, dec in (("ours: DiT3D + VQ-GAN", "ours", "medsynth VQ-GAN tiny, decode_tiled"),
                                 ("MONAI LDM: DiffusionModelUNet + AutoencoderKL", "unet",
                                  "MONAI AutoencoderKL 8-16-32, sliding_window_inference"),
                                 ("Wan 3D transformer + VQ-GAN", "wan", "medsynth VQ-GAN tiny, decode_tiled")):
            for sampler_label, objective, sampler, steps in samplers:
                step_s, dec_s = per_step.get(kind), decode_s.get(dec)
                measured = (kind in history and history[kind][-1][0] == (voxels if kind == "unet" else
                                                                          voxels / patch ** 3)
                            and dec in history and history[dec][-1][0] == float(np.prod(shape)))
                total = None if step_s is None or dec_s is None else step_s * steps + dec_s
                volume_rows.append({"image": list(shape), "pipeline": label, "sampler": sampler_label, "steps": steps,
                                    "seconds_per_volume": None if total is None else round(total, 1),
                                    "from": "measured step x steps + measured decode" if measured else
                                    "includes extrapolated parts (skipped on this device)"})
    return {"denoiser_step": steps_rows, "decode": decode_rows, "per_volume": volume_rows, "end_to_end": e2e,
            "sizes": sizes, "guidance": "none (batch 1); classifier-free guidance doubles the denoiser cost",
            "patch_rule": f"smallest DiT patch in (1, 2, 4) with at most {s.max_tokens} tokens",
            "note": "per-volume time = denoiser step time x steps + decode time (the scheduler's own cost is "
                    "negligible); end_to_end runs the real loop to check that sum"}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import diffusers
        import monai

        info.update(diffusers=diffusers.__version__, monai=monai.__version__)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", cpu)
        if model:
            info["cpu_model"] = model.group(1).strip()
    except OSError:
        pass
    return info


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        if value.get("skipped"):
            return f"skipped ({value.get('reason')})"
        if "median_s" in value:
            mem = value.get("peak_mb")
            return f"{value['median_s']:.3g} s" + ("" if mem is None else f" / {mem:.0f} MB")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("skipped") and "median_s" in cols:
            cells = [(_cell(r.get(c)) if c not in ("median_s", "peak_mb") else "") for c in cols]
            cells[cols.index("median_s")] = f"skipped: {r['reason']}"
            out.append("| " + " | ".join(cells) + " |")
        else:
            out.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return out


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """Tables of every section in ``data``; analysis paragraphs are written from the numbers."""
    m = data.get("machine", {})
    lines = [f"# Benchmark: {data.get('device', 'cpu').upper()}", "",
             f"Generated by `scripts/bench.py` from `{path.with_suffix('.json').name}`.", "",
             f"- machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpu_count')} cores, "
             f"{m.get('platform')}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"- torch {m.get('torch')} ({m.get('torch_threads')} threads), diffusers {m.get('diffusers')}, "
             f"MONAI {m.get('monai')}, Python {m.get('python')}",
             f"- peak memory: {data.get('memory_method')}",
             f"- timing: {data.get('timing_method')}", ""]
    for key in SECTIONS:
        sec = data.get(key)
        if not sec:
            continue
        lines += [f"## {key}", "", f"Command: `{sec.get('command')}` (load average during the section: "
                                   f"{sec.get('load_average')}, {sec.get('seconds')} s)", ""]
        if key == "stages":
            lines += _table(sec["rows"], ["stage", "input", "params", "median_s", "peak_mb", "first_call_s"])
        elif key == "models":
            sz = sec["sizes"]
            lines += [f"Matched sizes ({sz['rule']}; within 10 %: {sz['within_10_percent']}): ours "
                      f"{sz['ours']['params']:,} params, Wan {sz['wan']['params']:,} (layers {sz['wan']['layers']}, "
                      f"ffn {sz['wan']['ffn']}), UNet {sz['unet']['params']:,} (channels {sz['unet']['channels']}).",
                      "", f"Data: {sec['data']['source']}; latent grid {_cell(sec['latent_grid'])}, batch "
                          f"{sec['batch']}, {sec['train_steps']} training steps per row, "
                          f"{sec['heldout_latents']} held-out latents.", ""]
            cols = ["model", "objective", "params", "tokens", "train_step", "forward", "train_s_per_step",
                    "heldout_loss", "sampler", "sample_seconds", "latent_fd"]
            lines += _table(sec["rows"], cols)
            ref = sec["latent_fd_reference"]
            lines += ["", f"latent_fd reference: train vs held-out {ref['train_vs_heldout']}, "
                          f"noise vs held-out {ref['noise_vs_heldout']}.", "", "Cells: median time / peak memory.",
                      "", *(f"- {n}" for n in sec["notes"])]
        elif key == "tokens":
            rows = [{**r, "fwd": r.get("forward"), "step": r.get("train_step")} if not r.get("skipped") else
                    {**r, "fwd": "skipped" + (f" (est. {r['estimated_s']:.0f} s)" if r.get("estimated_s") else "")}
                    for r in sec["rows"]]
            lines += _table(rows, ["model", "latent_grid", "tokens", "fwd", "step"])
            for r in sec["rows"]:
                if r.get("skipped"):
                    lines.append(f"- skipped {r['model']} at {r['latent_grid']}^3: {r['reason']}")
            lines += ["", f"Forward-time exponent vs tokens: {sec['forward_time_exponent_vs_tokens']}. {sec['note']}"]
        elif key == "sampling":
            lines += ["### Denoiser step (batch 1)", "",
                      *_table(sec["denoiser_step"], ["image", "latent", "model", "tokens", "params", "median_s",
                                                     "peak_mb"]),
                      "", "### Decode", "", *_table(sec["decode"], ["image", "decoder", "window", "median_s",
                                                                    "peak_mb"]),
                      "", "### Per volume", "",
                      *_table(sec["per_volume"], ["image", "pipeline", "sampler", "steps", "seconds_per_volume",
                                                  "from"]),
                      "", "End-to-end check: " + "; ".join(
                          f"{e['pipeline']} {_cell(e['image'])} {e['sampler']}: {e['seconds']} s"
                          for e in sec["end_to_end"]), "", f"- {sec['note']}", f"- {sec['patch_rule']}",
                      f"- guidance: {sec['guidance']}"]
        lines.append("")
    lines += analysis(data)
    notes = path.with_name(path.stem + "_notes.md")
    if notes.is_file():  # hand-written interpretation, kept across regenerations
        lines += [f"## Interpretation (from `{notes.name}`)", "", notes.read_text().strip(), ""]
    path.write_text("\n".join(lines) + "\n")


def analysis(data: dict[str, Any]) -> list[str]:
    """'Where we are slower' and the MAISI comparison, stated from the numbers in ``data``."""
    out = ["## Where we are slower (from the numbers above)", ""]
    models = data.get("models")
    if models:
        rows = {(r["model"].split(" (")[0] + (" p2" if "patch 2" in r["model"] else ""), r["objective"]): r
                for r in models["rows"]}
        ours, unet = rows.get(("medsynth DiT3D", "rectified_flow")), rows.get(("MONAI DiffusionModelUNet",
                                                                              "rectified_flow"))
        wan = rows.get(("diffusers WanTransformer3DModel", "rectified_flow"))
        ours2 = rows.get(("medsynth DiT3D p2", "rectified_flow"))
        for name, other in (("the MONAI UNet", unet), ("Wan", wan)):
            if ours and other:
                a, b = ours["train_step"]["median_s"], other["train_step"]["median_s"]
                fa, fb = ours["forward"]["median_s"], other["forward"]["median_s"]
                ma, mb = ours.get("train_s_per_step"), other.get("train_s_per_step")
                mean = f" (mean over the training run {ma} vs {mb} s/step)" if ma and mb else ""
                out.append(f"- Ours (patch 1) vs {name} at matched size: training step {a:.3g} s vs {b:.3g} s "
                           f"({a / b:.2f}x){mean}, forward {fa:.3g} s vs {fb:.3g} s ({fa / fb:.2f}x); held-out loss "
                           f"{ours['heldout_loss']} vs {other['heldout_loss']}, latent_fd {ours['latent_fd']} vs "
                           f"{other['latent_fd']} after {models['train_steps']} steps.")
        if ours2 and unet:
            out.append(f"- Ours with patch 2 ({ours2['tokens']} tokens) vs the UNet: forward "
                       f"{ours2['forward']['median_s']:.3g} s vs {unet['forward']['median_s']:.3g} s, held-out loss "
                       f"{ours2['heldout_loss']} vs {unet['heldout_loss']}, latent_fd {ours2['latent_fd']} vs "
                       f"{unet['latent_fd']}.")
    sampling = data.get("sampling")
    if sampling:
        for shape in sorted({tuple(r["image"]) for r in sampling["per_volume"]}, key=lambda v: math.prod(v)):
            rows_here = [r for r in sampling["per_volume"] if tuple(r["image"]) == shape]
            per = {(r["pipeline"].split(":")[0], r["sampler"], r["steps"]): r["seconds_per_volume"] for r in rows_here}
            partly = any("extrapolated" in r["from"] for r in rows_here)
            ours10 = per.get(("ours", "rectified flow (euler)", 10))
            unet10 = per.get(("MONAI LDM", "rectified flow (euler)", 10))
            unet_ddpm = per.get(("MONAI LDM", "DDPM", 1000))
            if ours10 and unet10:
                out.append(f"- {'x'.join(map(str, shape))} per volume, rectified flow 10 steps: ours {ours10} s vs "
                           f"MONAI LDM {unet10} s ({ours10 / unet10:.2f}x); vs the MONAI LDM with its usual DDPM "
                           f"1000 steps: {unet_ddpm} s" + (" (partly extrapolated)." if partly else "."))
    out += ["", "Ratios above 1 are where ours is slower.", "",
            "## MAISI's published figures", "",
            "NVIDIA MAISI reports a 512^3 CT volume in about 50 s on one A100 with its rectified-flow model, and "
            "23-45 GB peak GPU memory depending on the output size. "
            + ("These are CPU numbers from tiny randomly initialised models, on a CPU shared with other jobs: "
               "they are not comparable to A100 figures and say nothing about absolute GPU speed. What carries "
               "over is relative: how each model's cost grows with tokens/voxels, and the ratios between models "
               "at equal size. Compare with MAISI on `bench_cuda.md` (`--device cuda` adds 512x512x256)."
               if data.get("device") == "cpu" else
               "Compare the 512x512x256 rows above (MAISI's 512^3 has twice the voxels; at the same model size "
               "the decode scales linearly with voxels and the denoiser with tokens^1-2)."), ""]
    return out


def save(out_dir: Path, device: torch.device, key: str, value: dict[str, Any], scale: Scale) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{device.type}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("scale") and data.get("scale") != scale.name:
        data = {}  # never mix quick and full numbers in one file
    data.update(device=device.type, scale=scale.name, scale_settings=asdict(scale), machine=machine_info(device),
                memory_method=PeakMemory.method(device),
                timing_method=TIMING_METHOD)
    data[key] = value
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    write_markdown(data, path.with_suffix(".md"))
    return path


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (seconds; for tests)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks", help="folder for bench_<device>.json/md")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (GPU; slow first call)")
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format for conv models")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="skip items estimated to take longer than this many seconds (default 120; quick 20)")
    p.add_argument("--train-steps", type=int, default=None, help="override the models section's training steps")
    p.add_argument("--latent-cache", type=Path, default=None, help="use a `medsynth encode` cache as the latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="only rewrite OUT/bench_<device>.md from the JSON")
    args = p.parse_args(argv)
    bad = sorted(set(args.only.split(",")) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad} in --only={args.only!r}; valid sections are {list(SECTIONS)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device must be cpu, cuda or cuda:N, but got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, but got {args.threads}")
    if args.train_steps is not None and args.train_steps < 1:
        p.error(f"--train-steps must be >= 1, but got {args.train_steps}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        path = args.out / f"bench_{torch.device(args.device).type}.json"
        if not path.is_file():
            raise SystemExit(f"--report: {path} does not exist; run the benchmark first")
        write_markdown(json.loads(path.read_text()), path.with_suffix(".md"))
        print(path.with_suffix(".md"))
        return 0
    if args.device == "cpu" and argv is None and any(k not in os.environ for k in CPU_ENVIRONMENT):
        # Both must be set before the process starts (glibc and OpenMP read them once), so re-run.
        # MALLOC_MMAP_THRESHOLD_: freed tensors > 1 MiB leave the resident set (see module doc).
        # OMP_WAIT_POLICY=PASSIVE: on a shared CPU, OpenMP threads that busy-wait for a descheduled
        # partner made every op 5-10x slower in our runs (2 threads, load average 10).
        for key, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    if args.train_steps is not None:
        scale = replace(scale, train_steps=args.train_steps)
    if args.budget is None:
        args.budget = 20.0 if args.quick else 120.0
    runner = Runner(args, scale)
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = None
    for key in [k for k in SECTIONS if k in args.only.split(",")]:
        print(f"[{time.strftime('%H:%M:%S')}] section {key}", flush=True)
        t0, load0 = time.time(), os.getloadavg()[0]
        fn = {"stages": lambda: section_stages(runner), "models": lambda: section_models(runner, args.latent_cache),
              "tokens": lambda: section_tokens(runner), "sampling": lambda: section_sampling(runner)}[key]
        value = fn()
        value.update(command=command, seconds=round(time.time() - t0, 1),
                     load_average=f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        path = save(args.out, runner.device, key, value, scale)
        print(f"  done in {value['seconds']} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
