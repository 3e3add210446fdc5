"""Lesion insertion: add synthetic lesions of a chosen class, count and size inside a host organ.

``--lesion CLASS:COUNT:MIN-MAXmm[:HOST]`` (e.g. ``liver_lesion:2:5-15mm:liver``) asks for COUNT
lesions of label CLASS, each with a diameter drawn uniformly from MIN..MAX mm, placed fully
inside HOST (default: CLASS without its ``_lesion`` suffix, when that is a label). Used to
balance rare classes: the ControlNet then renders whatever the label map says.

Shapes are balls with a smooth random boundary deformation (the phantoms' lesion model, from
:mod:`medsynth.data.phantom_shapes`): round-to-lobulated like most metastases and cysts. Every
lesion keeps a one-voxel margin of host tissue and never touches another lesion of its class,
so the label map holds exactly COUNT new connected components per request, and the returned
records say exactly what was placed (class, value, measured equivalent-sphere diameter, centre).
A request that does not fit is refused with the largest diameter that would still fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medsynth.data.phantom_shapes import Grid, SmoothField, equivalent_diameter, place_ball
from medsynth.errors import ConfigError
from medsynth.io.volume import Volume

LESION_FORMAT = "CLASS:COUNT:MIN-MAXmm[:HOST], e.g. liver_lesion:2:5-15mm:liver"
MAX_COUNT = 100
# Boundary deformation (fraction of the radius); the radius is enlarged by its mean effect so
# that the measured equivalent-sphere diameter stays close to the requested one.
DEFORMATION = 0.12
_MEAN_ABS_NORMAL = 0.8
_SPEC = re.compile(r"^(?P<cls>[^:]+):(?P<count>[^:]+):(?P<size>[^:]+?)(?::(?P<host>[^:]+))?$")
_SIZE = re.compile(r"^(?P<lo>\d+(?:\.\d+)?)(?:\s*-\s*(?P<hi>\d+(?:\.\d+)?))?\s*(?:mm)?$", re.IGNORECASE)


@dataclass(frozen=True)
class LesionSpec:
    """One lesion request.

    Attributes:
        class_name: label name of the lesions (must be in the label table).
        count: number of lesions, 1..100.
        min_mm, max_mm: diameter range in mm (equal for a fixed size).
        host: label name of the organ that must contain them, or None for the default
            (``class_name`` without ``_lesion``).
    """

    class_name: str
    count: int
    min_mm: float
    max_mm: float
    host: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ConfigError(f"lesion count must be an integer in 1..{MAX_COUNT}, got {self.count!r}")
        if not 0 < self.min_mm <= self.max_mm:
            raise ConfigError(f"lesion size range must satisfy 0 < MIN <= MAX, got {self.min_mm}-{self.max_mm} mm")

    @classmethod
    def parse(cls, text: str) -> "LesionSpec":
        """Parse ``CLASS:COUNT:MIN-MAXmm[:HOST]`` (``MIN-MAX`` may be one number; ``mm`` optional)."""
        match = _SPEC.match(str(text).strip())
        size = None if match is None else _SIZE.match(match["size"].strip())
        if match is None or size is None or not match["count"].strip().isdigit():
            raise ConfigError(f"cannot parse lesion request {text!r}; expected {LESION_FORMAT}")
        lo = float(size["lo"])
        hi = float(size["hi"]) if size["hi"] is not None else lo
        host = None if match["host"] is None else match["host"].strip()
        return cls(match["cls"].strip(), int(match["count"]), lo, hi, host or None)

    def resolve_host(self, labels: Mapping[str, int]) -> str:
        """The host label name, checked against ``labels`` (ConfigError listing the known ones)."""
        known = sorted(labels, key=lambda n: labels[n])
        if self.class_name not in labels or self.class_name == "background":
            raise ConfigError(f"lesion class {self.class_name!r} is not a label of this model; "
                              f"known labels are {known}")
        host = self.host
        if host is None:
            host = self.class_name.removesuffix("_lesion")
            if host == self.class_name or host not in labels:
                raise ConfigError(f"no default host organ for lesion class {self.class_name!r}; name it: "
                                  f"{self.class_name}:{self.count}:{self.min_mm:g}-{self.max_mm:g}mm:HOST with HOST "
                                  f"one of {known}")
        if host not in labels or host == "background":
            raise ConfigError(f"host organ {host!r} is not a label of this model; known labels are {known}")
        if host == self.class_name:
            raise ConfigError(f"a lesion class cannot be its own host ({host!r})")
        return host

    def __str__(self) -> str:
        host = "" if self.host is None else f":{self.host}"
        return f"{self.class_name}:{self.count}:{self.min_mm:g}-{self.max_mm:g}mm{host}"


def parse_lesion_specs(texts: Sequence[str] | None) -> list[LesionSpec]:
    """Parse every ``--lesion`` value (empty list for None)."""
    return [LesionSpec.parse(t) for t in texts or []]


def _largest_fitting_diameter(host: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Roughly the largest ball diameter (mm) that still fits inside ``host`` with a voxel margin."""
    if not host.any():
        return 0.0
    depth = float(ndimage.distance_transform_edt(np.pad(host, 1), sampling=spacing).max())
    return max(0.0, 2.0 * (depth - max(spacing)))


