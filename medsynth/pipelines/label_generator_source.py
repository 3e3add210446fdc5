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

Asked lesion counts are *held*, not just steered (the DiT alone gets them right only part of the
time: docs/benchmarks/label_generator_cpu.md): a map with fewer lesions than asked is drawn again
from fresh noise, up to ``lesion_count_tries`` draws in all, keeping the draw with the most; then
the largest lesions up to the asked count are kept and any further ones are filled with the tissue
around them (:func:`medsynth.pipelines.lesions.keep_largest_lesions`). Each map records its draws,
the lesions it removed and whether the count was met (``metadata.extra["mask_source"]
["lesion_counts"]``); ``lesion_count_tries=0`` returns the model's own maps unchanged.
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

# Draws per map when a lesion count is asked: the tiny model on CT phantoms has 2 or more lesions
# in ~45 % of the maps asked for 2, so 8 draws meet the count ~99 % of the time (at ~0.1-0.3 s each).
DEFAULT_LESION_COUNT_TRIES = 8


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
    ``class_offsets`` (the decoder's per-class logit offsets, or None), ``lesion_count_tries``
    (draws per map to meet an asked lesion count; 0 = the model's own maps, see module docstring),
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
        self.lesion_count_tries = DEFAULT_LESION_COUNT_TRIES
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
                 scheduler: Any = None) -> list[Volume]:
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
        asked = {name[len(LESION_PREFIX):]: int(v) for name, v in attributes.items() if name.startswith(LESION_PREFIX)}
        count_records: list[dict[str, Any] | None] = [None] * batch
        if asked and self.lesion_count_tries > 0:
            for i in range(batch):
                label[i], count_records[i] = self._hold_lesion_counts(label[i], asked, lambda i=i: draw([i])[0])
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
            if count_records[i] is not None:
                volume.metadata.extra["mask_source"]["lesion_counts"] = count_records[i]
            out.append(volume)
        return out

    def _hold_lesion_counts(self, label: np.ndarray, asked: Mapping[str, int],
                            redraw: Callable[[], np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        """Meet the asked lesion counts on one native map ``(X, Y, Z)`` (see module docstring).

        ``redraw()`` gives a fresh map of the same request. Returns the map and a record
        ``{"asked", "drawn" (lesions per class in the kept draw), "draws", "removed", "met"}``.
        """
        from medsynth.evaluation.label_statistics import STRUCTURE_26
        from medsynth.pipelines.lesions import keep_largest_lesions
        from scipy import ndimage

        def found(candidate: np.ndarray) -> dict[str, int]:
            return {name: int(ndimage.label(candidate == self.labels[name], structure=STRUCTURE_26)[1])
                    for name in asked}

        def shortfall(counts: Mapping[str, int]) -> int:
            return sum(max(0, asked[name] - counts[name]) for name in asked)

        best, best_counts, draws = label, found(label), 1
        while shortfall(best_counts) > 0 and draws < self.lesion_count_tries:
            candidate = redraw()
            counts, draws = found(candidate), draws + 1
            if shortfall(counts) < shortfall(best_counts):
                best, best_counts = candidate, counts
        removed = {}
        for name, count in asked.items():
            best, removed[name] = keep_largest_lesions(best, self.labels[name], count)
        return best, {"asked": dict(asked), "drawn": best_counts, "draws": draws, "removed": removed,
                      "met": shortfall(best_counts) == 0}


__all__ = ["LabelGenerator", "parse_attribute_items"]
