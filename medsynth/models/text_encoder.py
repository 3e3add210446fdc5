"""Text encoders behind one interface: prompts -> token embeddings + mask + pooled vector.

Two implementations:

* :class:`HFTextEncoder`: a frozen Hugging Face encoder (e.g. CXR-BERT, BiomedCLIP's text
  tower) from a local folder or a hub id that is already in the local Hugging Face cache.
  Nothing downloads (``local_files_only=True``). Being frozen, its embeddings are computed once
  and stored in the latent cache.
* :class:`VocabTextEncoder`: a small transformer over the dataset's own prompt vocabulary,
  trained together with the DiT. It needs no weights, so the demo and tests use it.

Both return a :class:`TextEmbedding`. An empty prompt gives a row whose mask is all False and
whose pooled vector is zero; the DiT replaces such rows with its learned null embeddings,
exactly as for condition dropout. Prompts longer than ``max_length`` tokens are truncated with
a warning.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medsynth.errors import ConfigError


@dataclass
class TextEmbedding:
    """Encoded prompts.

    Attributes:
        tokens: ``(B, T, D)`` per-token embeddings (zeros where ``mask`` is False).
        mask: ``(B, T)`` bool, True for real tokens. A row with no True means "no prompt".
        pooled: ``(B, D)`` one vector per prompt (zeros for an empty prompt).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        b, t, d = self.tokens.shape
        if tuple(self.mask.shape) != (b, t) or tuple(self.pooled.shape) != (b, d):
            raise ConfigError(f"text embedding shapes disagree: tokens {tuple(self.tokens.shape)} (B, T, D), "
                              f"mask {tuple(self.mask.shape)} (B, T), pooled {tuple(self.pooled.shape)} (B, D)")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbedding":
        """Move tokens/pooled to ``device``/``dtype`` (the mask stays bool)."""
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                             self.pooled.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        """Concatenate along the batch, padding to the longest token count."""
        length = max(p.tokens.shape[1] for p in parts)
        tokens, masks = [], []
        for p in parts:
            extra = length - p.tokens.shape[1]
            tokens.append(nn.functional.pad(p.tokens, (0, 0, 0, extra)))
            masks.append(nn.functional.pad(p.mask, (0, extra), value=False))
        return TextEmbedding(torch.cat(tokens), torch.cat(masks), torch.cat([p.pooled for p in parts]))


class TextEncoder(nn.Module):
    """Interface: ``encode(prompts) -> TextEmbedding`` with tokens of size :attr:`dim`.

    Attributes:
        dim: embedding size D of tokens and pooled vector.
        max_length: longest token sequence; longer prompts are truncated with a warning.
        trainable: False for frozen encoders, whose outputs may be precomputed and cached.
    """

    dim: int
    max_length: int
    trainable: bool

    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        """Encode a batch of prompts (see :class:`TextEmbedding` for shapes)."""
        raise NotImplementedError

    def forward(self, prompts: Sequence[str]) -> TextEmbedding:
        return self.encode(prompts)

    def config(self) -> dict[str, Any]:
        """JSON-friendly description to rebuild this encoder (:func:`build_text_encoder`)."""
        raise NotImplementedError


def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        raise ConfigError(f"expects a list of prompts, but got one string {prompts[:40]!r}; wrap it in a list")
    out = []
    for p in prompts:
        if p is None:
            p = ""
        if not isinstance(p, str):
            raise ConfigError(f"prompts must be strings, but got {type(p).__name__} {p!r}")
        out.append(p.strip())
    if not out:
        raise ConfigError("expects at least one prompt (use \"\" for an unconditional sample)")
    return out


def _warn_truncated(prompt: str, length: int, max_length: int) -> None:
    warnings.warn(f"prompt {prompt[:60]!r} has {length} tokens, more than max_length={max_length}; "
                  f"it was truncated to {max_length} tokens", stacklevel=3)


def _blank_empty(embedding: TextEmbedding, prompts: Sequence[str]) -> TextEmbedding:
    """Empty prompts -> all-False mask and zero vectors (the DiT then uses its null embedding)."""
    empty = torch.tensor([not p for p in prompts], device=embedding.mask.device)  # (B,)
    if not bool(empty.any()):
        return embedding
    keep = (~empty).to(embedding.tokens.dtype)
    return TextEmbedding(embedding.tokens * keep[:, None, None], embedding.mask & ~empty[:, None],
                         embedding.pooled * keep[:, None])


