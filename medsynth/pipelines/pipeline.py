"""MedSynthPipeline: prompt (+ metadata) -> synthetic 3D volume in physical units.

A pipeline folder (written by :func:`medsynth.pipelines.assemble.assemble_pipeline`)::

    pipeline.json          every component with its relative path and sha256, the scheduler
                           settings, the latent scale factor, the intensity mapping, labels,
                           modality and the training defaults (size, spacing, metadata)
    autoencoder/           config.json + model.safetensors  (stage-1 VQ-GAN export)
    dit/                   config.json + model.safetensors  (stage-2 DiT export, with a learned
                           vocabulary text encoder's weights; a frozen Hugging Face encoder is
                           referenced by name_or_path, not copied)
    controlnet/            optional: config.json + model.safetensors (mask ControlNet export)
    quality.json           optional: per-class intensity ranges and the baseline segmenter of
                           the quality gate, fit on the training split
    bank/                  optional: a mask bank (``medsynth labels bank``) to draw masks from
    label_generator/       optional: config.json + model.safetensors (``medsynth labels fit``),
                           a model that makes new masks from text and attributes
    refiner/               optional: config.json + model.safetensors (``medsynth refiner fit``),
                           refines mask-conditioned images from their mask at full resolution

Masks: with a ControlNet, ``pipe(prompt, mask=label_volume)`` generates an image on exactly the
mask's grid (shape and affine), so the mask *is* its label map.

Sampling: noise ``(B, L, x, y, z)`` -> :func:`medsynth.pipelines.sampling.denoise` (the one
denoising loop) -> divide by the cache's scale factor -> :func:`decode_tiled` (memory depends
on the decode window, not on the volume) -> with a mask and a refiner, the mask refiner (windows
of the same size) -> ``IntensityMapping.inverse`` -> :class:`Volume`.

Units: CT comes back in HU (the inverse of the training HU window). MR training cases are each
scaled by their own 0.5/99.5 percentiles, so there is no scanner unit to return to: MR comes
back *normalised*, 0 = the 0.5th and 1 = the 99.5th percentile of a typical case
(``intensity_unit = "normalised"``).

Sizes: every image axis must be a multiple of ``downsample_factor x DiT patch``. Other sizes
are padded up to the next multiple, generated, and centre-cropped back to the requested size
(the padding only widens the field of view the model sees; the returned grid is exactly the
one asked for).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsynth.data.transforms import IntensityMapping
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import file_sha256
from medsynth.io.volume import Volume, VolumeMetadata
from medsynth.models.embeddings import sequence_named_in

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "medsynth.pipeline"
PIPELINE_VERSION = 1
COMPONENTS: tuple[str, ...] = ("autoencoder", "dit")  # required; controlnet, quality, bank, label_generator optional
QUALITY_FILE = "quality.json"
# Metadata the DiT is conditioned on (see medsynth.models.embeddings.encode_metadata); anything
# else would be silently ignored by the model, so it is refused instead.
METADATA_KEYS: tuple[str, ...] = ("modality", "region", "spacing", "sex", "age", "sequence")
MAX_BATCH = 64


def centred_ras_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """``(4, 4)`` RAS affine of an axis-aligned grid ``size`` with ``spacing`` mm, centred on 0."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = -(np.asarray(size, dtype=np.float64) - 1) / 2 * spacing_arr
    return affine


def read_pipeline_record(path: str | Path) -> dict[str, Any]:
    """The parsed ``pipeline.json`` of a pipeline folder (InputError naming the file otherwise)."""
    root = Path(path)
    file = root / PIPELINE_FILE
    if not root.is_dir():
        raise InputError("pipeline folder does not exist; create one with `medsynth assemble`", root)
    if not file.is_file():
        raise InputError(f"missing {PIPELINE_FILE}; this is not a pipeline folder (create one with "
                         f"`medsynth assemble`)", root)
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err}); re-run `medsynth assemble`", file) from None
    if not isinstance(record, dict) or record.get("format") != PIPELINE_FORMAT:
        raise InputError(f"not a medsynth pipeline record (needs \"format\": \"{PIPELINE_FORMAT}\")", file)
    missing = sorted({"components", "scheduler", "latent", "intensity", "modality", "defaults"} - set(record))
    if missing:
        raise InputError(f"pipeline record lacks {missing}; re-run `medsynth assemble`", file)
    return record