def insert_lesions(label: Volume, specs: Sequence[LesionSpec], labels: Mapping[str, int],
                   rng: np.random.Generator) -> tuple[Volume, list[dict[str, Any]]]:
    """Paint lesions into a copy of a label map.

    Args:
        label: ``(X, Y, Z)`` integer label map (kind "label").
        specs: requests, placed in order (larger requests first is the caller's choice).
        labels: the label table (name -> value) the map uses.
        rng: draws sizes, positions and shapes (same seed -> same lesions).

    Returns:
        ``(new label map, records)``: one record per lesion with ``class``, ``value``, ``host``,
        ``requested_diameter_mm``, ``diameter_mm`` (measured equivalent-sphere diameter),
        ``voxels``, ``center_vox`` and ``center_ras_mm``; the records are also stored in the new
        volume's ``metadata.extra["lesions"]``. The input is never modified.

    Raises:
        ConfigError: unknown class/host names, sizes below two voxels, or a lesion that does not
            fit inside what is left of its host (the message gives the largest that would).
    """
    spacing = label.spacing
    grid = Grid(label.shape, spacing)
    out = np.array(label.array, copy=True)
    if not np.issubdtype(out.dtype, np.integer):
        raise ConfigError(f"lesions go into an integer label map, got dtype {out.dtype}")
    records: list[dict[str, Any]] = []
    touch = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood: diagonal contact merges lesions too
    for spec in specs:
        host_name = spec.resolve_host(labels)
        value, host_value = int(labels[spec.class_name]), int(labels[host_name])
        if int(value) > np.iinfo(out.dtype).max:
            out = out.astype(np.uint16)
        smallest = 2.0 * max(spacing)
        if spec.max_mm < smallest:
            raise ConfigError(f"lesion request {spec}: diameters below {smallest:g} mm (two voxels at spacing "
                              f"{tuple(round(s, 3) for s in spacing)} mm) would vanish from the label map")
        if not (out == host_value).any():
            raise ConfigError(f"lesion request {spec}: the label map has no {host_name!r} voxels to host it")
        for index in range(spec.count):
            host = (out == host_value) & ~ndimage.binary_dilation(out == value, structure=touch)
            wanted = float(rng.uniform(spec.min_mm, spec.max_mm))
            low = max(spec.min_mm, smallest)
            field = SmoothField(rng, (max(wanted, smallest), 3 * max(wanted, smallest)), 6)
            placed, diameter = None, wanted
            # Shrink towards the range's lower end before giving up: a crowded host may still
            # take a smaller lesion that honours the request.
            for diameter in np.unique(np.clip(np.geomspace(wanted, low, 4), low, wanted))[::-1]:
                radius = diameter / 2.0 * (1.0 + DEFORMATION * _MEAN_ABS_NORMAL)
                placed = place_ball(host, grid, float(radius), rng, field, amp=DEFORMATION)
                if placed is not None:
                    break
            if placed is None:
                fits = _largest_fitting_diameter(host, spacing)
                raise ConfigError(f"lesion request {spec}: lesion {index + 1} of {spec.count} does not fit inside "
                                  f"{host_name!r} (the free part of the host takes at most ~{fits:.1f} mm); ask "
                                  f"for fewer or smaller lesions, or another host")
            mask, center = placed
            out[mask] = value
            n = int(mask.sum())
            centre_ras = label.affine @ np.append(center.astype(float), 1.0)
            records.append({"class": spec.class_name, "value": value, "host": host_name,
                            "requested_diameter_mm": round(float(diameter), 2),
                            "diameter_mm": round(equivalent_diameter(n, grid), 2), "voxels": n,
                            "center_vox": [int(c) for c in center],
                            "center_ras_mm": [round(float(c), 2) for c in centre_ras[:3]]})
    result = label.with_array(out, kind="label")
    result.metadata.extra["lesions"] = list(result.metadata.extra.get("lesions", [])) + records
    return result, records


