"""Classifier-free guidance (Ho & Salimans 2022) and the condition dropout that trains it.

The null embeddings themselves are parameters of the DiT (``DiT3D.conditions``); this module
only decides *which* samples use them in training and how the two predictions are combined at
sampling time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from medsynth.errors import ConfigError

if TYPE_CHECKING:  # the text encoder's module imports torch models; only its type is needed here
    from medsynth.models.text_encoder import TextEmbedding


def classifier_free_guidance(conditional: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """``uncond + s * (cond - uncond)``; ``s = 1`` returns the conditional prediction exactly.

    Works for any prediction type (velocity, noise, v), since it is linear in the prediction.
    Shapes: two ``(B, C, X, Y, Z)`` tensors -> ``(B, C, X, Y, Z)``.
    """
    if guidance_scale == 1.0:
        return conditional
    return unconditional + guidance_scale * (conditional - unconditional)


def dual_guidance(full: Tensor, mask_only: Tensor, unconditional: Tensor, text_scale: float,
                  mask_scale: float) -> Tensor:
    """Compose text and mask guidance (as InstructPix2Pix composes image and text guidance).

    ``uncond + s_mask (mask_only - uncond) + s_text (full - mask_only)``: the mask term pushes
    towards the layout, the text term towards the described appearance given that layout. Both
    scales 1 return ``full`` exactly. Shapes: three ``(B, C, X, Y, Z)`` -> ``(B, C, X, Y, Z)``.
    """
    if text_scale == 1.0 and mask_scale == 1.0:
        return full
    return unconditional + mask_scale * (mask_only - unconditional) + text_scale * (full - mask_only)


def guided_text(text: TextEmbedding | None, negative_text: TextEmbedding | None, copies: int,
                drop: Tensor) -> tuple[TextEmbedding | None, Tensor]:
    """The text of ``copies`` guidance branches and its ``(copies * B,)`` drop mask.

    ``drop`` is the branches' drop mask (True where the condition is dropped). Without a negative
    prompt every branch holds ``text`` and the text follows ``drop``; with one, the branches after
    the first hold ``negative_text`` (batch B) instead and nothing is dropped: it stands where
    the null text embedding would (diffusers' ``negative_prompt``).
    """
    from medsynth.models.text_encoder import TextEmbedding

    if text is None:
        return None, drop
    negative = negative_text is not None
    parts = [text] + [negative_text if negative else text] * (copies - 1)
    return TextEmbedding.cat(parts), (torch.zeros_like(drop) if negative else drop)


def _check_rate(name: str, rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"expects 0 <= {name} <= 1, but got {name}={rate}")
    return float(rate)


def sample_condition_dropout(batch_size: int, text_drop_rate: float, metadata_drop_rate: float,
                             generator: torch.Generator | None = None,
                             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Which samples of a training batch lose their text / metadata (independent draws).

    Separate rates let the model learn both "text only" and "metadata only" generation, so the
    two can be guided or left out independently at sampling time (typical: 0.1 each).

    Returns:
        ``drop_text (B,)`` and ``drop_metadata (B,)`` bool tensors for :meth:`DiT3D.forward`.
    """
    text_drop_rate = _check_rate("text_drop_rate", text_drop_rate)
    metadata_drop_rate = _check_rate("metadata_drop_rate", metadata_drop_rate)
    gen_device = generator.device if generator is not None else "cpu"
    draws = torch.rand(2, batch_size, generator=generator, device=gen_device)  # (2, B)
    text_draw, metadata_draw = draws.unbind(0)
    return (text_draw < text_drop_rate).to(device), (metadata_draw < metadata_drop_rate).to(device)


def forget_sequence(metadata: dict[str, Tensor], rate: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Metadata tensors with the MR sequence set to "not given" (0) for a random share of samples.

    A dataset whose cases all name their sequence would otherwise never show the model the
    "not given" (zero) sequence vector that a prompt naming no sequence samples with. Draws nothing when no sample
    has a sequence (CT batches), so their training is unchanged.

    Args:
        metadata: tensors from :func:`~medsynth.models.embeddings.encode_metadata`; ``"sequence"``
            is ``(B,)`` long.
        rate: share of samples that lose their sequence (the metadata drop rate).

    Returns:
        A new dict; the input is not modified.
    """
    rate = _check_rate("metadata_drop_rate", rate)
    sequence = metadata.get("sequence")
    if sequence is None or rate == 0 or not bool((sequence > 0).any()):
        return metadata
    draw = torch.rand(sequence.shape[0], generator=generator,
                      device=generator.device if generator is not None else "cpu").to(sequence.device)
    return {**metadata, "sequence": torch.where(draw < rate, torch.zeros_like(sequence), sequence)}


__all__ = ["classifier_free_guidance", "dual_guidance", "guided_text", "sample_condition_dropout", "forget_sequence"]
