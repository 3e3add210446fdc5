"""DiT3D: the stage-2 latent diffusion transformer over 3D latent grids.

Reading order: config, leaf modules (patch embedding, attention, MLP, block, final layer), the
model, presets. The design follows Peebles & Xie (2023, "Scalable Diffusion Models with
Transformers") lifted to 3D, with PixArt-style cross-attention to text tokens:

* the latent ``(B, C, X, Y, Z)`` is cut into ``p_x * p_y * p_z`` patches by a strided Conv3d,
  giving ``N = (X/p_x)(Y/p_y)(Z/p_z)`` tokens; fixed sin-cos positions are computed from that
  token grid on every call, so non-cubic and variable grids need nothing special;
* one conditioning vector ``c = emb(t) + emb(pooled text) + emb(metadata)`` drives every
  block through adaLN-Zero (shift, scale and a zero-initialised gate per branch);
* each block: self-attention, cross-attention to the projected text tokens, MLP;
* classifier-free guidance: learned null embeddings replace text and/or metadata per sample
  (``drop_text``, ``drop_metadata``), and an empty prompt (all-False mask) uses them too;
* ``block_residuals`` (e.g. from a ControlNet) are added after each of the first blocks.

Pure torch + einops: no Lightning, no file IO, no printing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medsynth.errors import ConfigError
from medsynth.models.embeddings import (AttributeEmbedder, MetadataEmbedder, TimestepEmbedder, encode_attributes,
                                        encode_metadata, normalise_sequence, sincos_position_embedding_3d)
from medsynth.models.text_encoder import TextEmbedding

PATCH_SIZES: tuple[int, ...] = (1, 2, 4)
DEFAULT_MODALITIES: tuple[str, ...] = ("CT", "MR")
DEFAULT_REGIONS: tuple[str, ...] = ("head", "neck", "chest", "abdomen", "pelvis", "extremity", "whole_body")


def _patch3(value: Any) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) not in PATCH_SIZES for v in values):
        raise ConfigError(f"expects patch_size to be one of {PATCH_SIZES} or 3 such values (X, Y, Z), "
                          f"but got patch_size={value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass
class DiTConfig:
    """Shape of :class:`DiT3D`.

    Attributes:
        in_channels: latent channels (the autoencoder's ``latent_channels``); the model
            predicts as many channels (velocity, noise or v).
        patch_size: voxels per token along (X, Y, Z), each 1, 2 or 4. Attention cost grows
            with the square of the token count, so a 32^3 latent wants 2 (4096 tokens) and an
            8^3 demo latent 1 (512 tokens). Anisotropic CT latents may use e.g. (2, 2, 1).
        hidden_size: token width D; a multiple of ``num_heads`` and at least 6 (3 axes of
            sin-cos positions).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        text_dim: size of the text encoder's embeddings (its ``dim``), projected to D.
        qk_norm: RMS-normalise queries and keys per head. Keeps attention logits bounded,
            which prevents the loss spikes of large DiTs trained in bf16 (as in SD3 and Wan).
        modalities: the modality vocabulary of the metadata embedder (order = index).
        regions: the body-region vocabulary (order = index). Values outside these lists
            are refused by :meth:`DiT3D.encode_metadata`, since their embedding was never trained.
        gradient_checkpointing: recompute block activations in the backward pass instead of
            storing them: ~30 % slower steps for much less memory at large grids.
        sequences: the MR sequence vocabulary of the metadata embedder (e.g. T1, T1C, T2, FLAIR;
            dataset spellings such as ``t2w`` or ``T2-FLAIR`` are normalised). Empty: no sequence
            field (the sequence then reaches the model only through the prompt). A record
            without a sequence (CT, or not given) uses a "not given" embedding.
        attributes: names of optional scalar conditions (e.g. the label generator's
            ``volume:liver`` size quantile); empty for the image DiT. Each may be left out per
            sample (NaN), so one model serves any subset; see :class:`AttributeEmbedder`.
    """

    in_channels: int = 8
    patch_size: tuple[int, int, int] = (2, 2, 2)
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 128
    qk_norm: bool = True
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    regions: tuple[str, ...] = DEFAULT_REGIONS
    gradient_checkpointing: bool = False
    sequences: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.patch_size = _patch3(self.patch_size)
        self.modalities = tuple(str(m).upper() for m in self.modalities)
        self.regions = tuple(str(r).lower() for r in self.regions)
        self.attributes = tuple(str(a) for a in self.attributes)
        self.sequences = tuple(normalise_sequence(q) for q in self.sequences)
        if len(set(self.sequences)) != len(self.sequences):
            raise ConfigError(f"expects sequences without repeats (after normalising names), but got "
                              f"sequences={list(self.sequences)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"expects attributes without repeats, but got attributes={list(self.attributes)}")
        for name in ("in_channels", "depth", "num_heads", "text_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expects {name} to be an integer >= 1, but got {name}={value!r}")
        if self.hidden_size < 6 or self.hidden_size % self.num_heads:
            raise ConfigError(f"expects hidden_size >= 6 and a multiple of num_heads, but got "
                              f"hidden_size={self.hidden_size} and num_heads={self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"expects mlp_ratio > 0, but got mlp_ratio={self.mlp_ratio}")
        for name in ("modalities", "regions"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"expects {name} to be a non-empty list without repeats, but got "
                                  f"{name}={list(values)}")

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DiTConfig":
        """Inverse of :meth:`to_dict`; unknown keys (typos) raise :class:`ConfigError`."""
        data = dict(data or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in DiT model config; valid keys are {valid}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with ``x (B, N, D)`` and ``shift, scale (B, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed3d(nn.Module):
    """``(B, C, X, Y, Z)`` -> tokens ``(B, N, D)`` by a Conv3d with stride = kernel = patch."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Returns tokens ``(B, N, D)`` and the token grid ``(gx, gy, gz)``."""
        h = self.proj(x)  # (B, D, gx, gy, gz)
        grid = tuple(h.shape[2:])
        return rearrange(h, "b d x y z -> b (x y z) d"), grid  # type: ignore[return-value]


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` (flash/efficient kernels on GPU).

    Self-attention when called with ``context=None``; cross-attention otherwise (keys and values
    from ``context``, both already of width D).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """``x (B, N, D)``, ``context (B, T, D)``, ``context_mask (B, T)`` bool (True = attend) -> ``(B, N, D)``."""
        source = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, H, N, Dh)
        k = rearrange(self.to_k(source), "b t (h d) -> b h t d", h=self.num_heads)  # (B, H, T, Dh)
        v = rearrange(self.to_v(source), "b t (h d) -> b h t d", h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, T)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        return self.out(rearrange(h, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to text, MLP; each branch modulated and gated by adaLN-Zero.

    The conditioning vector gives a (shift, scale, gate) triple per branch. Gates start at zero
    (see :meth:`DiT3D.initialize_weights`), so a new block is exactly the identity.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        # Affine-free norms: shift and scale come from the condition instead.
        self.norm_self = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, qk_norm)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads, qk_norm)
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        """``x (B, N, D)``, ``c (B, D)``, ``context (B, T, D)``, ``context_mask (B, T)`` -> ``(B, N, D)``."""
        (shift_self, scale_self, gate_self, shift_cross, scale_cross, gate_cross,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=-1)  # 9 x (B, D)
        x = x + gate_self[:, None] * self.self_attn(modulate(self.norm_self(x), shift_self, scale_self))
        x = x + gate_cross[:, None] * self.cross_attn(modulate(self.norm_cross(x), shift_cross, scale_cross),
                                                      context, context_mask)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its patch of output voxels."""

    def __init__(self, dim: int, patch_size: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * patch_size[2] * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``(B, N, D)``, ``(B, D)`` -> ``(B, N, p_x * p_y * p_z * C)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ConditionEmbedder(nn.Module):
    """Text (tokens + pooled) and metadata -> the DiT's conditioning, with learned null embeddings.

    The null embeddings stand for "no text" / "no metadata": condition dropout in training
    teaches the model to use them, and classifier-free guidance uses them as the unconditional
    branch. They live in the model's width D, so they do not depend on the text encoder.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        # Normalise first: frozen encoders' hidden states can be far from unit scale.
        self.text_tokens = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, d))
        self.text_pooled = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, d), nn.SiLU(),
                                         nn.Linear(d, d))
        self.metadata = MetadataEmbedder(d, len(config.modalities), len(config.regions), len(config.sequences))
        # Attributes join the metadata vector, so dropping metadata (guidance) drops them too.
        self.attributes = AttributeEmbedder(len(config.attributes), d) if config.attributes else None
        self.null_text_token = nn.Parameter(torch.zeros(d))
        self.null_text_pooled = nn.Parameter(torch.zeros(d))
        self.null_metadata = nn.Parameter(torch.zeros(d))
        self.text_dim = config.text_dim

    def forward(self, batch_size: int, text: TextEmbedding | None, metadata: Mapping[str, Tensor] | None,
                drop_text: Tensor | None, drop_metadata: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``cond (B, D)`` (pooled text + metadata), ``context (B, T, D)``, ``context_mask (B, T)``."""
        device, dtype = self.null_metadata.device, self.null_metadata.dtype
        no_drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
        drop_text = no_drop if drop_text is None else drop_text.to(device=device, dtype=torch.bool)
        drop_metadata = no_drop if drop_metadata is None else drop_metadata.to(device=device, dtype=torch.bool)

        null_token = self.null_text_token.expand(batch_size, 1, -1)  # (B, 1, D)
        if text is None:
            context, context_mask = null_token, torch.ones(batch_size, 1, dtype=torch.bool, device=device)
            pooled = self.null_text_pooled.expand(batch_size, -1)  # (B, D)
        else:
            if len(text) != batch_size or text.dim != self.text_dim:
                raise ConfigError(f"text embedding has batch {len(text)} and dim {text.dim}, but the model expects "
                                  f"batch {batch_size} and text_dim {self.text_dim}")
            text = text.to(device, dtype)
            # An empty prompt (no real token) is treated as dropped: it gets the null embedding.
            drop_text = drop_text | ~text.mask.any(dim=1)
            context = self.text_tokens(text.tokens)  # (B, T, D)
            context = torch.where(drop_text[:, None, None], null_token, context)
            first_only = torch.zeros_like(text.mask)
            first_only[:, 0] = True
            context_mask = torch.where(drop_text[:, None], first_only, text.mask)  # (B, T)
            pooled = torch.where(drop_text[:, None], self.null_text_pooled.expand(batch_size, -1),
                                 self.text_pooled(text.pooled))
        if metadata is None:
            meta = self.null_metadata.expand(batch_size, -1)
        else:
            meta = self.metadata({k: v.to(device) for k, v in metadata.items()})
            if self.attributes is not None and "attributes" in metadata:
                meta = meta + self.attributes(metadata["attributes"].to(device))
            elif "attributes" in metadata:
                raise ConfigError("attributes were given, but this DiT was built without attributes "
                                  "(DiTConfig.attributes is empty)")
            meta = torch.where(drop_metadata[:, None], self.null_metadata.expand(batch_size, -1), meta)
        return pooled + meta, context, context_mask


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DiT3D(nn.Module):
    """3D diffusion transformer: latent ``(B, C, X, Y, Z)`` + time + conditions -> prediction of the same shape.

    What it predicts (velocity, noise or v) is decided by the training objective
    (:mod:`medsynth.diffusion.objectives`), not by the model.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embed = PatchEmbed3d(config.in_channels, d, config.patch_size)
        self.time_embed = TimestepEmbedder(d)
        self.conditions = ConditionEmbedder(config)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm)
                                    for _ in range(config.depth))
        self.final = FinalLayer(d, config.patch_size, config.out_channels)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linear maps, small normals for embeddings, and zeros where adaLN-Zero needs them.

        Zeroing every adaLN modulation makes each block's gates 0, so every block starts as the
        identity and the network as a whole starts as "patch embedding + final layer"; zeroing
        the final projection makes the initial prediction exactly 0. Peebles & Xie found this
        trains faster and more stably than any other init of the conditioning path.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj  # initialised like a linear map over the flattened patch
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        for linear in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        meta = self.conditions.metadata
        for emb in (meta.modality, meta.region, meta.sex):
            nn.init.normal_(emb.weight, std=0.02)
        for null in (self.conditions.null_text_token, self.conditions.null_text_pooled,
                     self.conditions.null_metadata, meta.age_unknown):
            nn.init.normal_(null, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def encode_metadata(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Per-case metadata dicts -> tensors for :meth:`forward` (ConfigError on unknown values).

        With ``config.attributes``, each record's optional ``"attributes"`` mapping (name ->
        number) becomes ``"attributes": (B, A)`` (NaN = not given); a model without attributes
        refuses records that carry any.
        """
        out = encode_metadata(records, self.config.modalities, self.config.regions, self.config.sequences)
        if self.config.attributes:
            out["attributes"] = encode_attributes(records, self.config.attributes)
        elif any(rec.get("attributes") for rec in records):
            raise ConfigError("metadata carries attributes, but this DiT takes none (DiTConfig.attributes is empty)")
        return out

    def check_latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Validate ``(B, C, X, Y, Z)`` and return the token grid; ConfigError naming what fits."""
        shape = tuple(int(s) for s in shape)
        c, p = self.config.in_channels, self.config.patch_size
        if len(shape) != 5 or shape[1] != c:
            raise ConfigError(f"expects latents of shape (B, {c}, X, Y, Z), but got {shape}")
        spatial = shape[2:]
        if any(s < q or s % q for s, q in zip(spatial, p)):
            fitting = tuple(max(q, (s + q - 1) // q * q) for s, q in zip(spatial, p))
            raise ConfigError(f"latent grid {spatial} is not divisible by the DiT patch_size {p}; pad the "
                              f"latent to {fitting} (the image to a multiple of latent factor x patch size)")
        return tuple(s // q for s, q in zip(spatial, p))  # type: ignore[return-value]

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """``(B, N, p_x p_y p_z C)`` -> ``(B, C, X, Y, Z)``."""
        px, py, pz = self.config.patch_size
        gx, gy, gz = grid
        return rearrange(tokens, "b (x y z) (px py pz c) -> b c (x px) (y py) (z pz)",
                         x=gx, y=gy, z=gz, px=px, py=py, pz=pz)

    def forward(self, x: Tensor, timestep: Tensor | float, text: TextEmbedding | None = None,
                metadata: Mapping[str, Tensor] | None = None, *, drop_text: Tensor | None = None,
                drop_metadata: Tensor | None = None, block_residuals: Sequence[Tensor] | None = None) -> Tensor:
        """Predict the objective's target for noisy latents.

        Args:
            x: ``(B, C, X, Y, Z)`` noisy latents; X, Y, Z multiples of ``patch_size``.
            timestep: ``(B,)`` or a scalar, on the ``[0, 1000)`` training scale.
            text: encoded prompts (``tokens (B, T, text_dim)``), or None for "no text".
            metadata: tensors from :meth:`encode_metadata`, or None for "no metadata".
            drop_text: ``(B,)`` bool; True replaces that sample's text by the null embedding.
            drop_metadata: ``(B,)`` bool; the same for metadata.
            block_residuals: up to ``depth`` tensors ``(B, N, D)`` added to the tokens after
                blocks 0, 1, ... (a ControlNet's outputs; zeros change nothing).

        Returns:
            ``(B, C, X, Y, Z)`` prediction.
        """
        grid = self.check_latent_shape(x.shape)
        batch = x.shape[0]
        tokens, _ = self.patch_embed(x)  # (B, N, D)
        tokens = tokens + sincos_position_embedding_3d(grid, self.config.hidden_size, x.device).to(tokens.dtype)
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        cond, context, context_mask = self.conditions(batch, text, metadata, drop_text, drop_metadata)
        c = self.time_embed(timestep) + cond  # (B, D)
        residuals = self._check_residuals(block_residuals, tokens.shape)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)
            if i < len(residuals):
                tokens = tokens + residuals[i]
        return self.unpatchify(self.final(tokens, c), grid)

    def _check_residuals(self, residuals: Sequence[Tensor] | None, token_shape: torch.Size) -> Sequence[Tensor]:
        if residuals is None:
            return ()
        if len(residuals) > self.config.depth:
            raise ConfigError(f"got {len(residuals)} block_residuals, but the DiT has only "
                              f"depth={self.config.depth} blocks")
        for i, r in enumerate(residuals):
            if tuple(r.shape) != tuple(token_shape):
                raise ConfigError(f"block_residuals[{i}] has shape {tuple(r.shape)}, but the tokens are "
                                  f"{tuple(token_shape)} (B, N, D)")
        return residuals

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Presets: tiny for tests and the CPU demo (8^3 latents, patch 1 -> 512 tokens); S/B/L follow
# DiT-S/B/L widths with patch 2 (a 32^3 latent -> 4096 tokens).
# ---------------------------------------------------------------------------------------------

# The presets' MR sequence field (DiTConfig.sequences); the dataclass default stays empty, so an
# export written before the field existed loads with exactly its own state dict.
PRESET_SEQUENCES: tuple[str, ...] = ("T1", "T1C", "T2", "FLAIR")
PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(patch_size=(1, 1, 1), hidden_size=128, depth=4, num_heads=4, text_dim=64,
                      sequences=PRESET_SEQUENCES),
    "s": DiTConfig(patch_size=(2, 2, 2), hidden_size=384, depth=12, num_heads=6, text_dim=128,
                   sequences=PRESET_SEQUENCES),
    "b": DiTConfig(patch_size=(2, 2, 2), hidden_size=768, depth=12, num_heads=12, text_dim=768,
                   gradient_checkpointing=True, sequences=PRESET_SEQUENCES),
    "l": DiTConfig(patch_size=(2, 2, 2), hidden_size=1024, depth=24, num_heads=16, text_dim=768,
                   gradient_checkpointing=True, sequences=PRESET_SEQUENCES),
}


def preset(name: str, **overrides: Any) -> DiTConfig:
    """A copy of a named preset (``tiny``, ``s``, ``b``, ``l``; case-insensitive) with ``overrides``."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown DiT preset {name!r}; valid presets are {sorted(PRESETS)}")
    return DiTConfig.from_dict({**PRESETS[key].to_dict(), **overrides})


__all__ = ["DiTConfig", "DiT3D", "DiTBlock", "Attention", "PatchEmbed3d", "FinalLayer", "ConditionEmbedder",
           "PRESETS", "preset", "modulate"]
