"""``medsynth generate``: a pipeline -> a synthetic dataset folder in the layout of real data.

Layout written (nnU-Net v2, by :class:`~medsynth.data.writer.DatasetWriter`)::

    OUT/imagesTr/synth_0000_0000.nii.gz ...   generated images (marked synthetic in the header)
    OUT/labelsTr/synth_0000.nii.gz ...        the conditioning mask (or a placeholder, below)
    OUT/dataset.json  prompts.jsonl  splits.json
    OUT/provenance.jsonl                      one line per case: prompt, seed, steps, guidance,
                                              pipeline hash, size, spacing, metadata, time; with
                                              masks also the mask source, lesions and quality gate
    OUT/dicom/synth_0000/*.dcm                with --format dicom|both (SYNTHETIC-marked series)
    OUT/dicom/synth_0000_seg.dcm              ... and a DICOM-SEG of the label (with masks)

Labels with masks (a ControlNet in the pipeline and ``--mask FILE`` or a mask bank): the label
map written is exactly the conditioning mask (same grid, affine and values); lesions asked for
with ``--lesion`` are painted into it before generation. Every sample passes the quality gate
(:mod:`medsynth.pipelines.quality_gate`) or is regenerated with derived seeds; one that never
passes is skipped (recorded as skipped) or, with ``keep_failed``, kept and flagged.

Labels without masks: the nnU-Net layout needs a label map per training case, so each case
gets one in which every voxel is nnU-Net v2's ``ignore`` label (value = the largest training
label + 1): "not annotated", which nnU-Net leaves out of the loss, instead of an
all-background map that would claim there is no anatomy. ``dataset.json``'s ``medsynth``
block says ``"labels": "none"``. Later stages read the folder with ``read_dataset``.

Determinism: case ``i`` uses seed ``seed + i`` and prompt ``prompts[i % len(prompts)]``, both
recorded, so one case can be regenerated alone and a rerun gives identical volumes (same
device and library versions).

Resumable: a case whose image (and DICOM series, if asked for) exists is skipped and never
rewritten. The generation settings are stored in ``dataset.json``'s ``medsynth`` block, so a
rerun with other settings into the same folder is refused instead of mixing cohorts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsynth.data.manifest import Dataset
from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import write_text_atomic
from medsynth.io.provenance import provenance_record, read_provenance_file
from medsynth.io.volume import Volume, VolumeMetadata
from medsynth.pipelines.case_output import dicom_complete, placeholder_label, write_case_dicom
from medsynth.pipelines.pipeline import MedSynthPipeline

log = logging.getLogger(__name__)
PROVENANCE_FILE = "provenance.jsonl"
FORMATS: tuple[str, ...] = ("nifti", "dicom", "both")
CASE_PREFIX = "synth"
MAX_SEED = 2 ** 63 - 1
IGNORE_LABEL = "ignore"  # nnU-Net v2's name for "voxel not annotated" (must be the largest value)
MASK_SOURCES: tuple[str, ...] = ("bank", "generator")


@dataclass
class GenerationSettings:
    """What a ``generate`` run makes; identical settings make identical cases.

    Attributes:
        prompts: descriptions, cycled over the cases (case ``i`` gets ``prompts[i % n]``).
        num: number of cases.
        seed: case ``i`` is seeded with ``seed + i``.
        num_inference_steps, guidance_scale: None = the pipeline's defaults.
        size, spacing: None = the training size / spacing.
        metadata: conditioning values (region, sex, age).
        format: "nifti"; "dicom" or "both" also write a DICOM series per case (and a DICOM-SEG
            of its label when masks are used).
        mask: a label-map file conditioning every case (needs a ControlNet).
        mask_labels: JSON label table of ``mask`` (a dataset.json or ``{name: value}``), when its
            values are not the model's.
        mask_source: "bank" (draw and augment a training mask per case) or "generator" (the
            pipeline's label generator makes a new mask per case from its prompt); None: ``mask``
            if given, else the pipeline's stored bank, else its label generator (with a
            ControlNet), else images only.
        bank: a mask bank folder instead of the pipeline's stored one.
        lesions: ``CLASS:COUNT:MIN-MAXmm[:HOST]`` requests painted into each case's mask.
        mask_guidance_scale: separate mask guidance (None: the ControlNet's default).
        guidance_rescale: in [0, 1], pulls guided predictions back to the conditional one's spread
            (None: the ControlNet's default for mask-conditioned cases, else 0).
        max_retries: regenerations of a sample that fails the quality gate.
        keep_failed: keep (and flag) a sample that still fails; otherwise it is skipped.
        min_dice: least per-class Dice of large classes in the agreement check.
        quality_gate: run the quality gate on mask-conditioned samples.
        label_attributes: ``CLASS=QUANTILE`` organ-size requests for the label generator.
        lesion_counts: ``CLASS=N`` (or ``N``) lesion-count requests for the label generator.
        hold_findings: the label generator holds the lesion findings each prompt states ("liver
            lesion 38 mm", "no lesion"): count and diameter, inserting what no draw had
            (:class:`~medsynth.pipelines.label_generator_source.LabelGenerator`).
        negative_prompt: what no case should show, for every case (see
            :meth:`MedSynthPipeline.__call__`); needs guidance.
        refine: refine mask-conditioned images with the pipeline's mask refiner, when it has
            one (``--no-refiner`` turns it off).
    """

    prompts: list[str]
    num: int
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = "nifti"
    mask: str | None = None
    mask_labels: str | None = None
    mask_source: str | None = None
    bank: str | None = None
    lesions: list[str] = field(default_factory=list)
    mask_guidance_scale: float | None = None
    guidance_rescale: float | None = None
    max_retries: int = 2
    keep_failed: bool = False
    min_dice: float = 0.5
    quality_gate: bool = True
    label_attributes: list[str] = field(default_factory=list)
    lesion_counts: list[str] = field(default_factory=list)
    hold_findings: bool = False
    negative_prompt: str | None = None
    refine: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ConfigError(f"every --prompt must be non-empty text, but got {self.prompts!r}")
        if self.negative_prompt is not None and (not isinstance(self.negative_prompt, str)
                                                 or not self.negative_prompt.strip()):
            raise ConfigError(f"--negative-prompt must be non-empty text, but got {self.negative_prompt!r}")
        if isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 1:
            raise ConfigError(f"--num must be an integer >= 1, but got {self.num!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED - self.num:
            raise ConfigError(f"--seed must be an integer in [0, 2^63 - 1 - num], but got {self.seed!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown --format {self.format!r}; valid formats are {list(FORMATS)}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ConfigError(f"--steps must be >= 1, but got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ConfigError(f"--guidance must be >= 0, but got {self.guidance_scale}")
        from medsynth.pipelines.lesions import parse_lesion_specs

        if self.mask_source is not None and self.mask_source not in MASK_SOURCES:
            raise ConfigError(f"unknown --mask-source {self.mask_source!r}; valid sources are {list(MASK_SOURCES)}")
        from medsynth.pipelines.label_generator_source import parse_attribute_items

        self.label_attributes = [str(x) for x in self.label_attributes or []]
        self.lesion_counts = [str(x) for x in self.lesion_counts or []]
        parse_attribute_items(self.label_attributes, "--label-attribute")
        parse_attribute_items(self.lesion_counts, "--lesion-count", integer=True)
        if (self.label_attributes or self.lesion_counts or self.hold_findings) and self.mask_source != "generator":
            raise ConfigError("--label-attribute, --lesion-count and --hold-findings steer the label generator; add "
                              "--mask-source generator")
        if self.mask is not None and self.mask_source is not None:
            raise ConfigError("give either --mask FILE or --mask-source, not both")
        if self.mask_labels is not None and self.mask is None:
            raise ConfigError("--mask-labels names the values of a --mask file; give --mask too")
        if self.bank is not None and self.mask is not None:
            raise ConfigError("--bank is a mask source; it cannot be combined with --mask")
        self.lesions = [str(x) for x in self.lesions or []]
        parse_lesion_specs(self.lesions)  # syntax errors now, before any model is loaded
        if self.mask_guidance_scale is not None and self.mask_guidance_scale < 0:
            raise ConfigError(f"--mask-guidance must be >= 0, but got {self.mask_guidance_scale}")
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"--guidance-rescale must be between 0 and 1, but got {self.guidance_rescale}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"--max-retries must be an integer >= 0, but got {self.max_retries!r}")
        if not 0.0 <= self.min_dice <= 1.0:
            raise ConfigError(f"--min-dice must lie in [0, 1], but got {self.min_dice}")

    def case(self, index: int) -> tuple[str, str, int]:
        """``(case_id, prompt, seed)`` of case ``index``."""
        return f"{CASE_PREFIX}_{index:04d}", self.prompts[index % len(self.prompts)], self.seed + index

    def to_dict(self) -> dict[str, Any]:
        """What determines the volumes (not ``format``: a rerun may add DICOM series).

        Mask settings are stored by :func:`generate_dataset` once the mask source is resolved."""
        return {"prompts": list(self.prompts), "num": self.num, "seed": self.seed,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "size": None if self.size is None else list(self.size),
                "spacing": None if self.spacing is None else list(self.spacing),
                "metadata": dict(self.metadata),
                # only when given, so folders made before the option existed resume unchanged
                **({} if self.negative_prompt is None else {"negative_prompt": self.negative_prompt}),
                **({} if self.refine else {"refine": False})}


def _write_provenance(path: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(records[k]) + "\n" for k in sorted(records)))


def generation_grid(mask: Volume, size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """RAS axis-aligned grid of ``size`` voxels at ``spacing`` mm, centred on the mask's grid centre."""
    spacing_ = np.asarray([float(v) for v in spacing])
    size_ = np.asarray([int(v) for v in size])
    centre = mask.affine @ np.append((np.asarray(mask.shape, dtype=float) - 1) / 2, 1.0)
    affine = np.diag([*spacing_, 1.0])
    affine[:3, 3] = centre[:3] - spacing_ * (size_ - 1) / 2
    return tuple(int(v) for v in size_), affine


@dataclass
class MaskPlan:
    """Where each case's conditioning mask comes from (resolved against the pipeline).

    Attributes:
        source: "user" (one ``--mask`` file for every case), "bank" or "generator".
        labels: the model's label table (name -> value).
        user_mask: the user's mask mapped onto the generation grid (source "user").
        bank: the mask bank (source "bank"); ``size``/``spacing`` are its target grid.
        generator: the :class:`~medsynth.pipelines.label_generator_source.LabelGenerator`
            (source "generator"), sampled on ``size``/``spacing`` from the case prompt and
            ``generator_request`` (``volume_quantiles``, ``lesion_counts``, ``metadata`` and, with
            ``--hold-findings``, ``hold_findings``).
        lesions: requests painted into every case's mask.
    """

    source: str
    labels: dict[str, int]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    user_mask: Volume | None = None
    user_file: str | None = None
    bank: Any = None
    bank_dir: str | None = None
    lesions: list[Any] = field(default_factory=list)
    generator: Any = None
    generator_dir: str | None = None
    generator_request: dict[str, Any] = field(default_factory=dict)

    def case_mask(self, seed: int, prompt: str | None = None) -> tuple[Volume, dict[str, Any], list[dict[str, Any]]]:
        """``(mask, source record, lesion records)`` of the case seeded with ``seed`` (deterministic);
        ``prompt`` conditions the label generator.

        Raises:
            ConfigError: a lesion request that does not fit this mask's host organ.
        """
        from medsynth.pipelines.lesions import insert_lesions

        rng = np.random.default_rng([int(seed), 1])  # apart from the noise, which is seeded by ``seed``
        if self.source == "user":
            mask, info = self.user_mask, {"kind": "user", "file": self.user_file}
        elif self.source == "generator":
            noise = torch.Generator().manual_seed(int(rng.integers(2 ** 63 - 1)))
            mask = self.generator(prompt, [noise], size=self.size, spacing=self.spacing, **self.generator_request)[0]
            info = {**mask.metadata.extra["mask_source"], "generator": self.generator_dir}
        else:
            mask = self.bank.sample(rng, target_shape=self.size, target_spacing=self.spacing)
            info = {**mask.metadata.extra["mask_source"], "bank": self.bank_dir}
        records: list[dict[str, Any]] = []
        if self.lesions:
            mask, records = insert_lesions(mask, self.lesions, self.labels, rng)
        array = np.asarray(mask.array)
        dtype = np.uint8 if int(array.max()) < 256 else np.uint16
        label = Volume(array.astype(dtype), np.array(mask.affine, copy=True), "label",
                       VolumeMetadata(intensity_unit="label", synthetic=True,
                                      orientation=mask.metadata.orientation))
        return label, info, records

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "mask": self.user_file, "bank": self.bank_dir,
               "lesions": [str(x) for x in self.lesions]}
        if self.source == "generator":
            out.update(generator=self.generator_dir, generator_sha256=self.generator.sha256,
                       generator_request={k: v for k, v in self.generator_request.items() if k != "metadata"})
        return out


def plan_masks(pipeline: MedSynthPipeline, settings: GenerationSettings) -> MaskPlan | None:
    """Resolve the mask source: ``--mask``, ``--mask-source bank`` / ``--bank``,
    ``--mask-source generator``, the pipeline's stored bank or else its label generator (with a
    ControlNet), or None (images only, placeholder labels).

    Raises:
        ConfigError: masks or lesions asked of a pipeline without a ControlNet, lesions or mask
            guidance without any mask source, labels the model never saw, a bank missing.
        InputError, GeometryError: unreadable, empty or unmappable mask files.
    """
    from medsynth.pipelines.lesions import parse_lesion_specs

    source = "user" if settings.mask is not None else settings.mask_source
    if source is None and settings.bank is not None:
        source = "bank"
    if source is None and pipeline.controlnet is not None and pipeline.bank_path is not None:
        source = "bank"
    if source is None and pipeline.controlnet is not None and pipeline.label_generator_path is not None:
        source = "generator"
    if source is None:
        if settings.lesions:
            raise ConfigError("--lesion paints lesions into the conditioning mask, but there is none: give --mask FILE "
                              "or --mask-source bank (with a ControlNet in the pipeline)")
        if settings.mask_guidance_scale is not None:
            raise ConfigError("--mask-guidance needs a mask: give --mask FILE or --mask-source bank")
        return None
    if pipeline.controlnet is None:
        raise ConfigError("this pipeline has no ControlNet, so it cannot generate from a mask; assemble it with "
                          "`medsynth assemble ... --controlnet DIR` (a `medsynth controlnet fit` export)")
    labels = {k: v for k, v in pipeline.labels.items() if k != IGNORE_LABEL}
    size = pipeline._check_size(settings.size)
    spacing = pipeline._check_spacing(settings.spacing)
    plan = MaskPlan(source, labels, size, spacing, lesions=parse_lesion_specs(settings.lesions))
    if source == "user":
        from medsynth.io.reader import read_volume
        from medsynth.pipelines.masks import map_user_mask, read_label_names

        names = None if settings.mask_labels is None else read_label_names(settings.mask_labels)
        raw = read_volume(settings.mask, kind="label")
        plan.user_mask = map_user_mask(raw, generation_grid(raw, size, spacing), names, labels)
        plan.user_file = str(settings.mask)
    elif source == "generator":
        from medsynth.pipelines.label_generator_source import LabelGenerator, parse_attribute_items

        if settings.bank is not None:
            raise ConfigError("--bank is the mask bank source; it cannot be combined with --mask-source generator")
        if pipeline.label_generator_path is None:
            raise ConfigError("--mask-source generator needs a label generator in the pipeline: train one with "
                              "`medsynth labels fit` and assemble with --label-generator RUN/export")
        plan.generator = LabelGenerator.from_pretrained(pipeline.label_generator_path, device=pipeline.device)
        plan.generator_dir = str(pipeline.label_generator_path)
        unknown = sorted(set(plan.generator.labels.items()) - set(labels.items()))
        if unknown:
            raise ConfigError(f"the label generator makes labels {dict(unknown)} that the model does not know; "
                              f"known labels are {labels}")
        plan.generator_request = {
            "volume_quantiles": parse_attribute_items(settings.label_attributes, "--label-attribute"),
            "lesion_counts": parse_attribute_items(settings.lesion_counts, "--lesion-count", integer=True),
            "metadata": dict(settings.metadata), **({"hold_findings": True} if settings.hold_findings else {})}
        plan.generator.attribute_values(plan.generator_request["volume_quantiles"],
                                        plan.generator_request["lesion_counts"])  # refusals before any output
    else:
        from medsynth.pipelines.mask_bank import MaskBank

        folder = settings.bank if settings.bank is not None else pipeline.bank_path
        if folder is None:
            raise ConfigError("--mask-source bank needs a mask bank: give --bank DIR (`medsynth labels bank`) or "
                              "assemble the pipeline with --bank DIR")
        plan.bank, plan.bank_dir = MaskBank.load(folder), str(folder)
        unknown = sorted(set(plan.bank.labels.items()) - set(labels.items()))
        if unknown:
            raise ConfigError(f"the mask bank holds labels {dict(unknown)} that the model does not know; known "
                              f"labels are {labels}")
    return plan


def skipped_cases(out_dir: str | Path) -> list[str]:
    """Cases of a generated folder skipped because they failed the quality gate."""
    return sorted(k for k, r in read_provenance_file(Path(out_dir) / PROVENANCE_FILE).items() if r.get("skipped"))


def generate_dataset(pipeline: MedSynthPipeline, out_dir: str | Path, settings: GenerationSettings,
                     progress: bool = True, check: Any = None) -> Dataset:
    """Generate ``settings.num`` cases into the dataset folder ``out_dir`` (resumable).

    Args:
        pipeline: the loaded pipeline.
        out_dir: the dataset folder.
        settings: what to generate.
        progress: show a progress bar.
        check: the quality gate, ``(image, label) -> GateResult``; None builds
            :class:`~medsynth.pipelines.quality_gate.QualityGate` from the pipeline's
            ``quality.json`` (mask-conditioned cases only; ``settings.quality_gate=False`` or a
            pipeline without one: no gate).

    Returns:
        The dataset as read back from disk (skipped cases: :func:`skipped_cases`).

    Raises:
        ConfigError: bad settings (checked on the first case, before anything is written), or
            ``out_dir`` holds a cohort made with other settings or another pipeline.
    """
    from medsynth.data.writer import DatasetWriter
    from medsynth.pipelines.quality_gate import QualityGate, generate_checked

    out = Path(out_dir)
    # Fail before creating anything: metadata keys/values, size/spacing and masks are checked here.
    spacing = pipeline._check_spacing(settings.spacing)
    pipeline.dit.encode_metadata([pipeline.conditioning_metadata(settings.metadata, spacing)])
    pipeline._check_size(settings.size)
    plan = plan_masks(pipeline, settings)
    first_mask = None
    if plan is not None:
        first_mask = plan.case_mask(settings.case(0)[2], settings.case(0)[1])  # lesions that do not fit fail here
        pipeline.check_mask(first_mask[0])
        if check is None and settings.quality_gate and pipeline.quality is not None:
            check = QualityGate.from_record(pipeline.quality, plan.labels, min_dice=settings.min_dice)
        if not settings.quality_gate:
            check = None
    untrusted = check.warn_ungated(log) if isinstance(check, QualityGate) else []
    sched = pipeline.record["scheduler"]
    steps = settings.num_inference_steps or int(sched.get("num_inference_steps", 30))
    guidance = float(sched.get("guidance_scale", 1.0)) if settings.guidance_scale is None else settings.guidance_scale
    pipeline.negative_prompts(settings.negative_prompt, [settings.case(0)[1]], guidance, plan is not None,
                              settings.mask_guidance_scale)  # a negative prompt that could not act: refused now
    block = {"source": "medsynth generate", "synthetic": True,
             "labels": "none" if plan is None else "conditioning_mask",
             "modality": pipeline.modality,
             "intensity_unit": pipeline.intensity_unit, "pipeline_hash": pipeline.pipeline_hash,
             "generation": settings.to_dict()}
    if plan is not None:
        block["generation"]["masks"] = {**plan.to_dict(), "mask_guidance_scale": settings.mask_guidance_scale,
                                        "quality_gate": check is not None, "max_retries": settings.max_retries,
                                        "keep_failed": settings.keep_failed, "min_dice": settings.min_dice,
                                        "ungated_classes": untrusted}
    if pipeline.modality == "CT":
        block["intensity"] = pipeline.intensity.to_dict()  # the stored HU come back through this window
    trained_on = pipeline.record.get("training_data", {}).get("dataset") or "medsynth"
    labels = {k: v for k, v in pipeline.labels.items() if k != IGNORE_LABEL}
    ignore = max(labels.values()) + 1
    table = labels if plan is not None else {**labels, IGNORE_LABEL: ignore}
    writer = DatasetWriter(out, name=f"synthetic_{trained_on}", labels=table,
                           channel_names={"0": pipeline.modality}, extra_json={"medsynth": block})
    dicom = settings.format in ("dicom", "both")
    prov_path = out / PROVENANCE_FILE
    provenance = read_provenance_file(prov_path)
    changed = False
    image_dtype = "int16" if pipeline.modality == "CT" else "float32"
    for index in tqdm(range(settings.num), desc="generate", unit="case", disable=not progress):
        case_id, prompt, seed = settings.case(index)
        if provenance.get(case_id, {}).get("skipped"):
            continue  # failed the quality gate in an earlier run; deterministic, so it would fail again
        has_image = writer.has_case(case_id)
        dicom_done = not dicom or dicom_complete(out, case_id, labelled=plan is not None)
        if has_image and dicom_done and case_id in provenance:
            continue
        facts: dict[str, Any] = {"case_id": case_id, "prompt": prompt, "seed": seed, "num_inference_steps": steps,
                                 "guidance_scale": guidance, "pipeline": str(pipeline.path),
                                 "pipeline_hash": pipeline.pipeline_hash,
                                 **({} if settings.negative_prompt is None
                                    else {"negative_prompt": settings.negative_prompt})}
        if not has_image or not dicom_done:
            # Regenerating a finished image only to write its missing DICOM files is exact:
            # the case depends only on its seed and the settings.
            label = None
            if plan is None:
                volume = pipeline(prompt, steps, guidance, [torch.Generator().manual_seed(seed)],
                                  spacing=settings.spacing, size=settings.size, metadata=settings.metadata,
                                  negative_prompt=settings.negative_prompt,
                                  guidance_rescale=settings.guidance_rescale)[0]
            else:
                label, mask_info, lesion_records = first_mask if index == 0 else plan.case_mask(seed, prompt)

                def make(s: int, label: Volume = label) -> Volume:
                    return pipeline(prompt, steps, guidance, [torch.Generator().manual_seed(s)],
                                    metadata=settings.metadata, mask=label,
                                    mask_guidance_scale=settings.mask_guidance_scale,
                                    negative_prompt=settings.negative_prompt, refine=settings.refine,
                                    guidance_rescale=settings.guidance_rescale)[0]

                if has_image:  # only DICOM missing: the image that was kept
                    seed_used = int(provenance.get(case_id, {}).get("quality", {}).get("seed_used", seed))
                    volume, attempts, passed = make(seed_used), [], True
                else:
                    volume, seed_used, attempts, passed = generate_checked(make, label, seed, check,
                                                                           settings.max_retries)
                facts.update(mask=mask_info, lesions=lesion_records,
                             mask_guidance_scale=volume.metadata.extra.get("mask_guidance_scale"),
                             guidance_rescale=volume.metadata.extra.get("guidance_rescale"),
                             refined_with_mask=bool(volume.metadata.extra.get("refined_with_mask")))
                if check is not None and not has_image:
                    facts["quality"] = {"passed": passed, "seed_used": seed_used, "attempts": attempts}
                    facts["flagged"] = not passed
                if not passed and not settings.keep_failed:
                    log.warning("%s failed the quality gate after %d attempts (%s); skipped", case_id, len(attempts),
                                ", ".join(attempts[-1]["failing"]))
                    provenance[case_id] = provenance_record(modality=pipeline.modality, kind="image",
                                                            extra={**facts, "skipped": True})
                    _write_provenance(prov_path, provenance)
                    changed = True
                    continue
            volume.metadata.extra.update(seed=seed, case_id=case_id, pipeline=str(pipeline.path))
            facts.update(size=list(volume.shape), spacing=list(volume.spacing),
                         metadata=volume.metadata.extra["metadata"])
            if label is None:
                label = placeholder_label(volume, ignore, pipeline.modality)
            label.metadata.modality = pipeline.modality
            label.metadata.extra = dict(volume.metadata.extra)
            if not has_image:
                writer.add_case(case_id, volume, label, prompt=prompt,
                                metadata=volume.metadata.extra["metadata"], image_dtype=image_dtype)
            if dicom and not dicom_done:
                write_case_dicom(out, case_id, volume, label if plan is not None else None, labels, prompt=prompt,
                                 series_number=index + 1, modality=pipeline.modality)
        if case_id not in provenance:
            # A case finished by a run killed before its provenance line: the line is rebuilt
            # from the (deterministic) settings, without the regeneration's size/metadata facts.
            provenance[case_id] = provenance_record(modality=pipeline.modality, kind="image", extra=facts)
            _write_provenance(prov_path, provenance)
            changed = True
    if not any(writer.has_case(settings.case(i)[0]) for i in range(settings.num)):
        raise InputError(f"every case failed the quality gate (scores in {PROVENANCE_FILE}); lower --min-dice, "
                         f"raise --max-retries, or keep them flagged with --keep-failed", out)
    dataset = writer.finalize()
    if changed:
        log.info("wrote %s", prov_path)
    return dataset


def generate(pipeline_dir: str | Path, out_dir: str | Path, prompts: Sequence[str] | str, num: int, *,
             seed: int = 0, num_inference_steps: int | None = None, guidance_scale: float | None = None,
             size: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
             metadata: Mapping[str, Any] | None = None, format: str = "nifti", device: str = "cpu",
             verify: bool = True, progress: bool = True, **mask_options: Any) -> Dataset:
    """Load a pipeline folder and generate a dataset folder (Python form of ``medsynth generate``).

    ``mask_options``: the mask fields of :class:`GenerationSettings` (``mask``, ``mask_source``,
    ``bank``, ``lesions``, ``mask_guidance_scale``, ``max_retries``, ``keep_failed``, ...) and
    ``negative_prompt``.
    """
    size_ = None if size is None else tuple(int(s) for s in size)
    spacing_ = None if spacing is None else tuple(float(v) for v in spacing)
    settings = GenerationSettings([prompts] if isinstance(prompts, str) else list(prompts), num, seed,
                                  num_inference_steps, guidance_scale, size_, spacing_,  # type: ignore[arg-type]
                                  dict(metadata or {}), format, **mask_options)
    pipeline = MedSynthPipeline.from_pretrained(pipeline_dir, device=device, verify=verify)
    return generate_dataset(pipeline, out_dir, settings, progress=progress)


__all__ = ["GenerationSettings", "generate_dataset", "generate", "plan_masks", "MaskPlan", "generation_grid",
           "skipped_cases", "PROVENANCE_FILE", "FORMATS", "MASK_SOURCES"]
