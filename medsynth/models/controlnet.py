"""ControlNet3D: mask conditioning for a frozen :class:`~medsynth.models.dit.DiT3D`.

Reading order: config, leaf modules (mask embedder), the model, guidance helpers. The idea is
Zhang et al. (2023, "Adding Conditional Control to Text-to-Image Diffusion Models") as PixArt-delta
applies it to transformers, with MAISI's mask encoder for 3D:

* a *trainable copy* of the base DiT's input path (patch embedding, timestep and condition
  embedders) and of its first ``num_blocks`` blocks, initialised from the base weights;
* a mask embedder: one-hot labels at *image* resolution ``(B, K, X*f, Y*f, Z*f)`` -> strided
  convolutions down by the autoencoder factor ``f`` -> a patchify conv exactly like the DiT's,
  so mask features land on the DiT token grid ``(B, N, D)``; they are added to the copy's tokens;
* one zero-initialised linear projection per copied block; its output is the residual the base
  DiT adds after the same block (``DiT3D.forward(..., block_residuals=...)``).

Zero projections make a fresh ControlNet change the base output by exactly zero, so training
starts from the base model's samples and never destroys them. The mask embedder's last layer is
zero too, so the copied blocks first see exactly the base features (the ControlNet paper's
second zero layer).

"No mask" is a learned token ``null_mask`` (mask dropout in training), so one ControlNet serves
mask-conditioned and mask-free sampling, and a mask guidance scale can contrast the two.

Pure torch: no Lightning, no file IO, no printing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.diffusion.guidance import dual_guidance, guided_text
from medsynth.errors import ConfigError
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.embeddings import sincos_position_embedding_3d
from medsynth.models.text_encoder import TextEmbedding

LATENT_FACTORS: tuple[int, ...] = (1, 2, 4, 8, 16)


def _factor3(value: Any) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) not in LATENT_FACTORS for v in values):
        raise ConfigError(f"expects image_to_latent_factor to be one of {LATENT_FACTORS} or 3 such values "
                          f"(X, Y, Z), but got image_to_latent_factor={value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass
class ControlNetConfig:
    """Shape of :class:`ControlNet3D`.

    Attributes:
        dit: the base DiT's config; the copy must match it exactly to load its weights.
        num_blocks: how many of the first DiT blocks are copied (1..depth). More blocks give the
            mask more say over the layout at a proportional cost; PixArt-delta uses about half.
        num_classes: K, label values 0..K-1 (background included) of the one-hot mask.
        image_to_latent_factor: the autoencoder's downsampling per axis (X, Y, Z); the mask is
            given at image resolution and the embedder reduces it by this factor.
        embed_channels: widths of the mask embedder's conv stages; the first is at image
            resolution, so keep it small (memory grows with the image voxels).
    """

    dit: DiTConfig = field(default_factory=DiTConfig)
    num_blocks: int = 2
    num_classes: int = 2
    image_to_latent_factor: tuple[int, int, int] = (4, 4, 4)
    embed_channels: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        if isinstance(self.dit, Mapping):
            self.dit = DiTConfig.from_dict(self.dit)
        self.image_to_latent_factor = _factor3(self.image_to_latent_factor)
        self.embed_channels = tuple(int(c) for c in self.embed_channels)
        if not self.embed_channels or min(self.embed_channels) < 1:
            raise ConfigError(f"expects embed_channels to be a non-empty list of positive ints, but got "
                              f"embed_channels={list(self.embed_channels)}")
        depth = self.dit.depth
        blocks = self.num_blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= depth:
            raise ConfigError(f"expects num_blocks between 1 and the DiT depth {depth}, but got "
                              f"num_blocks={self.num_blocks!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"expects num_classes >= 2 (background + at least one label), but got "
                              f"num_classes={self.num_classes!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly dict (the DiT config nested under ``dit``)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "dit"}
        return {"dit": self.dit.to_dict(), **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ControlNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys (typos) raise :class:`ConfigError`."""
        data = dict(data or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in ControlNet model config; valid keys are {valid}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------


class MaskEmbedder(nn.Module):
    """One-hot mask ``(B, K, X*f, Y*f, Z*f)`` -> tokens ``(B, N, D)`` on the DiT token grid.

    Stage i halves every axis whose remaining factor is > 1 (stride 2 there, 1 elsewhere), so
    anisotropic factors such as (4, 4, 2) work; a final conv with kernel = stride = patch size
    patchifies exactly like the DiT's :class:`~medsynth.models.dit.PatchEmbed3d`.
    """

    def __init__(self, num_classes: int, hidden_size: int, factor: tuple[int, int, int],
                 patch_size: tuple[int, int, int], channels: Sequence[int]) -> None:
        super().__init__()
        stages = int(math.log2(max(factor)))
        widths = [channels[min(i, len(channels) - 1)] for i in range(stages + 1)]
        layers: list[nn.Module] = [nn.Conv3d(num_classes, widths[0], 3, padding=1), nn.SiLU()]
        remaining = list(factor)
        for i in range(stages):
            stride = tuple(2 if r > 1 else 1 for r in remaining)
            remaining = [r // s for r, s in zip(remaining, stride)]
            layers += [nn.Conv3d(widths[i], widths[i + 1], 3, stride=stride, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*layers)
        self.patchify = nn.Conv3d(widths[-1], hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, mask: Tensor) -> Tensor:
        """``(B, K, X*f, Y*f, Z*f)`` -> ``(B, N, D)`` with N = (X/p_x)(Y/p_y)(Z/p_z)."""
        h = self.patchify(self.encoder(mask))  # (B, D, gx, gy, gz)
        return h.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class ControlNet3D(nn.Module):
    """Mask branch for a DiT: noisy latent + conditions + mask -> per-block residuals.

    Build it from a trained DiT with :meth:`from_dit` (copies the weights); the constructor alone
    gives the same architecture with fresh weights (used when loading an export).
    """

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        base = DiT3D(config.dit)
        d = config.dit.hidden_size
        # The copied input path: the branch sees the same tokens and conditioning as the base.
        self.patch_embed = base.patch_embed
        self.time_embed = base.time_embed
        self.conditions = base.conditions
        self.blocks = nn.ModuleList(base.blocks[i] for i in range(config.num_blocks))
        self.mask_embed = MaskEmbedder(config.num_classes, d, config.image_to_latent_factor,
                                       config.dit.patch_size, config.embed_channels)
        self.null_mask = nn.Parameter(torch.zeros(d))
        self.zero_projections = nn.ModuleList(nn.Linear(d, d) for _ in range(config.num_blocks))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the output projections and the mask embedder's patchify conv (see module docstring).

        The null-mask token starts as a small normal so "mask" and "no mask" can separate as soon
        as the embedder learns; the conv stages get PyTorch's default init.
        """
        for proj in self.zero_projections:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.mask_embed.patchify.weight)
        nn.init.zeros_(self.mask_embed.patchify.bias)
        nn.init.normal_(self.null_mask, std=0.02)

    @classmethod
    def from_dit(cls, dit: DiT3D, num_blocks: int, num_classes: int,
                 image_to_latent_factor: int | Sequence[int], **kwargs: Any) -> "ControlNet3D":
        """A ControlNet whose copied parts start with ``dit``'s weights (``dit`` is not modified).

        Args:
            dit: the (trained) base model.
            num_blocks: blocks to copy, 1..depth.
            num_classes: K of the one-hot masks (background included).
            image_to_latent_factor: autoencoder downsampling, an int or (fx, fy, fz).
            kwargs: other :class:`ControlNetConfig` fields (``embed_channels``).
        """
        config = ControlNetConfig(dit=copy.deepcopy(dit.config), num_blocks=num_blocks, num_classes=num_classes,
                                  image_to_latent_factor=image_to_latent_factor, **kwargs)
        model = cls(config)
        param = next(dit.parameters())
        model.to(device=param.device, dtype=param.dtype)
        model.patch_embed.load_state_dict(dit.patch_embed.state_dict())
        model.time_embed.load_state_dict(dit.time_embed.state_dict())
        model.conditions.load_state_dict(dit.conditions.state_dict())
        for i, block in enumerate(model.blocks):
            block.load_state_dict(dit.blocks[i].state_dict())
        return model

    def check_mask_shape(self, mask_shape: Sequence[int], latent_shape: Sequence[int]) -> None:
        """ConfigError unless the mask is ``(B, K, X*f, Y*f, Z*f)`` for latents ``(B, C, X, Y, Z)``."""
        f, k = self.config.image_to_latent_factor, self.config.num_classes
        want = (latent_shape[0], k, *(s * q for s, q in zip(latent_shape[2:], f)))
        if tuple(mask_shape) != want:
            raise ConfigError(f"expects a one-hot mask of shape {want} (B, K, X*f, Y*f, Z*f) for latents "
                              f"{tuple(latent_shape)} and image_to_latent_factor {f}, but got {tuple(mask_shape)}")

    def forward(self, x: Tensor, timestep: Tensor | float, text: TextEmbedding | None = None,
                metadata: Mapping[str, Tensor] | None = None, mask_onehot: Tensor | None = None, *,
                drop_text: Tensor | None = None, drop_metadata: Tensor | None = None,
                drop_mask: Tensor | None = None, conditioning_scale: float = 1.0) -> list[Tensor]:
        """Residuals for the base DiT's first ``num_blocks`` blocks.

        Args:
            x: ``(B, C, X, Y, Z)`` noisy latents (the same the base DiT gets).
            timestep: ``(B,)`` or a scalar on the ``[0, 1000)`` training scale.
            text, metadata, drop_text, drop_metadata: as for :meth:`DiT3D.forward`; pass the same
                values as to the base model.
            mask_onehot: ``(B, K, X*f, Y*f, Z*f)`` float one-hot labels at image resolution
                (see :func:`one_hot_mask`), or None for "no mask" (every sample uses ``null_mask``).
            drop_mask: ``(B,)`` bool; True replaces that sample's mask by ``null_mask``.
            conditioning_scale: multiplies every residual (0 switches the ControlNet off).

        Returns:
            ``num_blocks`` tensors ``(B, N, D)``, usable as ``DiT3D.forward(block_residuals=...)``.
        """
        base_shape = self.config.dit
        grid = tuple(s // p for s, p in zip(x.shape[2:], base_shape.patch_size))
        batch = x.shape[0]
        tokens, _ = self.patch_embed(x)  # (B, N, D)
        tokens = tokens + sincos_position_embedding_3d(grid, base_shape.hidden_size, x.device).to(tokens.dtype)
        null = self.null_mask.to(tokens.dtype).expand_as(tokens)  # (B, N, D)
        if mask_onehot is None:
            control = null
        else:
            self.check_mask_shape(mask_onehot.shape, x.shape)
            control = self.mask_embed(mask_onehot.to(tokens.dtype))  # (B, N, D)
            if drop_mask is not None:
                control = torch.where(drop_mask.to(x.device, torch.bool)[:, None, None], null, control)
        tokens = tokens + control
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        cond, context, context_mask = self.conditions(batch, text, metadata, drop_text, drop_metadata)
        c = self.time_embed(timestep) + cond  # (B, D)
        residuals = []
        for block, proj in zip(self.blocks, self.zero_projections):
            tokens = block(tokens, c, context, context_mask)
            residuals.append(proj(tokens) * conditioning_scale)
        return residuals

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter (the whole branch trains; the base DiT is frozen by the caller)."""
        return list(self.parameters())


def one_hot_mask(label: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer labels ``(B, X, Y, Z)`` -> one-hot ``(B, K, X, Y, Z)``.

    Raises:
        ConfigError: a value outside ``0..num_classes-1`` (a label the ControlNet never saw).
    """
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ConfigError(f"expects an integer label tensor, but got dtype {label.dtype}")
    if label.ndim != 4:
        raise ConfigError(f"expects labels of shape (B, X, Y, Z), but got {tuple(label.shape)}")
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi >= num_classes:
        raise ConfigError(f"label values must lie in 0..{num_classes - 1} (the classes the ControlNet was "
                          f"trained on), but got values in {lo}..{hi}")
    return F.one_hot(label.long(), num_classes).permute(0, 4, 1, 2, 3).to(dtype)


# ---------------------------------------------------------------------------------------------
# Guidance: text and mask with separate scales (dual_guidance lives in medsynth.diffusion.guidance)
# ---------------------------------------------------------------------------------------------


class ControlResiduals:
    """``block_residuals_fn`` for :func:`medsynth.pipelines.sampling.denoise`.

    ``denoise`` calls the hook with the model input of ``N`` samples: ``N = B`` without guidance,
    ``N = 2B`` under classifier-free guidance (conditional half first; the second half has text
    and metadata dropped). The hook runs the ControlNet with the same conditions and drops, and
    gives the second half the mask too (``guide_mask=False``: only text is guided, at
    ``guidance_scale``) or the null mask (``guide_mask=True``: text and mask are guided together
    at one scale). Separate scales need three branches, see :func:`dual_guidance`;
    :meth:`branch_inputs` builds them for a loop that supports it.

    Args:
        controlnet: the trained ControlNet (eval mode).
        mask_onehot: ``(B, K, X*f, Y*f, Z*f)`` or None (mask-free sampling).
        text, metadata: the conditions passed to ``denoise`` (batch B), or None.
        guide_mask: see above.
        conditioning_scale: multiplies the residuals.
        negative_text: negative prompts (batch B) that ``denoise`` puts where the text is dropped
            (:class:`~medsynth.pipelines.sampling.Conditions`); the ControlNet sees them there too.
    """

    def __init__(self, controlnet: ControlNet3D, mask_onehot: Tensor | None, text: TextEmbedding | None = None,
                 metadata: Mapping[str, Tensor] | None = None, *, guide_mask: bool = True,
                 conditioning_scale: float = 1.0, negative_text: TextEmbedding | None = None) -> None:
        self.controlnet = controlnet
        self.mask = mask_onehot
        self.text = text
        self.negative_text = negative_text
        self.metadata = metadata
        self.guide_mask = guide_mask
        self.conditioning_scale = float(conditioning_scale)

    @torch.no_grad()
    def __call__(self, x: Tensor, timesteps: Tensor) -> list[Tensor]:
        """``x (N, C, X, Y, Z)``, ``timesteps (N,)`` -> residuals ``(N, T, D)``."""
        n = x.shape[0]
        batch = n if self.mask is None else self.mask.shape[0]
        if self.text is not None:
            batch = len(self.text)
        if n == batch:
            return self._run(x, timesteps, [False], drop_mask=[False])
        if n == 2 * batch:
            return self._run(x, timesteps, [False, True], drop_mask=[False, self.guide_mask])
        if n == 3 * batch:
            return self._run(x, timesteps, [False, True, True], drop_mask=[False, False, True])
        raise ConfigError(f"the sampling loop passed {n} latents, but the ControlNet conditions hold batch {batch}; "
                          f"expected {batch}, {2 * batch} or {3 * batch}")

    def branch_drops(self, batch: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """For a 3-branch loop ``[full; mask only; unconditional]``: ``drop_text (3B,)`` and
        ``drop_metadata (3B,)`` to pass to the base DiT (metadata follows text)."""
        drop = torch.tensor([False, True, True], device=device).repeat_interleave(batch)
        return drop, drop

    def _run(self, x: Tensor, timesteps: Tensor, drop_cond: list[bool], drop_mask: list[bool]) -> list[Tensor]:
        copies = len(drop_cond)
        device = x.device
        batch = x.shape[0] // copies
        metadata = None if self.metadata is None else {k: torch.cat([v] * copies).to(device)
                                                       for k, v in self.metadata.items()}
        mask = None if self.mask is None else torch.cat([self.mask] * copies).to(device)
        drop = torch.tensor(drop_cond, device=device).repeat_interleave(batch)
        text, drop_text = guided_text(self.text, self.negative_text, copies, drop)  # as denoise's branches
        text = None if text is None else text.to(device)
        dmask = torch.tensor(drop_mask, device=device).repeat_interleave(batch)
        return self.controlnet(x, timesteps, text, metadata, mask, drop_text=drop_text, drop_metadata=drop,
                               drop_mask=dmask, conditioning_scale=self.conditioning_scale)


def make_block_residuals_fn(controlnet: ControlNet3D, mask_onehot: Tensor | None,
                            text: TextEmbedding | None = None, metadata: Mapping[str, Tensor] | None = None,
                            *, guide_mask: bool = True, conditioning_scale: float = 1.0,
                            negative_text: TextEmbedding | None = None) -> ControlResiduals:
    """The ``block_residuals_fn`` to pass to ``denoise`` (see :class:`ControlResiduals`)."""
    return ControlResiduals(controlnet, mask_onehot, text, metadata, guide_mask=guide_mask,
                            conditioning_scale=conditioning_scale, negative_text=negative_text)


__all__ = ["ControlNetConfig", "ControlNet3D", "MaskEmbedder", "one_hot_mask", "dual_guidance",
           "ControlResiduals", "make_block_residuals_fn", "LATENT_FACTORS"]