# ---------------------------------------------------------------------------------------------
# Frozen Hugging Face encoder
# ---------------------------------------------------------------------------------------------


class HFTextEncoder(TextEncoder):
    """A frozen Hugging Face text encoder from a local folder, or a hub id already cached locally.

    Args:
        name_or_path: a folder with ``config.json``, weights and tokenizer files, or a hub id
            (resolved only from the local Hugging Face cache; medsynth never downloads).
        max_length: token limit (capped at the tokenizer's own ``model_max_length``).
        pooling: "mean" (mask-weighted mean of the last hidden states; works for any encoder)
            or "cls" (first token, the BERT convention).
        device: where the encoder runs.

    Raises:
        ConfigError: the model or tokenizer cannot be found locally, naming what was tried.
    """

    trainable = False

    def __init__(self, name_or_path: str | Path, max_length: int = 128, pooling: str = "mean",
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # heavy import, only for this path

        if pooling not in ("mean", "cls"):
            raise ConfigError(f"expects pooling 'mean' or 'cls', but got pooling={pooling!r}")
        source = str(name_or_path)
        local = Path(source).expanduser()
        if local.exists():
            source = str(local)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise ConfigError(
                f"cannot load text encoder {str(name_or_path)!r} from a local folder or the local Hugging Face "
                f"cache (local_files_only=True: medsynth never downloads); give a folder with config.json, "
                f"weights and tokenizer files, or fetch it first with `hf download {name_or_path}` ({first})"
            ) from None
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(device)
        self.name_or_path = str(name_or_path)
        self.pooling = pooling
        self.dim = int(self.model.config.hidden_size)
        limit = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = int(min(max_length, limit))

    def train(self, mode: bool = True) -> "HFTextEncoder":
        """Stays in eval mode: the encoder is frozen (dropout would make cached embeddings random)."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        prompts = _check_prompts(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        for p, n in zip(prompts, lengths):
            if n > self.max_length:
                _warn_truncated(p, n, self.max_length)
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        run_device = next(self.model.parameters()).device
        ids = batch["input_ids"].to(run_device)
        mask = batch["attention_mask"].to(run_device).bool()  # (B, T)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
        hidden = hidden * mask[..., None]
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, D) BERT's [CLS] position
        else:
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        out = _blank_empty(TextEmbedding(hidden.float(), mask, pooled.float()), prompts)
        return out.to(device) if device is not None else out

    def config(self) -> dict[str, Any]:
        return {"kind": "hf", "name_or_path": self.name_or_path, "max_length": self.max_length,
                "pooling": self.pooling}


# ---------------------------------------------------------------------------------------------
# Learned encoder over the dataset's prompt vocabulary
# ---------------------------------------------------------------------------------------------

PAD, UNK = "[PAD]", "[UNK]"
# Words, single digits (so "63" and "14" are read digit by digit and unseen numbers still make
# sense) and punctuation.
_TOKEN_PATTERN = re.compile(r"[^\W\d_]+|\d|[^\w\s]")
DIGITS = tuple(str(d) for d in range(10))


def tokenize_prompt(prompt: str) -> list[str]:
    """Lower-case word/digit/punctuation tokens: ``"CT abdomen, 63"`` -> ``["ct", "abdomen", ",", "6", "3"]``."""
    return _TOKEN_PATTERN.findall(prompt.lower())


def build_vocabulary(prompts: Iterable[str], min_count: int = 1) -> list[str]:
    """Word-level vocabulary of a prompt corpus: ``[PAD], [UNK]``, the digits, then words by frequency.

    Args:
        prompts: the training prompts (e.g. ``Case.prompt`` of every train case).
        min_count: words seen fewer times map to ``[UNK]``.
    """
    counts = Counter(tok for p in prompts if p for tok in tokenize_prompt(p))
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in DIGITS),
                   key=lambda w: (-counts[w], w))
    return [PAD, UNK, *DIGITS, *words]


class VocabTextEncoder(TextEncoder):
    """Small learned transformer over a fixed word vocabulary; trained with the DiT, no weights needed.

    Args:
        vocabulary: token list from :func:`build_vocabulary` (index = token id; ``[PAD]`` first).
        dim: embedding size D.
        depth: transformer layers.
        num_heads: attention heads (``dim`` must be a multiple).
        max_length: token limit; also the size of the learned position table.
    """

    trainable = True

    def __init__(self, vocabulary: Sequence[str], dim: int = 128, depth: int = 2, num_heads: int = 4,
                 max_length: int = 48) -> None:
        super().__init__()
        vocabulary = list(vocabulary)
        if len(vocabulary) < 2 or vocabulary[:2] != [PAD, UNK]:
            raise ConfigError(f"expects a vocabulary starting with {[PAD, UNK]} (see build_vocabulary), but got "
                              f"{vocabulary[:4]}")
        if dim < 1 or dim % num_heads:
            raise ConfigError(f"expects dim to be a multiple of num_heads, but got dim={dim} and num_heads={num_heads}")
        if depth < 0 or max_length < 1:
            raise ConfigError(f"expects depth >= 0 and max_length >= 1, but got depth={depth}, max_length={max_length}")
        self.vocabulary = vocabulary
        self.index = {tok: i for i, tok in enumerate(vocabulary)}
        self.dim, self.depth, self.num_heads, self.max_length = int(dim), int(depth), int(num_heads), int(max_length)
        self.token_embedding = nn.Embedding(len(vocabulary), dim, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else None
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_prompts(cls, prompts: Iterable[str], min_count: int = 1, **kwargs: Any) -> "VocabTextEncoder":
        """Build the vocabulary from ``prompts`` and a fresh encoder over it."""
        return cls(build_vocabulary(prompts, min_count), **kwargs)

    def token_ids(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> ``(ids (B, T) long, mask (B, T) bool)``, T >= 1; truncates with a warning."""
        rows = []
        for p in prompts:
            toks = tokenize_prompt(p)
            if len(toks) > self.max_length:
                _warn_truncated(p, len(toks), self.max_length)
                toks = toks[: self.max_length]
            rows.append([self.index.get(t, 1) for t in toks])  # 1 = [UNK]
        length = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask

    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        prompts = _check_prompts(prompts)
        ids, mask = self.token_ids(prompts)
        ids, mask = ids.to(self.position_embedding.device), mask.to(self.position_embedding.device)
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, D)
        if self.layers is not None:
            # An empty prompt would mask every key (NaN attention): let it attend to its padding
            # token here; _blank_empty removes the row afterwards.
            attend = mask.clone()
            attend[:, 0] = True
            h = self.layers(h, src_key_padding_mask=~attend)
        h = self.norm(h) * mask[..., None]
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        out = _blank_empty(TextEmbedding(h, mask, pooled), prompts)
        return out.to(device) if device is not None else out

    def config(self) -> dict[str, Any]:
        return {"kind": "vocab", "vocabulary": list(self.vocabulary), "dim": self.dim, "depth": self.depth,
                "num_heads": self.num_heads, "max_length": self.max_length}