def _lesion_components(array: np.ndarray, value: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesions of ``value`` in a label map: ``(components (X, Y, Z) labelled 1..n by 26-connectivity,
    voxel count of each, length n)``."""
    from medsynth.evaluation.label_statistics import STRUCTURE_26

    components, found = ndimage.label(np.asarray(array) == value, structure=STRUCTURE_26)
    return components, np.bincount(components.ravel(), minlength=found + 1)[1:]


def _fill_components(out: np.ndarray, components: np.ndarray, indices: Sequence[int], value: int) -> None:
    """Fill the components ``indices`` (1-based labels of ``components``) of ``out`` in place with
    the label that surrounds each most (the commonest value in its one-voxel shell, never
    ``value`` itself), so the host closes over them as if they had never been drawn."""
    from medsynth.evaluation.label_statistics import STRUCTURE_26

    for index in indices:
        component = components == index
        shell = ndimage.binary_dilation(component, structure=STRUCTURE_26) & ~component
        around = out[shell]
        around = around[around != value]
        out[component] = np.bincount(around.astype(np.int64)).argmax() if around.size else 0


def keep_largest_lesions(array: np.ndarray, value: int, keep: int) -> tuple[np.ndarray, int]:
    """Keep the ``keep`` largest lesions (26-connected components of ``value``) of a label map.

    Every other component is filled with the label that surrounds it most (the commonest value in
    its one-voxel shell, never ``value`` itself), so the host organ closes over it as if it had
    never been drawn.

    Args:
        array: ``(X, Y, Z)`` integer label map (not modified).
        value: the lesion class's label value.
        keep: how many components to keep (>= 0).

    Returns:
        ``(new map, number of components found)``; ``max(0, found - keep)`` of them were removed.
    """
    components, sizes = _lesion_components(array, value)
    found = len(sizes)
    if found <= keep:
        return np.asarray(array), int(found)
    out = np.array(array, copy=True)
    # largest first; equal sizes keep the lower component index, so the choice is deterministic
    order = np.lexsort((np.arange(found), -sizes))
    _fill_components(out, components, [int(i) + 1 for i in order[keep:]], value)
    return out, int(found)


def drop_lesions_outside(array: np.ndarray, value: int, diameter_mm: tuple[float, float],
                         spacing: Sequence[float]) -> tuple[np.ndarray, int]:
    """Remove the lesions (26-connected components of ``value``) whose equivalent-sphere diameter
    lies outside ``[low, high]`` mm, filling them as :func:`keep_largest_lesions` does.

    Args:
        array: ``(X, Y, Z)`` integer label map (not modified).
        value: the lesion class's label value.
        diameter_mm: ``(low, high)`` accepted diameters in mm.
        spacing: voxel size in mm.

    Returns:
        ``(new map, number of lesions removed)``.
    """
    components, sizes = _lesion_components(array, value)
    grid = Grid(np.asarray(array).shape, tuple(float(s) for s in spacing))
    outside = [index + 1 for index, n in enumerate(sizes)
               if not diameter_mm[0] <= equivalent_diameter(int(n), grid) <= diameter_mm[1]]
    if not outside:
        return np.asarray(array), 0
    out = np.array(array, copy=True)
    _fill_components(out, components, outside, value)
    return out, len(outside)


@dataclass(frozen=True)
class PromptFinding:
    """A lesion finding stated in a prompt.

    Attributes:
        class_name: the lesion label it names.
        count: how many lesions the prompt states (0 for "no lesion").
        diameter_mm: the stated diameter (of the only lesion, or of the largest), or None.
    """

    class_name: str
    count: int
    diameter_mm: float | None = None

    def accepted_mm(self, tolerance: float) -> tuple[float, float] | None:
        """Diameters a drawn lesion may have to count for this finding: the stated one within a
        factor ``tolerance`` (``[d / t, d * t]``), or up to it for "N lesions, largest d mm";
        None when no diameter is stated."""
        if self.diameter_mm is None:
            return None
        if self.count == 1:
            return self.diameter_mm / tolerance, self.diameter_mm * tolerance
        return 0.0, self.diameter_mm * tolerance


def _noun_pattern(words: Sequence[str]) -> str:
    return r"\s+".join(re.escape(w) for w in words)


def findings_in_prompt(prompt: str | None, lesion_names: Sequence[str]) -> dict[str, PromptFinding]:
    """The lesion findings a prompt states, in the phantoms' and cohorts' prompt grammar.

    A lesion class is named by its label's words (``liver_lesion`` -> "liver lesion"; a
    ``*_core`` class also by its stem: ``tumour_core`` -> "tumour"). Understood: "liver lesion
    38 mm" (one, 38 mm), "2 liver lesions, largest 30 mm" (two, the largest 30 mm), "2 liver
    lesions", and "no lesion" / "no liver lesion" / "no tumour" (none: "no" before any word of
    the class's name, so "no tumour" clears ``tumour_core`` and ``tumour_oedema`` alike).
    Case-insensitive; a stated size of 0 mm counts as no size; anything else is ignored.

    Returns:
        ``{class name: PromptFinding}`` for the classes the prompt speaks of.
    """
    out: dict[str, PromptFinding] = {}
    text = str(prompt or "").lower()
    for name in lesion_names:
        words = name.lower().split("_")
        nouns = [words] + ([words[:-1]] if len(words) > 1 and words[-1] == "core" else [])
        for noun in nouns:
            n = _noun_pattern(noun)
            plural = re.search(rf"\b(\d+)\s+{n}s\b(?:\s*,\s*largest\s+(\d+(?:\.\d+)?)\s*mm)?", text)
            single = re.search(rf"\b{n}\s+(\d+(?:\.\d+)?)\s*mm", text)
            if plural:
                size = None if plural[2] is None or float(plural[2]) <= 0 else float(plural[2])
                out[name] = PromptFinding(name, int(plural[1]), size)
            elif single:
                out[name] = PromptFinding(name, 1, float(single[1]) if float(single[1]) > 0 else None)
            else:
                continue
            break
        else:
            named = "|".join(re.escape(w) for w in words if w != "core")
            if named and re.search(rf"\bno\s+(?:[a-z]+\s+)?(?:{named})s?\b", text):
                out[name] = PromptFinding(name, 0)
    return out


__all__ = ["LesionSpec", "parse_lesion_specs", "insert_lesions", "keep_largest_lesions", "drop_lesions_outside",
           "PromptFinding", "findings_in_prompt", "LESION_FORMAT"]
