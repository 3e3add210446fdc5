"""The label generator as a mask source: text + attributes -> a new label map on the output grid.

:class:`LabelGenerator` loads a ``medsynth labels fit`` export and samples label maps:

1. noise ``(B, L, x, y, z)`` on the model's native grid (training spacing; the training field of
   view, widened when the output asks for a larger one) -> :func:`medsynth.pipelines.sampling.denoise`
   (the one denoising loop) with the model's few-step sampler (rectified flow, Euler, ~10 steps);
2. divide by the latent scale factor, decode with the label autoencoder and take the argmax
   over the dataset's label values only (no value outside the label table can appear);
3. resample nearest-neighbour onto the requested grid (size and spacing, centred like the
   native grid), so the map is at the output's own spacing.

Attributes steer the map: ``volume_quantiles={"liver": 0.9}`` asks for a liver as large as the
90th percentile of training livers; ``lesion_counts={"liver_lesion": 2}`` for two lesions.
Requests the model cannot honour are refused: labels it never saw, classes without a size
attribute, quantiles outside [0, 1], lesion counts outside the training range.

Asked lesion counts and sizes are *held*, not just steered (the DiT alone gets them right only
part of the time: docs/benchmarks/label_generator_cpu.md): a map that misses a request is drawn
again from fresh noise, up to ``max_draws`` draws in all, and the best draw is kept (fewest missing
lesions first, then the size quantiles closest to the asked ones). In it the largest lesions up to
the asked count are kept and any further ones are filled with the tissue around them
(:func:`medsynth.pipelines.lesions.keep_largest_lesions`); a size counts as met within
:data:`SIZE_QUANTILE_TOLERANCE` of the asked quantile. Each map records its draws, the lesions it
drew and removed, the size quantiles it reached and whether every request was met
(``metadata.extra["mask_source"]["held"]``); ``max_draws=0`` returns the model's own maps unchanged.

With ``hold_findings=True`` the lesion findings each prompt states are held the same way
(:func:`medsynth.pipelines.lesions.findings_in_prompt`: "liver lesion 38 mm", "2 liver lesions,
largest 30 mm", "no lesion"): the stated count, and lesions of the stated diameter within a factor
:data:`FINDING_SIZE_TOLERANCE` (lesions of other sizes are filled with the tissue around them).
When no draw has them, the missing lesions are inserted into the best draw by
:func:`~medsynth.pipelines.lesions.insert_lesions` (in their default host, at the stated size), so
the map holds what the prompt asked for; the record says how many the model drew and how many were
inserted, and their measured diameters. Insertion needs a stated diameter and a default host organ
(``liver_lesion`` -> liver): a count without a size ("2 liver lesions"), or a class without a host
(``tumour_core``), is only redrawn, and a map that still misses it is marked ``met: false``. Organ
size quantiles are measured before insertion. The tiny model draws lesions from a lesion prompt but smaller than any training lesion
(docs/benchmarks/lesion_prompt_cpu_scanner_noise_f2_masks_refiner.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.errors import ConfigError
from medsynth.io.volume import Volume, VolumeMetadata
from medsynth.models.label_generator import LESION_PREFIX, VOLUME_PREFIX

# Draws per map when a lesion count or a size is asked: the tiny model on CT phantoms has 2 or more
# lesions in ~45 % of the maps asked for 2, so 8 draws meet the count ~99 % of the time (at ~0.1-0.3 s each).
DEFAULT_MAX_DRAWS = 8
# A held size request is met when the map's volume quantile among the training cases is within this
# of the asked one (0.1 = one decile).
SIZE_QUANTILE_TOLERANCE = 0.1
# A lesion counts for a prompt's "liver lesion 38 mm" when its equivalent-sphere diameter is within
# this factor of 38 mm: at the demo's 11.9 mm voxels one voxel more or less moves a 38 mm lesion's
# diameter by ~1.5 %, and the phantoms' lesions deform their balls by ~12 %.
FINDING_SIZE_TOLERANCE = 1.25


def parse_attribute_items(items: Sequence[str], option: str, integer: bool = False) -> dict[str, float]:
    """``["liver=0.9"]`` -> ``{"liver": 0.9}`` (``--label-attribute`` / ``--lesion-count`` values).

    For ``--lesion-count`` a bare number (``"2"``) is allowed and stored under the key ``""``
    (the model's only lesion class).

    Raises:
        ConfigError: not NAME=NUMBER, a non-number, or a non-integer count.
    """
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        if not sep:
            name, value = "", name
            if not integer:
                raise ConfigError(f"{option} expects CLASS=VALUE (e.g. liver=0.9), but got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{option} expects a number after '=', but got {item!r}") from None
        if not np.isfinite(number) or (integer and (number != int(number) or number < 0)):
            kind = "a non-negative integer" if integer else "a finite number"
            raise ConfigError(f"{option} expects {kind}, but got {item!r}")
        out[name.strip()] = int(number) if integer else number
    return out


class LabelGenerator:
    """A trained label generator (build with :meth:`from_pretrained`).

    Attributes: ``autoencoder``, ``dit``, ``text_encoder``, ``labels`` (name -> value),
    ``native_shape`` / ``native_spacing`` (the training grid), ``statistics`` (training labels),
    ``sampling`` (default sampler settings), ``attributes`` (the DiT's attribute names),
    ``class_offsets`` (the decoder's per-class logit offsets, or None), ``max_draws`` (draws per map
    to meet asked lesion counts and sizes; 0 = the model's own maps, see module docstring),
    ``sha256`` (of the weights), ``path``.
    """

    def __init__(self, autoencoder: torch.nn.Module, dit: torch.nn.Module, text_encoder: torch.nn.Module,
                 config: Mapping[str, Any], sha256: str = "", path: Path | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.autoencoder, self.dit, self.text_encoder = autoencoder, dit, text_encoder
        self.config = dict(config)
        self.labels = {str(k): int(v) for k, v in dict(config["labels"]).items()}
        self.native_shape = tuple(int(s) for s in config["grid"]["shape"])
        self.native_spacing = tuple(float(s) for s in config["grid"]["spacing"])
        self.scale_factor = float(config["latent"]["scale_factor"])
        self.statistics = dict(config["statistics"])
        self.sampling = dict(config.get("sampling") or {})
        self.objective = dict(config.get("objective") or {"name": "rectified_flow"})
        self.metadata_defaults = {k: v for k, v in dict(config.get("metadata_defaults") or {}).items()
                                  if v is not None}
        self.attributes = tuple(dit.config.attributes)
        # Volume calibration of the decoder (training.label_generator.fit_class_offsets); exports
        # written before it existed decode with plain argmax.
        self.class_offsets = dict(config.get("decoding") or {}).get("class_offsets")
        self.max_draws = DEFAULT_MAX_DRAWS
        self.sha256, self.path, self.device = sha256, path, torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "LabelGenerator":
        """Load a ``medsynth labels fit`` export (``RUN/export``) onto ``device``.

        Raises:
            InputError: missing/corrupt export or another kind of model.
            ConfigError: a device that is not available.
        """
        from medsynth.pipelines.sampling import resolve_device
        from medsynth.training.label_generator import load_label_generator

        dev = resolve_device(device)
        ae, dit, encoder, export = load_label_generator(path, device=dev)
        return cls(ae, dit, encoder, export.config, export.sha256, Path(path), dev)

    # -- requests ------------------------------------------------------------------------------

    def attribute_values(self, volume_quantiles: Mapping[str, float] | None = None,
                         lesion_counts: Mapping[str, int] | None = None) -> dict[str, float]:
        """Requests -> ``{attribute name: value}`` for the DiT (see module docstring for refusals)."""
        known = {n: v for n, v in self.labels.items() if v != 0}
        out: dict[str, float] = {}
        sized = [a[len(VOLUME_PREFIX):] for a in self.attributes if a.startswith(VOLUME_PREFIX)]
        for name, q in dict(volume_quantiles or {}).items():
            if name not in known:
                raise ConfigError(f"unknown label {name!r} in a size request; the label generator knows "
                                  f"{', '.join(f'{k}={v}' for k, v in known.items())}")
            if name not in sized:
                raise ConfigError(f"the label generator was not trained with a size attribute for {name!r}; "
                                  f"classes with one: {sized}")
            if not 0.0 <= float(q) <= 1.0:
                raise ConfigError(f"size quantile of {name!r} must lie in [0, 1] (0.5 = median training size), "
                                  f"but got {q}")
            out[VOLUME_PREFIX + name] = float(q)
        counted = [a[len(LESION_PREFIX):] for a in self.attributes if a.startswith(LESION_PREFIX)]
        for name, count in dict(lesion_counts or {}).items():
            if name == "":
                if len(counted) != 1:
                    raise ConfigError(f"--lesion-count N needs a class when the model counts lesions of "
                                      f"{len(counted)} classes ({counted}); give CLASS=N")
                name = counted[0]
            if name not in counted:
                raise ConfigError(f"the label generator counts lesions of {counted or 'no class'}, not {name!r}")
            seen = [int(c) for c in self.statistics["lesion_counts"].get(name, [])]
            lo, hi = (min(seen), max(seen)) if seen else (0, 0)
            if not lo <= int(count) <= hi:
                raise ConfigError(f"lesion count {count} of {name!r} is outside what the model saw in training "
                                  f"({lo}..{hi}); ask for {lo}..{hi}, or add lesions with --lesion")
            out[LESION_PREFIX + name] = float(count)
        return out

    def native_grid(self, size: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
        """Native-spacing grid covering the training field of view and the requested one,
        rounded up to a multiple of ``factor x patch``."""
        f = int(self.autoencoder.downsample_factor)
        multiple = [f * int(p) for p in self.dit.config.patch_size]
        need = [max(n, int(np.ceil(s * sp / ns - 1e-6)))
                for n, s, sp, ns in zip(self.native_shape, size, spacing, self.native_spacing)]
        return tuple(-(-n // m) * m for n, m in zip(need, multiple))  # type: ignore[return-value]

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str | None] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, *,
                 size: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                 volume_quantiles: Mapping[str, float] | None = None,
                 lesion_counts: Mapping[str, int] | None = None, metadata: Mapping[str, Any] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: Any = None, hold_findings: bool = False) -> list[Volume]:
        """Sample label maps, one per prompt (or per generator).

        Args:
            prompt: text, a list (one map each), or None (the null text embedding).
            generator: seeds the noise; a list gives each map its own generator.
            size, spacing: output grid (default: the training grid), RAS, centred on the origin.
            volume_quantiles: class -> size quantile in [0, 1] among training cases.
            lesion_counts: lesion class -> count (within the training range).
            metadata: region / sex / age for the DiT (modality and spacing are the model's).
            num_inference_steps, guidance_scale: default: the export's ``sampling``.
            scheduler: a scheduler from :func:`medsynth.diffusion.make_scheduler` instead of the
                export's (benchmarks).
            hold_findings: also hold the lesion findings each prompt states (count and diameter;
                see module docstring); an explicit ``lesion_counts`` entry wins over the prompt's.

        Returns:
            ``label`` Volumes ``(X, Y, Z)`` (uint8/uint16) on the requested grid, holding only
            the model's label values; ``metadata.extra["mask_source"]`` records how it was made.

        Raises:
            ConfigError: bad requests (see :meth:`attribute_values`), size, spacing or metadata.
        """
        from medsynth.data.transforms import resample_to_grid
        from medsynth.diffusion import make_scheduler
        from medsynth.pipelines.pipeline import centred_ras_affine
        from medsynth.pipelines.sampling import Conditions, denoise

        gens = list(generator) if isinstance(generator, Sequence) else None
        prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
        if gens is not None and len(prompts) == 1:
            prompts = prompts * len(gens)
        batch = len(prompts)
        if batch < 1 or (gens is not None and len(gens) != batch):
            raise ConfigError(f"got {0 if gens is None else len(gens)} generators for {batch} prompts; give one "
                              f"per prompt or one in all")
        size_ = self.native_shape if size is None else tuple(int(s) for s in size)
        spacing_ = self.native_spacing if spacing is None else tuple(float(s) for s in spacing)
        if len(size_) != 3 or min(size_) < 1 or len(spacing_) != 3 or not all(np.isfinite(spacing_)) \
                or min(spacing_) <= 0:
            raise ConfigError(f"expects size as 3 positive integers and spacing as 3 positive mm values, but got "
                              f"size={size!r}, spacing={spacing!r}")
        attributes = self.attribute_values(volume_quantiles, lesion_counts)
        given = {k: v for k, v in dict(metadata or {}).items() if k in ("region", "sex", "age") and v is not None}
        record = {**self.metadata_defaults, **given, "spacing": list(self.native_spacing), "attributes": attributes}
        self.dit.encode_metadata([record])  # ConfigError for unknown regions, before any sampling

        native = self.native_grid(size_, spacing_)
        f = int(self.autoencoder.downsample_factor)
        shape = (batch, int(self.dit.config.in_channels), *(n // f for n in native))
        steps = int(self.sampling.get("num_inference_steps") or 10) if num_inference_steps is None \
            else num_inference_steps
        guidance = float(self.sampling.get("guidance_scale") or 1.0) if guidance_scale is None else guidance_scale
        if scheduler is None:
            scheduler = make_scheduler(self.objective.get("name", "rectified_flow"), self.sampling.get("sampler"),
                                       shift=float(self.sampling.get("shift") or 1.0))

        def draw(items: list[int]) -> np.ndarray:
            """Maps ``(len(items), X, Y, Z)`` at native spacing for the prompts/generators ``items``."""
            latents = None
            if gens is not None:
                latents = torch.cat([torch.randn((1, *shape[1:]), generator=gens[i], device=gens[i].device)
                                     .to(self.device) for i in items]) * float(getattr(scheduler, "init_noise_sigma",
                                                                                       1.0))
            chosen = [prompts[i] for i in items]
            text = None
            if any(p is not None for p in chosen):
                text = self.text_encoder.encode([p or "" for p in chosen], device=self.device)
            meta = self.dit.encode_metadata([record] * len(items))
            z = denoise(self.dit, scheduler, (len(items), *shape[1:]), Conditions(text, meta), steps, guidance,
                        gens[items[0]] if gens else generator, latents=latents, device=self.device)
            decoded = self.autoencoder.decode_labels(z / self.scale_factor, allowed=sorted(self.labels.values()),
                                                     class_offsets=self.class_offsets)
            return decoded.cpu().numpy()

        label = draw(list(range(batch)))  # (B, X, Y, Z) at native spacing
        lesions = {name[len(LESION_PREFIX):]: int(v) for name, v in attributes.items() if name.startswith(LESION_PREFIX)}
        sizes = {name[len(VOLUME_PREFIX):]: float(v) for name, v in attributes.items() if name.startswith(VOLUME_PREFIX)}
        held: list[dict[str, Any] | None] = [None] * batch
        for i in range(batch):
            counts, diameters = dict(lesions), {}
            if hold_findings:
                counts, diameters = self.finding_requests(prompts[i], lesions)
            if (counts or sizes) and self.max_draws > 0:
                # inserted lesions follow the map's own seed (one generator for all: its seed + i)
                seed = int(gens[i].initial_seed()) if gens is not None else \
                    (int(generator.initial_seed()) + i if isinstance(generator, torch.Generator) else i)
                label[i], held[i] = self._hold_requests(label[i], counts, sizes, lambda i=i: draw([i])[0],
                                                        diameters, seed)
        dtype = np.uint8 if max(self.labels.values()) < 256 else np.uint16
        target = (size_, centred_ras_affine(size_, spacing_))
        out = []
        for i in range(batch):
            volume = Volume(label[i].astype(dtype), centred_ras_affine(native, self.native_spacing), "label",
                            VolumeMetadata(intensity_unit="label", synthetic=True))
            if native != size_ or not np.allclose(self.native_spacing, spacing_):
                volume = resample_to_grid(volume, target)
            volume.metadata.extra["mask_source"] = {
                "kind": "generator", "sha256": self.sha256, "prompt": prompts[i], "num_inference_steps": steps,
                "guidance_scale": guidance, "attributes": attributes, "native_grid": list(native)}
            if held[i] is not None:
                volume.metadata.extra["mask_source"]["held"] = held[i]
            out.append(volume)
        return out

    def finding_requests(self, prompt: str | None, lesion_counts: Mapping[str, int]
                         ) -> tuple[dict[str, int], dict[str, tuple[float, float]]]:
        """The lesion counts and accepted diameters (class -> ``(low, high)`` mm) to hold for one
        prompt: its stated findings (:func:`~medsynth.pipelines.lesions.findings_in_prompt`) over
        the model's lesion classes, with ``lesion_counts`` (explicit requests) winning."""
        from medsynth.evaluation.label_statistics import lesion_classes
        from medsynth.pipelines.lesions import findings_in_prompt

        counts, diameters = {}, {}
        for name, finding in findings_in_prompt(prompt, lesion_classes(self.labels)).items():
            counts[name] = finding.count
            accepted = finding.accepted_mm(FINDING_SIZE_TOLERANCE)
            if accepted is not None and finding.count > 0:
                diameters[name] = accepted
        counts.update(lesion_counts)
        return counts, {name: accepted for name, accepted in diameters.items() if counts.get(name, 0) > 0}

    def _hold_requests(self, label: np.ndarray, lesions: Mapping[str, int], sizes: Mapping[str, float],
                       redraw: Callable[[], np.ndarray], diameters: Mapping[str, tuple[float, float]] | None = None,
                       seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
        """Meet asked lesion counts (class -> count), lesion diameters (class -> ``(low, high)``
        mm) and size quantiles (class -> quantile) on one native map ``(X, Y, Z)`` (see module
        docstring); ``redraw()`` gives a fresh map of the same request; ``seed`` places inserted
        lesions.

        Returns:
            The kept map and ``{"draws", "met", "lesion_counts": {"asked", "drawn", "removed"},
            "lesion_diameters": {"asked", "out_of_range_removed", "inserted", "not_inserted"},
            "size_quantiles": {"asked", "reached", "tolerance"}}`` (each part only when asked).
        """
        from medsynth.evaluation.label_statistics import volume_quantile
        from medsynth.pipelines.lesions import drop_lesions_outside, keep_largest_lesions

        voxel_ml = float(np.prod(self.native_spacing)) / 1000.0
        diameters = dict(diameters or {})

        def judge(candidate: np.ndarray) -> dict[str, Any]:
            drawn, removed, outside = {}, {}, {}
            for name, count in lesions.items():
                if name in diameters:  # lesions of another size do not count, and do not stay
                    candidate, outside[name] = drop_lesions_outside(candidate, self.labels[name], diameters[name],
                                                                    self.native_spacing)
                candidate, drawn[name] = keep_largest_lesions(candidate, self.labels[name], count)
                removed[name] = max(0, drawn[name] - count)
            reached = {name: round(volume_quantile(self.statistics["volumes_ml"][name],
                                                   float((candidate == self.labels[name]).sum()) * voxel_ml), 3)
                       for name in sizes}
            missing = sum(max(0, lesions[name] - drawn[name]) for name in lesions)
            error = max([abs(reached[name] - sizes[name]) for name in sizes], default=0.0)
            # fewest missing lesions first, then sizes within tolerance, then the closest sizes
            rank = (missing, max(0.0, error - SIZE_QUANTILE_TOLERANCE), error)
            return {"map": candidate, "drawn": drawn, "removed": removed, "outside": outside, "reached": reached,
                    "rank": rank}

        best, draws = judge(label), 1
        while best["rank"][:2] != (0, 0.0) and draws < self.max_draws:
            candidate, draws = judge(redraw()), draws + 1
            if candidate["rank"] < best["rank"]:
                best = candidate
        inserted, refused, measured = self._insert_missing(best, lesions, diameters, seed)
        missing = sum(max(0, lesions[n] - best["drawn"][n] - inserted.get(n, 0)) for n in lesions)
        # an inserted lesion counts only when its measured size is one its own finding accepts
        sized = all(diameters[name][0] <= d <= diameters[name][1] for name, ds in measured.items() for d in ds)
        record: dict[str, Any] = {"draws": draws, "met": missing == 0 and sized and best["rank"][1] == 0.0}
        if lesions:
            record["lesion_counts"] = {"asked": dict(lesions), "drawn": best["drawn"], "removed": best["removed"]}
        if diameters:
            record["lesion_diameters"] = {"asked": {n: [round(lo, 2), round(hi, 2)] for n, (lo, hi) in diameters.items()},
                                          "out_of_range_removed": best["outside"], "inserted": inserted,
                                          **({"inserted_diameters_mm": [round(d, 2) for ds in measured.values()
                                                                         for d in ds]} if measured else {}),
                                          **({"not_inserted": refused} if refused else {})}
        if sizes:
            record["size_quantiles"] = {"asked": dict(sizes), "reached": best["reached"],
                                        "tolerance": SIZE_QUANTILE_TOLERANCE}
        return best["map"], record

    def _insert_missing(self, best: dict[str, Any], lesions: Mapping[str, int],
                        diameters: Mapping[str, tuple[float, float]], seed: int
                        ) -> tuple[dict[str, int], dict[str, str], dict[str, list[float]]]:
        """Insert the lesions of a stated diameter that no draw had into ``best["map"]`` (the dict
        entry is replaced). A class is inserted into its default host organ
        (:meth:`LesionSpec.resolve_host`); a class without one (e.g. ``tumour_core``) or a host too
        small is not, and says why. Returns ``(inserted per class, why not per class, measured
        diameters in mm of the inserted lesions per class)``."""
        from medsynth.pipelines.lesions import LesionSpec, insert_lesions
        from medsynth.pipelines.pipeline import centred_ras_affine

        inserted, refused, measured = {}, {}, {}
        rng = np.random.default_rng(seed)
        for name, (low, high) in diameters.items():
            short = max(0, int(lesions.get(name, 0)) - int(best["drawn"].get(name, 0)))
            if short == 0:
                continue
            if low > 0:  # "liver lesion d mm": the accepted range is [d / t, d * t]; insert at d +/- 10 %
                stated = float(np.sqrt(low * high))
                bottom, top = stated / 1.1, stated * 1.1
            else:  # "N liver lesions, largest d mm": the accepted range is [0, d * t]; insert at d / 2 .. d
                top = high / FINDING_SIZE_TOLERANCE
                bottom = top / 2.0
            volume = Volume(best["map"], centred_ras_affine(best["map"].shape, self.native_spacing), "label")
            try:
                spec = LesionSpec(name, short, bottom, top)
                placed, records = insert_lesions(volume, [spec], self.labels, rng)
            except ConfigError as err:  # no host organ, a host too small, a count over the limit: recorded
                refused[name] = f"not inserted: {err}"
                continue
            best["map"] = np.asarray(placed.array).astype(best["map"].dtype)
            inserted[name] = short
            measured[name] = [float(r["diameter_mm"]) for r in records]
        return inserted, refused, measured

__all__ = ["LabelGenerator", "parse_attribute_items", "DEFAULT_MAX_DRAWS", "SIZE_QUANTILE_TOLERANCE",
           "FINDING_SIZE_TOLERANCE"]