TEXT_ENCODER_KINDS: tuple[str, ...] = ("vocab", "hf")


def build_text_encoder(config: dict[str, Any], prompts: Iterable[str] | None = None) -> TextEncoder:
    """Build an encoder from a config dict (``kind`` = "vocab" or "hf", then its arguments).

    For ``kind: vocab`` without a ``vocabulary``, it is built from ``prompts``.

    Raises:
        ConfigError: unknown kind or keys, or a vocab encoder with neither vocabulary nor prompts.
    """
    config = dict(config)
    kind = config.pop("kind", "vocab")
    if kind == "vocab":
        valid = ("vocabulary", "dim", "depth", "num_heads", "max_length", "min_count")
        _check_keys(config, valid, kind)
        min_count = int(config.pop("min_count", 1))
        if config.get("vocabulary") is None:
            if prompts is None:
                raise ConfigError("a 'vocab' text encoder needs a vocabulary or the training prompts to build one")
            config["vocabulary"] = build_vocabulary(prompts, min_count)
        return VocabTextEncoder(**config)
    if kind == "hf":
        _check_keys(config, ("name_or_path", "max_length", "pooling", "device"), kind)
        if "name_or_path" not in config:
            raise ConfigError("an 'hf' text encoder needs name_or_path (a local folder or a cached hub id)")
        return HFTextEncoder(**config)
    raise ConfigError(f"unknown text encoder kind {kind!r}; valid kinds are {list(TEXT_ENCODER_KINDS)}")


def _check_keys(config: dict[str, Any], valid: Sequence[str], kind: str) -> None:
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for text encoder kind {kind!r}; valid keys are {list(valid)}")


__all__ = ["TextEmbedding", "TextEncoder", "HFTextEncoder", "VocabTextEncoder", "build_vocabulary",
           "tokenize_prompt", "build_text_encoder", "TEXT_ENCODER_KINDS"]