def verify_components(root: str | Path, record: Mapping[str, Any], check_hashes: bool = True) -> None:
    """Check that every component file named in ``record`` exists (and matches its sha256).

    Raises:
        InputError: naming the missing or altered file.
    """
    root = Path(root)
    components = record["components"]
    for name in COMPONENTS:
        if name not in components:
            raise InputError(f"pipeline.json names no {name!r} component; re-run `medsynth assemble`",
                             root / PIPELINE_FILE)
    for name, comp in components.items():
        for rel, digest in dict(comp.get("files") or {}).items():
            file = root / comp["path"] / rel
            if not file.is_file():
                raise InputError(f"missing file of the {name!r} component; the pipeline folder is incomplete "
                                 f"(re-run `medsynth assemble`)", file)
            if check_hashes and file_sha256(file) != digest:
                raise InputError(f"sha256 of the {name!r} component does not match pipeline.json "
                                 f"({digest[:12]}...); the file was changed or corrupted", file)


class MedSynthPipeline:
    """Text (+ metadata) to 3D volume, loaded from a pipeline folder.

    Build with :meth:`from_pretrained`. Attributes: ``autoencoder`` (VQGAN), ``dit`` (DiT3D),
    ``text_encoder``, ``record`` (pipeline.json), ``pipeline_hash`` (sha256 of pipeline.json),
    ``modality``, ``labels``, ``intensity`` (IntensityMapping to physical units),
    ``intensity_unit``, ``scale_factor``, ``default_size``, ``default_spacing``,
    ``default_metadata``, ``device``; ``controlnet`` (ControlNet3D or None), ``refiner``
    (MaskRefiner3D applied to mask-conditioned images, or None), ``quality``
    (the parsed quality.json or None), ``bank_path`` (the stored mask bank or None) and
    ``label_generator_path`` (the stored label generator export or None).
    """

    def __init__(self, autoencoder: nn.Module, dit: nn.Module, text_encoder: nn.Module,
                 record: Mapping[str, Any], pipeline_hash: str = "", path: Path | None = None,
                 device: torch.device | str = "cpu", controlnet: nn.Module | None = None,
                 refiner: nn.Module | None = None) -> None:
        self.autoencoder, self.dit, self.text_encoder = autoencoder, dit, text_encoder
        self.controlnet = controlnet
        self.refiner = refiner
        self.record = dict(record)
        self.pipeline_hash = pipeline_hash
        self.path = path
        self.device = torch.device(device)
        self.modality = str(record["modality"])
        self.labels = {str(k): int(v) for k, v in dict(record.get("labels") or {"background": 0}).items()}
        self.intensity = IntensityMapping.from_dict(record["intensity"])
        self.intensity_unit = str(record.get("intensity_unit") or ("HU" if self.modality == "CT" else "normalised"))
        latent = record["latent"]
        self.scale_factor = float(latent["scale_factor"])
        defaults = record["defaults"]
        self.default_size = tuple(int(s) for s in defaults["size"])
        self.default_spacing = tuple(float(s) for s in defaults["spacing"])
        self.default_metadata = dict(defaults.get("metadata") or {})
        decode = dict(record.get("decode") or {})
        self.decode_window = None if decode.get("window") is None else tuple(decode["window"])
        self.decode_overlap = None if decode.get("overlap") is None else tuple(decode["overlap"])
        comps = dict(record.get("components") or {})
        self.bank_path = None if path is None or "bank" not in comps else Path(path) / comps["bank"]["path"]
        self.label_generator_path = (None if path is None or "label_generator" not in comps
                                     else Path(path) / comps["label_generator"]["path"])
        self.quality: dict[str, Any] | None = None
        if path is not None and "quality" in comps:
            quality_dir = Path(path) / comps["quality"]["path"]
            self.quality = json.loads((quality_dir / QUALITY_FILE).read_text("utf-8"))
            segmenter = self.quality.get("segmenter") or {}
            if segmenter.get("path"):  # the trained agreement segmenter: resolved to where it is now
                segmenter["path"] = str((quality_dir / segmenter["path"]).resolve())
        control = dict(comps.get("controlnet") or {})
        self.default_mask_guidance = control.get("mask_guidance_scale")
        self.default_guidance_rescale = float(control.get("guidance_rescale") or 0.0)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        verify: bool = True) -> "MedSynthPipeline":
        """Load a pipeline folder onto ``device``.

        Args:
            path: the folder written by ``medsynth assemble``.
            device: "cpu", "cuda", "cuda:N" or "mps"; must exist here.
            verify: check every component file's sha256 against pipeline.json (a few seconds
                for GB-sized models; keep it on unless the folder is known good).

        Raises:
            InputError: missing folder/files, hash mismatch, or components that do not fit
                together.
            ConfigError: a device that is not available.
        """
        from medsynth.io.checkpoint import load_autoencoder
        from medsynth.pipelines.sampling import resolve_device
        # load_dit lives with the Lightning module; importing it pulls in Lightning (slower import).
        from medsynth.training.dit import load_dit

        root = Path(path)
        dev = resolve_device(device)
        record = read_pipeline_record(root)
        verify_components(root, record, check_hashes=verify)
        comps = record["components"]
        autoencoder, _ = load_autoencoder(root / comps["autoencoder"]["path"], device=dev)
        dit, text_encoder, dit_export = load_dit(root / comps["dit"]["path"], device=dev)
        if dit.config.in_channels != autoencoder.config.latent_channels:
            raise InputError(f"the DiT makes {dit.config.in_channels}-channel latents but the autoencoder "
                             f"decodes {autoencoder.config.latent_channels}; assemble matching components",
                             root / PIPELINE_FILE)
        controlnet = None
        if "controlnet" in comps:
            from medsynth.training.controlnet import check_base_dit, load_controlnet

            controlnet, cn_export = load_controlnet(root / comps["controlnet"]["path"], device=dev)
            try:
                check_base_dit(controlnet, cn_export, dit)
            except ConfigError as err:
                raise InputError(str(err), root / comps["controlnet"]["path"]) from None
        refiner = None
        if "refiner" in comps:
            from medsynth.training.mask_refiner import load_mask_refiner

            refiner, _ = load_mask_refiner(root / comps["refiner"]["path"], device=dev)
            if controlnet is None or refiner.config.num_classes != controlnet.config.num_classes:
                raise InputError(f"the mask refiner reads {refiner.config.num_classes} label values but the "
                                 f"ControlNet {'is missing' if controlnet is None else 'reads ' + str(controlnet.config.num_classes)}; "
                                 f"assemble matching components", root / comps["refiner"]["path"])
        return cls(autoencoder, dit, text_encoder, record, file_sha256(root / PIPELINE_FILE), root, dev, controlnet,
                   refiner)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """Image voxels per DiT token along (X, Y, Z): ``downsample_factor * patch_size``."""
        f = int(self.autoencoder.downsample_factor)
        return tuple(f * int(p) for p in self.dit.config.patch_size)  # type: ignore[return-value]

    def padded_size(self, size: Sequence[int]) -> tuple[int, int, int]:
        """``size`` rounded up per axis to a multiple of :attr:`size_multiple`."""
        return tuple(math.ceil(s / m) * m for s, m in zip(size, self.size_multiple))  # type: ignore[return-value]

    def _check_size(self, size: Sequence[int] | None) -> tuple[int, int, int]:
        if size is None:
            return self.default_size  # type: ignore[return-value]
        values = tuple(size)
        if len(values) != 3 or any(isinstance(s, bool) or int(s) != s or int(s) < 1 for s in values):
            raise ConfigError(f"expects size to be 3 positive integers (X, Y, Z), but got size={size!r}")
        return tuple(int(s) for s in values)  # type: ignore[return-value]

    def _check_spacing(self, spacing: Sequence[float] | float | None) -> tuple[float, float, float]:
        if spacing is None:
            return self.default_spacing  # type: ignore[return-value]
        values = (spacing,) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
        if len(values) != 3 or not all(np.isfinite(float(v)) and float(v) > 0 for v in values):
            raise ConfigError(f"expects spacing to be 3 positive mm values (X, Y, Z), but got spacing={spacing!r}")
        return tuple(float(v) for v in values)  # type: ignore[return-value]

    def conditioning_metadata(self, metadata: Mapping[str, Any] | None,
                              spacing: Sequence[float]) -> dict[str, Any]:
        """Training defaults updated with ``metadata``; spacing is the generated spacing.

        Raises:
            ConfigError: an unknown key, or a modality other than the pipeline's.
        """
        given = dict(metadata or {})
        unknown = sorted(set(given) - set(METADATA_KEYS))
        if unknown:
            raise ConfigError(f"unknown metadata key(s) {unknown}; the model is conditioned on {list(METADATA_KEYS)}")
        if given.get("modality") is not None and str(given["modality"]).upper() != self.modality.upper():
            raise ConfigError(f"this pipeline makes {self.modality} volumes (its autoencoder and intensity mapping "
                              f"are {self.modality}), but metadata asks for modality {given['modality']!r}")
        if given.get("sequence") is not None and not self.dit.config.sequences:
            raise ConfigError(f"metadata gives sequence {given['sequence']!r}, but this pipeline's DiT was trained "
                              "without a sequence field (model.sequences is empty); name the sequence in the prompt")
        record = {**self.default_metadata, **{k: v for k, v in given.items() if v is not None}}
        record["modality"] = self.modality
        record["spacing"] = [float(s) for s in spacing]
        return record

    def prompt_metadata(self, record: Mapping[str, Any], prompt: str | None) -> dict[str, Any]:
        """``record`` for one prompt: when the DiT has a sequence field and ``record`` gives no
        sequence, the one the prompt names (``"MR head T2, ..."`` -> T2), if it names exactly one."""
        record = dict(record)
        if self.dit.config.sequences and record.get("sequence") is None:
            named = sequence_named_in(prompt, self.dit.config.sequences)
            if named is not None:
                record["sequence"] = named
        return record

    # -- sampling ------------------------------------------------------------------------------

    def _prompts(self, prompt: str | Sequence[str | None] | None, batch: int | None) -> list[str | None]:
        prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
        if batch is not None and len(prompts) == 1:
            prompts = prompts * batch
        if not 1 <= len(prompts) <= MAX_BATCH:
            raise ConfigError(f"expects 1 to {MAX_BATCH} prompts per call, but got {len(prompts)}")
        for p in prompts:
            if p is not None and (not isinstance(p, str) or not p.strip()):
                raise ConfigError(f"prompt {p!r} is empty; describe the scan (e.g. 'CT abdomen, liver lesion "
                                  f"20 mm'), or pass prompt=None for text-free sampling")
        return prompts

    def check_mask(self, mask: Volume) -> None:
        """ConfigError unless ``mask`` can condition this pipeline: a ControlNet is present, it is
        a non-empty integer label map and every value is a label the ControlNet was trained on."""
        if self.controlnet is None:
            raise ConfigError("this pipeline has no ControlNet, so it cannot generate from a mask; assemble it "
                              "with `medsynth assemble ... --controlnet DIR` (a `medsynth controlnet fit` export)")
        from medsynth.pipelines.masks import label_lookup

        if mask.kind != "label" or not np.issubdtype(np.asarray(mask.array).dtype, np.integer):
            raise ConfigError(f"expects the mask as an integer label Volume (kind 'label'), but got kind "
                              f"{mask.kind!r} with dtype {np.asarray(mask.array).dtype}")
        present = [int(v) for v in np.unique(mask.array)]
        if not any(present):
            raise ConfigError("the mask is empty (every voxel is background); give a mask with at least one label")
        known = {n: v for n, v in self.labels.items() if v < int(self.controlnet.config.num_classes)}
        label_lookup(None, known, present)  # ConfigError listing the known labels

    def _mask_batch(self, mask: Volume | Sequence[Volume], batch: int, size: Sequence[int] | None,
                    spacing: Sequence[float] | float | None) -> tuple[list[Volume], tuple[int, int, int]]:
        masks = [mask] if isinstance(mask, Volume) else list(mask)
        if len(masks) not in (1, batch):
            raise ConfigError(f"got {len(masks)} masks for {batch} prompts; give one mask or one per prompt")
        first = masks[0]
        for m in masks:
            self.check_mask(m)
            if m.shape != first.shape or not np.allclose(m.affine, first.affine):
                raise ConfigError("masks generated together must share one grid (shape and affine); generate "
                                  "masks on other grids in separate calls")
        if size is not None and tuple(int(s) for s in size) != first.shape:
            raise ConfigError(f"size={tuple(size)} differs from the mask's grid {first.shape}; the image is "
                              f"generated on the mask's grid (leave size out or resample the mask)")
        if spacing is not None and not np.allclose(self._check_spacing(spacing), first.spacing, atol=1e-4):
            raise ConfigError(f"spacing={spacing!r} differs from the mask's spacing "
                              f"{tuple(round(s, 4) for s in first.spacing)}; leave spacing out")
        return masks * (batch // len(masks)), first.shape

    def negative_prompts(self, negative_prompt: str | Sequence[str] | None, prompts: Sequence[str | None],
                          guidance: float, masked: bool, mask_guidance_scale: float | None) -> list[str] | None:
        """One negative prompt per prompt, or None; ConfigError where it could not act."""
        if negative_prompt is None:
            return None
        if any(p is None for p in prompts):
            raise ConfigError("negative_prompt needs a prompt for every volume: under guidance it replaces the "
                              "null text, so with prompt=None there is nothing to guide towards")
        mask_guided = masked and (mask_guidance_scale if mask_guidance_scale is not None
                                  else self.default_mask_guidance) not in (None, 1.0)
        if guidance == 1.0 and not mask_guided:
            raise ConfigError("negative_prompt acts through classifier-free guidance, but guidance_scale is 1 "
                              "(no guidance); give a guidance_scale other than 1 (e.g. 3)")
        negatives = self._prompts(negative_prompt, len(prompts))
        if len(negatives) != len(prompts):
            raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one for all "
                              "or one per prompt")
        if any(n is None for n in negatives):
            raise ConfigError("negative_prompt holds None; give text for every volume, or leave negative_prompt out")
        return [str(n) for n in negatives]

    def mask_onehot(self, masks: Sequence[Volume], padded: Sequence[int]) -> Tensor:
        """The masks, padded (background, centred) to ``padded``, one-hot: ``(B, K, PX, PY, PZ)``
        float32 on the CPU (K: the ControlNet's label values)."""
        from medsynth.models.controlnet import one_hot_mask

        size = masks[0].shape
        start = [(p - s) // 2 for p, s in zip(padded, size)]
        label = torch.zeros((len(masks), *padded), dtype=torch.long)  # (B, PX, PY, PZ)
        for i, m in enumerate(masks):
            label[i, start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                  start[2]:start[2] + size[2]] = torch.from_numpy(np.asarray(m.array).astype(np.int64))
        return one_hot_mask(label, int(self.controlnet.config.num_classes))

    def _mask_hook(self, onehot: Tensor, text: Any, meta: Any, negative_text: Any = None) -> Any:
        """The ControlNet's ``block_residuals_fn`` for one-hot masks ``(B, K, PX, PY, PZ)``."""
        from medsynth.models.controlnet import make_block_residuals_fn

        param = next(self.controlnet.parameters())
        return make_block_residuals_fn(self.controlnet, onehot.to(self.device, param.dtype), text, meta,
                                       guide_mask=True, negative_text=negative_text)

    def refine_decoded(self, images: Tensor, onehot: Tensor) -> Tensor:
        """Apply the mask refiner to decoded images ``(B, 1, PX, PY, PZ)`` (model range, CPU) with
        their one-hot masks ``(B, K, PX, PY, PZ)``; windows of the decode window (overlapping,
        Gaussian-blended: MONAI's sliding-window inferer) run on the pipeline's device, so large
        volumes never sit on it whole."""
        from monai.inferers import sliding_window_inference

        param = next(self.refiner.parameters())
        window = tuple(images.shape[2:]) if self.decode_window is None else tuple(
            min(int(w), s) for w, s in zip(self.decode_window, images.shape[2:]))
        window = tuple(max(2, w - w % 2) for w in window)  # the refiner halves each axis once

        def predict(x: Tensor) -> Tensor:
            x = x.to(self.device, param.dtype)
            return self.refiner(x[:, :1], x[:, 1:]).float()

        return sliding_window_inference(torch.cat([images.float(), onehot.float()], dim=1), window, 1, predict,
                                        overlap=0.25, mode="gaussian", sw_device=self.device, device="cpu")

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str | None] | None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 spacing: Sequence[float] | float | None = None, size: Sequence[int] | None = None,
                 metadata: Mapping[str, Any] | None = None, progress: bool = False,
                 mask: Volume | Sequence[Volume] | None = None,
                 mask_guidance_scale: float | None = None,
                 negative_prompt: str | Sequence[str] | None = None, refine: bool = True,
                 guidance_rescale: float | None = None) -> list[Volume]:
        """Generate one volume per prompt (with a mask: one image per prompt for that label map).

        Args:
            prompt: a description, a list of them (one volume each), or None (text-free: the
                model's null text embedding). Over-long prompts are truncated with a warning.
            num_inference_steps: scheduler steps (default: the pipeline's).
            guidance_scale: classifier-free guidance (default: the pipeline's; 1 disables).
            generator: seeds the noise; a list gives each volume its own generator, so volume
                ``i`` does not depend on how many are generated together.
            spacing: voxel size in mm (default: the training spacing); also the DiT's spacing
                condition.
            size: ``(X, Y, Z)`` voxels (default: the training size); see module docstring for
                sizes that are not a multiple of :attr:`size_multiple`.
            metadata: conditioning values among :data:`METADATA_KEYS` (region, sex, age, ...);
                missing ones come from the training data.
            progress: show the denoising progress bar.
            mask: a ``label`` Volume (dataset label values, see
                :func:`medsynth.pipelines.masks.map_user_mask` for masks from elsewhere), or one
                per prompt on one grid. The images are generated on exactly its grid: size,
                spacing and affine are the mask's, so the mask is the images' label map. Needs a
                ControlNet in the pipeline.
            mask_guidance_scale: separate mask guidance (default: the ControlNet's; None or
                without a stored default: text and mask are guided together at
                ``guidance_scale``). Needs a mask.
            negative_prompt: what the volumes should not show (e.g. "no lesion" against "liver
                lesion 30 mm"), one for all or one per prompt. Under guidance it stands where the
                null text would, so guidance pushes from it towards the prompt (diffusers'
                ``negative_prompt``). Needs a prompt and guidance (a scale other than 1).
            refine: with a mask and a mask refiner in the pipeline, refine the decoded images
                from the mask at full resolution (see :mod:`medsynth.models.mask_refiner`);
                False skips it. Without either it has no effect.
            guidance_rescale: in ``[0, 1]``, how far the guided prediction is pulled back to the
                conditional one's spread (see :func:`~medsynth.pipelines.sampling.denoise`;
                guidance otherwise brightens what it draws). Default: the ControlNet's
                (``sampling.guidance_rescale``) for mask-conditioned volumes, 0 otherwise.

        Returns:
            ``Volume`` list: ``(X, Y, Z)`` float32 in HU (CT) or normalised units (MR),
            ``metadata.synthetic = True``; a RAS affine centred on the origin with ``spacing``,
            or, with a mask, the mask's shape and affine (bit-identical).

        Raises:
            ConfigError: empty prompts, unknown metadata keys or values, bad size/spacing/steps;
                a mask without a ControlNet, an empty mask, labels the ControlNet never saw.
        """
        from medsynth.diffusion.schedulers import make_scheduler
        from medsynth.models.tiling import decode_tiled
        from medsynth.pipelines.sampling import Conditions, denoise

        gens = list(generator) if isinstance(generator, Sequence) else None
        prompts = self._prompts(prompt, None if gens is None else len(gens))
        batch = len(prompts)
        if gens is not None and len(gens) != batch:
            raise ConfigError(f"got {len(gens)} generators for {batch} prompts; give one per prompt or one in all")
        masks = None
        if mask is not None:
            masks, size_ = self._mask_batch(mask, batch, size, spacing)
            spacing_ = tuple(float(v) for v in masks[0].spacing)
        else:
            if mask_guidance_scale is not None:
                raise ConfigError("mask_guidance_scale needs a mask")
            size_ = self._check_size(size)
            spacing_ = self._check_spacing(spacing)
        sched_cfg = dict(self.record["scheduler"])
        steps = int(sched_cfg.get("num_inference_steps", 30)) if num_inference_steps is None else num_inference_steps
        guidance = float(sched_cfg.get("guidance_scale", 1.0)) if guidance_scale is None else float(guidance_scale)
        base_record = self.conditioning_metadata(metadata, spacing_)
        records = [self.prompt_metadata(base_record, p) for p in prompts]
        meta = self.dit.encode_metadata(records)  # ConfigError for unknown values

        padded = self.padded_size(size_)
        if padded != size_:
            log.info("size %s is not a multiple of %s: generating %s and centre-cropping", size_,
                     self.size_multiple, padded)
        f = int(self.autoencoder.downsample_factor)
        channels = int(self.dit.config.in_channels)
        shape = (batch, channels, *(p // f for p in padded))
        latents = None
        if gens is not None:
            # Noise per volume from its own generator (on the generator's device, as denoise does).
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).to(self.device)
                                 for g in gens])
        text = None
        if any(p is not None for p in prompts):
            text = self.text_encoder.encode([p or "" for p in prompts], device=self.device)
        negatives = self.negative_prompts(negative_prompt, prompts, guidance, masks is not None,
                                           mask_guidance_scale)
        negative_text = None if negatives is None else self.text_encoder.encode(negatives, device=self.device)
        scheduler = make_scheduler(sched_cfg.get("objective", "rectified_flow"), sched_cfg.get("sampler"),
                                   int(sched_cfg.get("num_train_timesteps", 1000)), float(sched_cfg.get("shift", 1.0)))
        if latents is not None:
            latents = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))
        hook, mask_guidance, onehot = None, None, None
        if masks is not None:
            onehot = self.mask_onehot(masks, padded)  # (B, K, PX, PY, PZ)
            hook = self._mask_hook(onehot, text, meta, negative_text)
            mask_guidance = self.default_mask_guidance if mask_guidance_scale is None else mask_guidance_scale
            mask_guidance = None if mask_guidance is None else float(mask_guidance)
        if guidance_rescale is None:
            guidance_rescale = self.default_guidance_rescale if masks is not None else 0.0
        z = denoise(self.dit, scheduler, shape, Conditions(text, meta, negative_text), steps, guidance,
                    gens[0] if gens else generator, latents=latents, device=self.device, progress=progress,
                    block_residuals_fn=hook, mask_guidance_scale=mask_guidance,
                    guidance_rescale=float(guidance_rescale))
        z = z / self.scale_factor
        images = decode_tiled(self.autoencoder, z, self.decode_window, self.decode_overlap,
                              output_device="cpu")  # (B, 1, PX, PY, PZ) in model range
        refined = onehot is not None and self.refiner is not None and refine
        if refined:
            images = self.refine_decoded(images, onehot)
        start = [(p - s) // 2 for p, s in zip(padded, size_)]
        images = images[:, 0, start[0]:start[0] + size_[0], start[1]:start[1] + size_[1],
                        start[2]:start[2] + size_[2]]
        physical = self.intensity.inverse(images).numpy().astype(np.float32)  # (B, X, Y, Z)
        affine = centred_ras_affine(size_, spacing_) if masks is None else np.array(masks[0].affine, copy=True)
        orientation = ("R", "A", "S") if masks is None else masks[0].metadata.orientation
        out = []
        for i in range(batch):
            extra = {"generator": "medsynth.MedSynthPipeline", "prompt": prompts[i],
                     **({} if negatives is None else {"negative_prompt": negatives[i]}),
                     "pipeline_hash": self.pipeline_hash, "num_inference_steps": steps,
                     "guidance_scale": guidance, "guidance_rescale": float(guidance_rescale),
                     "metadata": records[i]}
            if masks is not None:
                extra.update(conditioned_on_mask=True, mask_guidance_scale=mask_guidance, refined_with_mask=refined)
            out.append(Volume(physical[i], affine.copy(), "image",
                              VolumeMetadata(modality=self.modality, intensity_unit=self.intensity_unit,
                                             orientation=orientation, synthetic=True, extra=extra)))
        return out


__all__ = ["MedSynthPipeline", "PIPELINE_FILE", "QUALITY_FILE", "METADATA_KEYS", "centred_ras_affine",
           "read_pipeline_record",
           "verify_components"]
