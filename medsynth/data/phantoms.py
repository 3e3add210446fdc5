"""Procedural phantoms: medsynth's embedded default dataset.

Two families, each a labelled 3D volume with a text prompt and metadata:

- ``ct``: an abdomen in Hounsfield units (body, muscle, liver, spleen, kidneys, spine, aorta and,
  rarely, liver lesions), non-contrast or portal-venous;
- ``mr``: a head in arbitrary units (scalp, skull, CSF, grey and white matter, ventricles and,
  rarely, tumours with a core and an oedema rim), as T1, T2 or FLAIR.

Everything is drawn from one integer seed, so a case can be regenerated from its metadata. Case
``i`` of :func:`generate_phantoms` uses a seed derived from ``(seed, i)`` alone, so it does not
change when more or fewer cases are asked for. See ``docs/phantoms.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsynth.data.phantom_shapes import Grid
from medsynth.data.phantoms_ct import CT_FOV_MM, CT_LABELS, CT_LESION_SIZE_MM, generate_ct
from medsynth.data.phantoms_mr import MR_FOV_MM, MR_LABELS, MR_TUMOUR_SIZE_MM, generate_mr
from medsynth.errors import ConfigError
from medsynth.io.volume import Volume, VolumeMetadata

__all__ = ["CT_LABELS", "MR_LABELS", "MODALITIES", "PhantomCase", "generate_phantom",
           "generate_phantoms", "phantom_case_id", "phantom_case_seed", "phantom_labels",
           "phantom_lesion_planned", "NOISE_MODELS", "phantom_noise_scale"]

MODALITIES: tuple[str, ...] = ("ct", "mr")
MIN_SIZE, MAX_SIZE = 16, 512
# Default lesion (CT) / tumour core (MR) diameter range in mm, per modality.
LESION_SIZE_MM: dict[str, tuple[float, float]] = {"ct": CT_LESION_SIZE_MM, "mr": MR_TUMOUR_SIZE_MM}
MAX_LESION_MM = 80.0
# "fixed": the drawn noise SD is per voxel at any grid (CT 8-20 HU, MR 1.5-4 % of the signal).
# "scanner": that SD is drawn for 1 mm^3 voxels and scaled to the grid's voxel volume V the way
# a scanner's is at a fixed dose / acquisition time: CT quantum noise as 1/sqrt(V) (the photons
# behind a voxel grow with V), MR thermal noise as 1/V (signal grows with V, noise does not).
NOISE_MODELS: tuple[str, ...] = ("fixed", "scanner")
NOISE_REFERENCE_VOXEL_MM3 = 1.0


@dataclass
class PhantomCase:
    """One phantom: image, label map on the same grid, prompt and metadata.

    Attributes:
        image: kind "image", float32 ``(X, Y, Z)``; CT in HU, MR in arbitrary units.
        label: kind "label", uint8 ``(X, Y, Z)`` with values of :func:`phantom_labels`.
        prompt: e.g. "CT abdomen portal venous, liver lesion 14 mm, female, 63".
        metadata: JSON-friendly facts: modality, region, sex, age, spacing, shape, lesions
            (``[{"class", "diameter_mm", "center_vox", ...}]``), has_lesion, seed, and the
            contrast ("contrast" for CT, "sequence" for MR) and rendering parameters.
    """

    image: Volume
    label: Volume
    prompt: str
    metadata: dict[str, Any]


def phantom_labels(modality: str) -> dict[str, int]:
    """Label name -> value for a modality ("ct" or "mr"); "background" is 0 and first."""
    return dict(CT_LABELS if _check_modality(modality) == "ct" else MR_LABELS)


def phantom_case_id(index: int) -> str:
    """Case identifier of the ``index``-th phantom, e.g. ``phantom_0007``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ConfigError(f"phantom case index must be an integer >= 0, got {index!r}")
    return f"phantom_{int(index):04d}"


