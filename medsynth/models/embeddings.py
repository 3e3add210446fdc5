"""Embeddings of the latent DiT's inputs: timesteps, 3D token positions and case metadata.

* :class:`TimestepEmbedder`: sinusoidal features of the diffusion time -> MLP.
* :func:`sincos_position_embedding_3d`: fixed sin-cos features computed from the token grid on
  every call, so any grid works (non-cubic, and a different size at sampling than in training).
* :class:`MetadataEmbedder`: modality, body region, voxel spacing and the optional age, sex and
  MR sequence of a case, as one vector; :func:`encode_metadata` turns the dataset's per-case metadata dicts
  into the tensors it reads and refuses values it does not know, naming the valid ones.

Pure torch: no file IO, no printing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medsynth.errors import ConfigError

# Sex codes: index 0 means "not given", so the field stays optional without a separate flag.
SEX_VALUES: tuple[str, ...] = ("unknown", "female", "male")
_SEX_ALIASES: dict[str, str] = {"f": "female", "female": "female", "woman": "female",
                                "m": "male", "male": "male", "man": "male",
                                "unknown": "unknown", "u": "unknown", "": "unknown"}
# Ages are divided by this before embedding, so that adult ages land in [0, 1].
AGE_SCALE_YEARS = 100.0
METADATA_KEYS: tuple[str, ...] = ("modality", "region", "spacing", "sex", "age", "age_known", "sequence")
# MR sequence names as datasets spell them (nnU-Net channel names, BraTS 2023's t1n/t1c/t2w/t2f,
# BIDS suffixes) -> the canonical name a DiT's ``sequences`` vocabulary holds. Names not listed
# are upper-cased, so a vocabulary may hold any other sequence (e.g. "DWI") as it is written.
SEQUENCE_ALIASES: dict[str, str] = {
    "t1": "T1", "t1w": "T1", "t1n": "T1", "t1-native": "T1",
    "t1c": "T1C", "t1ce": "T1C", "t1gd": "T1C", "t1-gd": "T1C", "t1-ce": "T1C", "t1post": "T1C",
    "t2": "T2", "t2w": "T2",
    "flair": "FLAIR", "t2-flair": "FLAIR", "t2flair": "FLAIR", "t2f": "FLAIR",
    "pd": "PD", "pdw": "PD",
}


def sinusoidal_features(values: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sin-cos features of real values, as in "Attention is all you need".

    Args:
        values: ``(N,)`` real numbers (timesteps, positions).
        dim: feature size; an odd size gets one zero column at the end.
        max_period: longest wavelength, in the units of ``values``.

    Returns:
        ``(N, dim)`` features ``[cos(v * f_k), sin(v * f_k)]`` for geometric frequencies f_k.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None, :]  # (N, half)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


def sincos_position_embedding_3d(grid: Sequence[int], dim: int, device: torch.device | str | None = None) -> Tensor:
    """Fixed 3D positional encoding for a token grid ``(gx, gy, gz)``.

    Each axis gets its own ``2 * (dim // 6)`` sin-cos channels of its integer token index; any
    remaining channels (when ``dim`` is not a multiple of 6) stay zero. Computed from the grid,
    so it is defined for every grid size; positions are in token units, so a larger grid at the
    same spacing extends the field of view instead of squeezing the anatomy.

    Returns:
        ``(gx * gy * gz, dim)``, tokens in ``x``-major order (the order of :func:`einops`
        ``"b d x y z -> b (x y z) d"``).
    """
    gx, gy, gz = (int(g) for g in grid)
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ConfigError(f"expects hidden_size >= 6 for a 3D positional encoding, but got dim={dim}")
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (gx, gy, gz)]
    px, py, pz = torch.meshgrid(*axes, indexing="ij")  # each (gx, gy, gz)
    parts = [sinusoidal_features(p.reshape(-1), per_axis) for p in (px, py, pz)]  # 3 x (N, per_axis)
    pad = dim - 3 * per_axis
    if pad:
        parts.append(torch.zeros(gx * gy * gz, pad, device=device))
    return torch.cat(parts, dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Diffusion time -> ``(B, D)`` vector.

    Timesteps are on the scheduler's training scale, ``[0, num_train_timesteps)`` (1000 for
    every objective here: rectified flow passes ``sigma * 1000``), so one embedder serves all.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, timestep: Tensor) -> Tensor:
        """``(B,)`` float or int timesteps -> ``(B, D)``."""
        return self.mlp(sinusoidal_features(timestep, self.frequency_size).to(self.mlp[0].weight.dtype))


def _normalise_sex(value: Any, case: int) -> int:
    if value is None:
        return 0
    key = str(value).strip().lower()
    if key not in _SEX_ALIASES:
        raise ConfigError(f"unknown sex {value!r} in metadata of case {case}; valid values are "
                          f"'female'/'F', 'male'/'M' or missing")
    return SEX_VALUES.index(_SEX_ALIASES[key])


def _spacing(value: Any, case: int) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"metadata of case {case} needs 'spacing' as 3 positive numbers in mm (X, Y, Z), "
                          f"but got spacing={value!r}")
    return out


def normalise_sequence(value: Any) -> str:
    """An MR sequence name as written in a dataset (``"t2w"``, ``"T2-FLAIR"``) -> its canonical
    name (``"T2"``, ``"FLAIR"``); see :data:`SEQUENCE_ALIASES`."""
    key = re.sub(r"[\s_]+", "-", str(value).strip().lower())
    return SEQUENCE_ALIASES.get(key, SEQUENCE_ALIASES.get(key.replace("-", ""), str(value).strip().upper()))


# longest names first, so "t2-flair" is read as one name and not as "t2" and "flair"
_SEQUENCE_PATTERN = re.compile(r"(?<![a-z0-9])(" + "|".join(
    re.escape(k).replace("\\-", "[- ]?") for k in sorted(SEQUENCE_ALIASES, key=len, reverse=True)) + r")(?![a-z0-9])")


def sequence_named_in(text: str | None, sequences: Sequence[str]) -> str | None:
    """The one sequence of ``sequences`` that ``text`` (a prompt) names, else None.

    ``"MR head T2, tumour 30 mm"`` -> ``"T2"``; a prompt naming none, or two different ones
    (``"T1 and T2"``), gives None: the model's "sequence not given" embedding.
    """
    if not text or not sequences:
        return None
    known = {normalise_sequence(s) for s in sequences}
    found = {normalise_sequence(m.group(1)) for m in _SEQUENCE_PATTERN.finditer(text.lower())} & known
    return found.pop() if len(found) == 1 else None


def encode_metadata(records: Sequence[Mapping[str, Any]], modalities: Sequence[str],
                    regions: Sequence[str], sequences: Sequence[str] = ()) -> dict[str, Tensor]:
    """Per-case metadata dicts -> the tensors :class:`MetadataEmbedder` reads.

    Each record needs ``modality`` (one of ``modalities``, case-insensitive), ``region`` (one of
    ``regions``, case-insensitive) and ``spacing`` (3 mm values); ``sex`` and ``age`` are
    optional (missing or None means unknown). ``sequence`` (the MR sequence) is optional too
    and read only when ``sequences`` is given: its name is normalised
    (:func:`normalise_sequence`) and must then be one of them. Other keys are ignored.

    Returns:
        ``{"modality": (B,) long, "region": (B,) long, "spacing": (B, 3) float,
        "sex": (B,) long (0 = unknown), "age": (B,) float years, "age_known": (B,) bool,
        "sequence": (B,) long (0 = not given, i = sequences[i - 1]; all 0 without sequences)}``.

    Raises:
        ConfigError: a missing field or an unknown value, naming the valid values.
    """
    mods = [m.upper() for m in modalities]
    regs = [r.lower() for r in regions]
    out: dict[str, list[Any]] = {key: [] for key in METADATA_KEYS}
    for i, rec in enumerate(records):
        for key in ("modality", "region", "spacing"):
            if rec.get(key) is None:
                raise ConfigError(f"metadata of case {i} has no {key!r}; conditioning needs modality, region "
                                  f"and spacing (sex and age are optional)")
        modality, region = str(rec["modality"]).upper(), str(rec["region"]).lower()
        if modality not in mods:
            raise ConfigError(f"unknown modality {rec['modality']!r} in metadata of case {i}; valid modalities "
                              f"are {mods} (set DiTConfig.modalities to train on others)")
        if region not in regs:
            raise ConfigError(f"unknown body region {rec['region']!r} in metadata of case {i}; valid regions "
                              f"are {regs} (set DiTConfig.regions to train on others)")
        age = rec.get("age")
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age <= 130):
            raise ConfigError(f"age must be a number of years in [0, 130] or missing, but got age={age!r} "
                              f"in metadata of case {i}")
        out["modality"].append(mods.index(modality))
        out["region"].append(regs.index(region))
        out["spacing"].append(_spacing(rec["spacing"], i))
        out["sex"].append(_normalise_sex(rec.get("sex"), i))
        out["age"].append(0.0 if age is None else float(age))
        out["age_known"].append(age is not None)
        out["sequence"].append(_sequence_index(rec.get("sequence"), sequences, i))
    return {
        "modality": torch.tensor(out["modality"], dtype=torch.long),
        "region": torch.tensor(out["region"], dtype=torch.long),
        "spacing": torch.tensor(out["spacing"], dtype=torch.float32).reshape(-1, 3),
        "sex": torch.tensor(out["sex"], dtype=torch.long),
        "age": torch.tensor(out["age"], dtype=torch.float32),
        "age_known": torch.tensor(out["age_known"], dtype=torch.bool),
        "sequence": torch.tensor(out["sequence"], dtype=torch.long),
    }


def _sequence_index(value: Any, sequences: Sequence[str], case: int) -> int:
    """0 for "not given" (or a model without sequences), else 1 + the position in ``sequences``."""
    if value is None or not sequences or (isinstance(value, str) and not value.strip()):
        return 0
    known = [normalise_sequence(s) for s in sequences]
    name = normalise_sequence(value)
    if name not in known:
        raise ConfigError(f"unknown MR sequence {value!r} in metadata of case {case}; valid sequences are "
                          f"{known} (set DiTConfig.sequences to train on others)")
    return 1 + known.index(name)


class MetadataEmbedder(nn.Module):
    """Case metadata -> ``(B, D)`` vector: a sum of one embedding per field, then an MLP.

    Categorical fields (modality, region, sex incl. "unknown") are looked up; spacing enters as
    log-millimetres (spacings span 0.3-5 mm, and what matters is their ratio); age as
    ``age / 100`` times a learned direction plus a learned "age unknown" vector. With
    ``num_sequences > 0`` the MR sequence is looked up too (row 0, "not given", is a fixed zero
    vector), so the sequence reaches every block's adaLN directly rather than only through the
    prompt.
    """

    def __init__(self, hidden_size: int, num_modalities: int, num_regions: int, num_sequences: int = 0) -> None:
        super().__init__()
        self.modality = nn.Embedding(num_modalities, hidden_size)
        self.region = nn.Embedding(num_regions, hidden_size)
        self.sex = nn.Embedding(len(SEX_VALUES), hidden_size)
        self.spacing = nn.Linear(3, hidden_size)
        self.age = nn.Linear(1, hidden_size)
        self.age_unknown = nn.Parameter(torch.zeros(hidden_size))
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        # Zero-initialised without the global random stream, and row 0 ("not given") stays zero
        # (padding_idx: no gradient): every other layer is initialised and trained exactly as in a
        # model without the field, so CT cases (no sequence) train bit for bit as before.
        self.sequence = (nn.Embedding(num_sequences + 1, hidden_size, padding_idx=0,
                                      _weight=torch.zeros(num_sequences + 1, hidden_size))
                         if num_sequences else None)

    def forward(self, metadata: Mapping[str, Tensor]) -> Tensor:
        """Tensors from :func:`encode_metadata` (on the model's device) -> ``(B, D)``."""
        needed = METADATA_KEYS if self.sequence is not None else tuple(k for k in METADATA_KEYS if k != "sequence")
        missing = [k for k in needed if k not in metadata]
        if missing:
            raise ConfigError(f"metadata tensors lack {missing}; build them with encode_metadata()")
        dtype = self.spacing.weight.dtype
        age = self.age((metadata["age"].to(dtype) / AGE_SCALE_YEARS)[:, None])  # (B, D)
        known = metadata["age_known"].to(torch.bool)[:, None]  # (B, 1)
        age = torch.where(known, age, self.age_unknown.to(dtype).expand_as(age))
        h = (self.modality(metadata["modality"]) + self.region(metadata["region"])
             + self.sex(metadata["sex"]) + self.spacing(torch.log(metadata["spacing"].to(dtype))) + age)
        if self.sequence is not None:
            h = h + self.sequence(metadata["sequence"])
        return self.mlp(h)  # (B, D)


def encode_attributes(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Tensor:
    """Each record's optional ``"attributes"`` mapping (name -> number) -> ``(B, A)`` float32.

    Attributes a record does not give are NaN ("not given"); :class:`AttributeEmbedder` reads
    that as unknown.

    Raises:
        ConfigError: an attribute name outside ``names`` (listing them) or a non-finite value.
    """
    out = torch.full((len(records), len(names)), float("nan"), dtype=torch.float32)
    for i, rec in enumerate(records):
        given = rec.get("attributes") or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"attributes of case {i} must map names to numbers, but got {given!r}")
        for name, value in given.items():
            if name not in names:
                raise ConfigError(f"unknown attribute {name!r} in case {i}; the model was trained on "
                                  f"{list(names)}")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"attribute {name!r} of case {i} must be a finite number, but got {value!r}")
            out[i, list(names).index(name)] = float(value)
    return out


class AttributeEmbedder(nn.Module):
    """Optional scalar attributes ``(B, A)`` (NaN = not given) -> ``(B, D)``.

    Each attribute enters as its value (0 when not given) plus a learned "given" direction, so
    a missing attribute is distinguishable from a given value of 0. Training drops attributes at
    random, so any subset can be given at sampling time.
    """

    def __init__(self, num_attributes: int, hidden_size: int) -> None:
        super().__init__()
        self.value = nn.Linear(num_attributes, hidden_size)
        self.given = nn.Linear(num_attributes, hidden_size)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, attributes: Tensor) -> Tensor:
        """``(B, A)`` float with NaN for "not given" -> ``(B, D)``."""
        dtype = self.value.weight.dtype
        given = ~torch.isnan(attributes)  # (B, A)
        values = torch.where(given, attributes, torch.zeros_like(attributes)).to(dtype)
        return self.mlp(self.value(values) + self.given(given.to(dtype)))


__all__ = ["SEX_VALUES", "METADATA_KEYS", "SEQUENCE_ALIASES", "normalise_sequence", "sequence_named_in", "sinusoidal_features", "sincos_position_embedding_3d",
           "TimestepEmbedder", "MetadataEmbedder", "encode_metadata", "encode_attributes", "AttributeEmbedder"]