def phantom_case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` in a dataset generated with ``seed`` (independent of its size).

    Derived with ``numpy.random.SeedSequence(seed, spawn_key=(index,))``, exactly what
    ``SeedSequence(seed).spawn(n)[index]`` gives, and kept below 2**53 so it survives JSON.
    """
    _check_seed(seed)
    phantom_case_id(index)  # validates index
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 53) - 1)


def generate_phantom(modality: str, size: int | Sequence[int] = 64, seed: int = 0,
                     lesion_rate: float = 0.15,
                     spacing: float | Sequence[float] | None = None,
                     lesion_size_mm: Sequence[float] | None = None,
                     noise: str = "fixed") -> PhantomCase:
    """Generate one phantom case.

    Args:
        modality: "ct" (abdomen) or "mr" (head), case-insensitive.
        size: grid edge in voxels, or ``(X, Y, Z)``; each in [16, 512].
        seed: integer >= 0; the same seed always gives the same case.
        lesion_rate: probability in [0, 1] that the case carries lesions (1-3 of them).
        spacing: voxel size in mm (scalar or 3 values). Default: the field of view divided by
            ``size`` (CT 380 x 380 x 280 mm, MR 240 mm cubed), so the body fills the image at
            any size. The anatomy is fixed in mm: a smaller field of view crops it.
        lesion_size_mm: ``(min, max)`` diameter in mm of each lesion (CT) or tumour core (MR),
            drawn log-uniformly. Default :data:`LESION_SIZE_MM` (CT 5-30, MR 8-35). A lesion is
            never smaller than two voxels across, so on coarse grids small ones grow.
        noise: one of :data:`NOISE_MODELS`. "fixed" (default) draws the noise SD per voxel at
            any grid; "scanner" draws it for 1 mm^3 voxels and scales it with the voxel volume
            as a scanner would (:func:`phantom_noise_scale`), so coarse grids are nearly
            noise-free and small lesions stay visible. Only the noise differs: anatomy,
            intensities and texture are the same for the same seed.

    Returns:
        :class:`PhantomCase` whose image and label share a diagonal RAS affine centred on (0, 0, 0).

    Raises:
        ConfigError: an argument outside its valid range.
    """
    mod = _check_modality(modality)
    shape = _check_size(size)
    _check_seed(seed)
    _check_rate(lesion_rate)
    sizes = _check_lesion_size(lesion_size_mm, mod)
    fov = CT_FOV_MM if mod == "ct" else MR_FOV_MM
    grid = Grid(shape=shape, spacing=_check_spacing(spacing, shape, fov))
    noise_scale = phantom_noise_scale(mod, grid.spacing, noise)
    rngs = _streams(seed)
    with_lesions = _draw_lesions(rngs[1], lesion_rate)
    if mod == "ct":
        made = generate_ct(grid, rngs, with_lesions, sizes, noise_scale)
        region, unit, modality_code = "abdomen", "HU", "CT"
    else:
        made = generate_mr(grid, rngs, with_lesions, sizes, noise_scale)
        region, unit, modality_code = "head", "a.u.", "MR"
    info = dict(made.info)
    lesions = info.pop("lesions")
    metadata: dict[str, Any] = {
        "modality": modality_code, "region": region, "sex": info.pop("sex"), "age": info.pop("age"),
        "spacing": [float(s) for s in grid.spacing], "shape": list(shape),
        "lesions": lesions, "has_lesion": bool(lesions), "lesion_count": len(lesions),
        "seed": int(seed), "lesion_rate": float(lesion_rate), "generator": "medsynth.phantoms",
        "synthetic": True, **info,
    }
    if lesion_size_mm is not None:  # recorded only when asked for: default cases stay as they were
        metadata["lesion_size_mm"] = list(sizes)
    if noise != "fixed":  # likewise
        metadata["noise_model"] = noise
    prompt = _prompt(metadata)
    affine = grid.affine
    extra = {"generator": "phantom", "seed": int(seed), "prompt": prompt}
    image = Volume(made.image, affine, "image",
                   VolumeMetadata(modality=modality_code, intensity_unit=unit,
                                  orientation=("R", "A", "S"), synthetic=True, extra=dict(extra)))
    label = Volume(made.label, affine.copy(), "label",
                   VolumeMetadata(modality=modality_code, intensity_unit="label",
                                  orientation=("R", "A", "S"), synthetic=True, extra=dict(extra)))
    return PhantomCase(image=image, label=label, prompt=prompt, metadata=metadata)


def phantom_noise_scale(modality: str, spacing: Sequence[float], noise: str = "fixed") -> float:
    """Factor on the drawn noise SD for a grid of voxel size ``spacing`` (mm) under ``noise``.

    1 for "fixed". For "scanner", with V the voxel volume in mm^3: CT ``sqrt(1 / V)``, MR ``1 / V``
    (e.g. CT 32^3 over 380 x 380 x 280 mm: V = 1234 mm^3, factor 0.028, noise 0.2-0.6 HU).
    """
    mod = _check_modality(modality)
    if noise not in NOISE_MODELS:
        raise ConfigError(f"phantom noise model must be one of {', '.join(NOISE_MODELS)}, got {noise!r}")
    if noise == "fixed":
        return 1.0
    ratio = NOISE_REFERENCE_VOXEL_MM3 / float(np.prod([float(s) for s in spacing]))
    return math.sqrt(ratio) if mod == "ct" else ratio


def phantom_lesion_planned(seed: int, lesion_rate: float) -> bool:
    """Whether the case made from ``seed`` is drawn to carry lesions, without making it.

    The same draw for CT and MR and for any size. The generated case has them unless none fits
    its host organ, which the fallback to one-voxel lesions makes practically impossible
    (never seen from 16^3 up); ``metadata["has_lesion"]`` records what was placed.
    """
    _check_seed(seed)
    _check_rate(lesion_rate)
    return _draw_lesions(_streams(seed)[1], lesion_rate)


def generate_phantoms(modality: str, num: int, size: int | Sequence[int] = 64, seed: int = 0,
                      lesion_rate: float = 0.15,
                      spacing: float | Sequence[float] | None = None,
                      lesion_size_mm: Sequence[float] | None = None,
                      noise: str = "fixed") -> Iterator[PhantomCase]:
    """Generate ``num`` cases lazily; case ``i`` uses :func:`phantom_case_seed` ``(seed, i)``.

    Arguments are validated before the first case is made (a bad call fails at once, not on
    the first ``next``). Each case's metadata gains ``index`` and ``case_id``.
    """
    mod = _check_modality(modality)
    _check_spacing(spacing, _check_size(size), CT_FOV_MM)
    _check_seed(seed)
    _check_rate(lesion_rate)
    _check_lesion_size(lesion_size_mm, mod)
    phantom_noise_scale(mod, (1.0, 1.0, 1.0), noise)
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ConfigError(f"number of phantoms must be an integer >= 1, got {num!r}")

    def cases() -> Iterator[PhantomCase]:
        for i in range(int(num)):
            case = generate_phantom(mod, size, phantom_case_seed(seed, i), lesion_rate, spacing, lesion_size_mm,
                                    noise)
            case.metadata.update(index=i, case_id=phantom_case_id(i), dataset_seed=int(seed))
            yield case

    return cases()


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Anatomy, lesion and rendering generators of a case.

    Separate streams keep the anatomy independent of the grid and of the lesion rate: the same
    seed gives the same body at 32^3 and 64^3, with or without lesions.
    """
    a, b, c = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    return a, b, c


def _draw_lesions(rng_lesion: np.random.Generator, lesion_rate: float) -> bool:
    """The lesion stream's first draw decides whether the case carries lesions."""
    return bool(rng_lesion.random() < float(lesion_rate))


def _prompt(meta: dict[str, Any]) -> str:
    """The case's text prompt, e.g. "MR head FLAIR, tumour 22 mm with oedema, female, 55"."""
    lesions = meta["lesions"]
    largest = max((les["diameter_mm"] for les in lesions), default=0.0)
    n = len(lesions)
    if meta["modality"] == "CT":
        phase = "portal venous" if meta["contrast"] == "portal_venous" else "non-contrast"
        head = f"CT abdomen {phase}"
        finding = ("no lesion" if n == 0 else f"liver lesion {largest:.0f} mm" if n == 1
                   else f"{n} liver lesions, largest {largest:.0f} mm")
    else:
        head = f"MR head {meta['sequence']}"
        finding = ("no tumour" if n == 0 else f"tumour {largest:.0f} mm with oedema" if n == 1
                   else f"{n} tumours, largest {largest:.0f} mm, with oedema")
    return f"{head}, {finding}, {meta['sex']}, {meta['age']}"


def _check_modality(modality: str) -> str:
    mod = modality.lower() if isinstance(modality, str) else modality
    if mod not in MODALITIES:
        raise ConfigError(f"phantom modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return mod


def _check_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, (int, np.integer)):
        values: list | None = [size] * 3
    else:
        values = list(size) if isinstance(size, (tuple, list)) else None
    ok = values is not None and len(values) == 3 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and MIN_SIZE <= v <= MAX_SIZE
        for v in values)
    if not ok:
        raise ConfigError(f"phantom size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] or three of them, "
                          f"got {size!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value, union-attr]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom seed must be an integer >= 0, got {seed!r}")


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(rate) <= 1.0:
        raise ConfigError(f"lesion rate must be a probability in [0, 1], got {rate!r}")


def _check_lesion_size(size_mm: Sequence[float] | None, modality: str) -> tuple[float, float]:
    """``(min, max)`` lesion diameter in mm; the modality's default when ``None``."""
    if size_mm is None:
        return LESION_SIZE_MM[modality]
    values = list(size_mm) if isinstance(size_mm, (tuple, list, np.ndarray)) else []
    if len(values) != 2 or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                   and math.isfinite(v) for v in values) \
            or not 0 < values[0] <= values[1] <= MAX_LESION_MM:
        raise ConfigError(f"lesion size must be two diameters MIN MAX in mm with 0 < MIN <= MAX <= "
                          f"{MAX_LESION_MM:g}, got {size_mm!r}")
    return float(values[0]), float(values[1])


def _check_spacing(spacing: float | Sequence[float] | None, shape: tuple[int, int, int],
                   fov: tuple[float, float, float]) -> tuple[float, float, float]:
    if spacing is None:
        return tuple(f / n for f, n in zip(fov, shape))  # type: ignore[return-value]
    values = [spacing] * 3 if isinstance(spacing, (int, float, np.number)) else list(spacing) \
        if isinstance(spacing, (tuple, list)) else []
    if len(values) != 3 or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                   and math.isfinite(v) and 0 < v <= 100 for v in values):
        raise ConfigError(f"phantom spacing must be a voxel size in (0, 100] mm or three of them, "
                          f"got {spacing!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]
