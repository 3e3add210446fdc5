"""Generate a planned cohort: resumable, atomic, one status per case, sharded over Lightning ranks.

Output folder (a dataset folder in the layout of real data, plus the cohort's own files)::

    OUT/cohort.json            which cohort this folder holds (name, plan and spec sha256)
    OUT/plan.json              the plan (medsynth.cohort.plan)
    OUT/imagesTr/ labelsTr/    images and their label maps (the conditioning masks)
    OUT/dataset.json prompts.jsonl splits.json provenance.jsonl
    OUT/dicom/                 with format dicom|both
    OUT/manifest.jsonl         one line per planned case: class, lesions, status, files
    OUT/.cohort/cases/ID.json  each case's status, written atomically by the rank that made it

Statuses: ``done``; ``flagged`` (failed the quality gate, kept with ``keep_failed``);
``skipped`` (failed the gate, not kept); ``failed`` (its lesions fit in no drawn mask);
``pending`` (not made yet). A case is written label first, image next, status last, each
atomically (:mod:`medsynth.io.atomic`), so a run killed at any point leaves finished cases
intact and a rerun continues with the first unfinished one; finished cases are never rewritten.

Distribution: each Lightning Fabric rank takes ``cases[rank::world_size]`` (:func:`shard`) and
writes only its own cases' files; rank 0 merges ``manifest.jsonl``, ``provenance.jsonl`` and
``dataset.json`` after a barrier. One CPU process (``devices=1``) is the same code path.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from medsynth.cohort.plan import PLAN_FILE, plan_cohort, plan_sha256
from medsynth.cohort.spec import CohortSpec
from medsynth.cohort.statistics import lesion_values
from medsynth.data.manifest import Dataset, read_json_object
from medsynth.errors import ConfigError, InputError, MedsynthError
from medsynth.io.atomic import write_json_atomic, write_text_atomic
from medsynth.io.volume import Volume
from medsynth.pipelines.case_output import dicom_complete, placeholder_label, write_case_dicom

log = logging.getLogger(__name__)
COHORT_FILE = "cohort.json"
COHORT_FORMAT = "medsynth.cohort"
MANIFEST_FILE = "manifest.jsonl"
STATUS_DIR = Path(".cohort") / "cases"
PROVENANCE_FILE = "provenance.jsonl"
FINAL_STATUSES: tuple[str, ...] = ("done", "flagged", "skipped", "failed")
WRITTEN_STATUSES: tuple[str, ...] = ("done", "flagged")
MANIFEST_INTERVAL_S = 10.0
MASK_TRIES = 8  # mask draws tried before a case's lesions are declared not to fit
IGNORE_LABEL = "ignore"


class OutputError(MedsynthError):
    """An output that cannot be written (disk full, read-only folder, ...); finished cases are kept."""


def shard(cases: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The cases of ``rank`` among ``world_size``: ``cases[rank::world_size]`` (each exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(cases[rank::world_size])


# -- the output folder -----------------------------------------------------------------------


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    return {"format": COHORT_FORMAT, "cohort": plan["cohort"], "plan_sha256": plan_sha256(plan),
            "spec_sha256": plan["spec_sha256"], "pipeline_hash": plan["pipeline_hash"]}


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)


def load_or_plan(spec: CohortSpec, out: Path, progress: bool = True) -> dict[str, Any]:
    """The folder's stored plan when it was made from this spec, else a fresh plan (not yet written)."""
    stored = out / PLAN_FILE
    if stored.is_file():
        plan = read_json_object(stored)
        from medsynth.cohort.plan import spec_sha256

        if plan.get("spec_sha256") == spec_sha256(spec) and "cases" in plan:
            return plan
    return plan_cohort(spec, progress=progress)


def claim_output(out: Path, plan: dict[str, Any]) -> None:
    """Make ``out`` this cohort's folder, or refuse one that holds something else.

    Raises:
        ConfigError: ``out`` holds another cohort (another plan) or files that are no cohort.
    """
    wanted = _identity(plan)
    marker = out / COHORT_FILE
    if marker.is_file():
        have = read_json_object(marker)
        if (have.get("plan_sha256"), have.get("spec_sha256")) != (wanted["plan_sha256"], wanted["spec_sha256"]):
            raise ConfigError(f"{out} holds cohort {have.get('cohort')!r} made from another spec (spec sha256 "
                              f"{str(have.get('spec_sha256'))[:12]}..., this spec gives {wanted['spec_sha256'][:12]}"
                              f"...); use a new output folder or delete that one")
    elif out.exists() and (not out.is_dir() or any(p.name != PLAN_FILE for p in out.iterdir())):
        # (a lone plan.json is a claim killed before its marker was written)
        raise ConfigError(f"{out} is not empty and holds no cohort ({COHORT_FILE} missing); use a new or empty "
                          f"output folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    _write_if_changed(marker, json.dumps(wanted, indent=2) + "\n")  # last: marks the folder as this cohort's


def read_statuses(out: Path) -> dict[str, dict[str, Any]]:
    """Every case status written so far (unreadable files count as missing: the case is redone)."""
    folder = out / STATUS_DIR
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("case_id") == path.stem:
            found[path.stem] = record
    return found


def write_manifest(out: Path, plan: dict[str, Any], statuses: dict[str, dict[str, Any]]) -> Path:
    """``manifest.jsonl``: one line per planned case with its status (rewritten only when it changes)."""
    lines = []
    for case in plan["cases"]:
        status = statuses.get(case["case_id"], {})
        lines.append(json.dumps({"case_id": case["case_id"], "index": case["index"], "class": case["class"],
                                 "lesions": case["lesions"], "status": status.get("status", "pending"),
                                 "image": status.get("image"), "label": status.get("label"),
                                 "rank": status.get("rank"), "seconds": status.get("seconds"),
                                 "reason": status.get("reason")}))
    path = out / MANIFEST_FILE
    _write_if_changed(path, "".join(line + "\n" for line in lines))
    return path


# -- per-case generation ---------------------------------------------------------------------


def clear_lesions(label: Volume, values: Sequence[int]) -> tuple[Volume, int]:
    """Replace lesion voxels of a drawn mask by their nearest non-lesion label (a clean host).

    Masks drawn from real labels may carry real lesions; a cohort decides lesions itself, so
    ``healthy`` cases have none and lesion cases exactly the planned ones.
    """
    array = np.asarray(label.array)
    lesion = np.isin(array, list(values))
    n = int(lesion.sum())
    if not n:
        return label, 0
    if lesion.all():
        return label.with_array(np.zeros_like(array), kind="label"), n
    _, index = ndimage.distance_transform_edt(lesion, return_indices=True)
    return label.with_array(array[tuple(index)].astype(array.dtype), kind="label"), n


def generation_settings(spec: CohortSpec, spacing: Sequence[float] | None = None, fmt: str = "nifti") -> Any:
    """The :class:`~medsynth.pipelines.generate.GenerationSettings` of one spacing (mask options pass through,
    so ``masks.source: generator`` works as soon as ``generate`` supports it)."""
    from medsynth.pipelines.generate import GenerationSettings

    kw: dict[str, Any] = {}
    if spec.mask_source == "user":
        kw.update(mask=str(spec.mask_file), mask_labels=None if spec.mask_labels is None else str(spec.mask_labels))
    elif spec.mask_source in ("bank", "generator"):
        kw.update(mask_source=spec.mask_source, bank=None if spec.bank is None else str(spec.bank))
    if spec.mask_source != "none":
        kw["mask_guidance_scale"] = spec.mask_guidance
    return GenerationSettings(["cohort"], 1, 0, spec.steps, spec.guidance, spec.size,
                              None if spacing is None else tuple(float(s) for s in spacing), {}, fmt,
                              max_retries=spec.max_retries, keep_failed=spec.keep_failed, min_dice=spec.min_dice,
                              quality_gate=spec.quality_gate, **kw)


class CohortRunner:
    """Makes and writes the cases of one rank.

    Args:
        pipeline: the loaded :class:`~medsynth.pipelines.pipeline.MedSynthPipeline`.
        spec, plan: the cohort.
        out: the claimed output folder.
        fmt: "nifti", "dicom" or "both".
        check: quality gate ``(image, label) -> GateResult``; None builds the pipeline's
            (mask-conditioned cohorts with ``quality.gate``).
        rank: this process's rank (recorded per case).
    """

    def __init__(self, pipeline: Any, spec: CohortSpec, plan: dict[str, Any], out: Path, fmt: str = "nifti",
                 check: Any = None, rank: int = 0) -> None:
        from medsynth.pipelines.quality_gate import QualityGate

        self.pipeline, self.spec, self.plan, self.out, self.rank = pipeline, spec, plan, Path(out), rank
        self.fmt = fmt
        self.labels = {k: v for k, v in pipeline.labels.items() if k != IGNORE_LABEL}
        self.use_masks = spec.mask_source != "none"
        self.lesion_values = list(lesion_values(self.labels, [c.name for c in spec.lesion_classes]).values())
        self._mask_plans: dict[tuple[float, ...], Any] = {}
        sched = pipeline.record["scheduler"]
        self.steps = spec.steps or int(sched.get("num_inference_steps", 30))
        self.guidance = float(sched.get("guidance_scale", 1.0)) if spec.guidance is None else spec.guidance
        if check is None and self.use_masks and spec.quality_gate and pipeline.quality is not None:
            check = QualityGate.from_record(pipeline.quality, self.labels, min_dice=spec.min_dice)
        self.check = check if (self.use_masks and spec.quality_gate) else None
        if isinstance(self.check, QualityGate) and rank == 0:
            self.check.warn_ungated(log)
        self.ignore = max(self.labels.values()) + 1
        table = self.labels if self.use_masks else {**self.labels, IGNORE_LABEL: self.ignore}
        block = {"source": "medsynth cohort", "synthetic": True,
                 "labels": "conditioning_mask" if self.use_masks else "none", "modality": pipeline.modality,
                 "intensity_unit": pipeline.intensity_unit, "pipeline_hash": pipeline.pipeline_hash,
                 "cohort": _identity(plan)}
        if pipeline.modality == "CT":
            block["intensity"] = pipeline.intensity.to_dict()
        self._writer_args = dict(name=f"cohort_{plan['cohort']}", labels=table, channel_names={"0": pipeline.modality},
                                 extra_json={"medsynth": block})
        self.writer = self.open_writer()

    def open_writer(self) -> Any:
        """A :class:`~medsynth.data.writer.DatasetWriter` on the folder, holding every rank's case records so far."""
        from medsynth.data.writer import DatasetWriter

        return DatasetWriter(self.out, **self._writer_args)

    def _mask_plan(self, spacing: Sequence[float]) -> Any:
        from medsynth.pipelines.generate import plan_masks

        key = tuple(round(float(s), 6) for s in spacing)
        if key not in self._mask_plans:
            self._mask_plans[key] = plan_masks(self.pipeline, generation_settings(self.spec, key, self.fmt))
        return self._mask_plans[key]

    def case_label(self, case: dict[str, Any]) -> tuple[Volume, dict[str, Any], list[dict[str, Any]], int, int]:
        """``(label, mask source, lesion records, mask seed, cleared real-lesion voxels)`` of a case.

        Raises:
            ConfigError: the planned lesions fit in none of :data:`MASK_TRIES` drawn masks.
        """
        from medsynth.pipelines.lesions import insert_lesions, parse_lesion_specs
        from medsynth.pipelines.quality_gate import derived_seed

        plan = replace(self._mask_plan(case["spacing"]), lesions=[])
        extra: dict[str, Any] = {}
        if "prompt" in inspect.signature(plan.case_mask).parameters:  # the label generator reads the prompt
            extra["prompt"] = case["prompt"]
        if isinstance(getattr(plan, "generator_request", None), dict) and plan.generator_request:
            plan = replace(plan, generator_request={**plan.generator_request,
                                                    "metadata": {**plan.generator_request.get("metadata", {}),
                                                                 **case["metadata"]}})
        specs = parse_lesion_specs(case["lesions"])
        error: ConfigError | None = None
        for attempt in range(MASK_TRIES):
            mask_seed = int(case["seed"]) if attempt == 0 else derived_seed(int(case["seed"]), 1000 + attempt)
            base, info, _ = plan.case_mask(mask_seed, **extra)
            clean, cleared = clear_lesions(base, self.lesion_values)
            if not specs:
                return clean, info, [], mask_seed, cleared
            try:
                label, records = insert_lesions(clean, specs, self.labels, np.random.default_rng([mask_seed, 2]))
                return label, info, records, mask_seed, cleared
            except ConfigError as err:
                error = err
        raise ConfigError(f"{case['case_id']}: {error.problem if error else 'no mask'} (after {MASK_TRIES} mask draws)")

    def _status_path(self, case_id: str) -> Path:
        return self.out / STATUS_DIR / f"{case_id}.json"

    def dicom_done(self, case_id: str) -> bool:
        return self.fmt not in ("dicom", "both") or dicom_complete(self.out, case_id, labelled=self.use_masks)

    def finished(self, case: dict[str, Any], status: dict[str, Any] | None) -> bool:
        """True when nothing is left to do for the case (it is never rewritten then)."""
        if status is None or status.get("status") not in FINAL_STATUSES:
            return False
        if status["status"] in ("skipped", "failed"):
            return True
        return self.writer.has_case(case["case_id"]) and self.dicom_done(case["case_id"])

    def _write_dicom(self, case: dict[str, Any], volume: Volume, label: Volume) -> None:
        write_case_dicom(self.out, case["case_id"], volume, label if self.use_masks else None, self.labels,
                         prompt=case["prompt"], series_number=int(case["index"]) + 1, modality=self.pipeline.modality)

    def run_case(self, case: dict[str, Any]) -> dict[str, Any]:
        """Make, check and write one case; returns (and stores) its status record."""
        from medsynth.io import read_volume
        from medsynth.io.provenance import provenance_record
        from medsynth.pipelines.quality_gate import generate_checked

        case_id, start = case["case_id"], time.perf_counter()
        image_path, label_path = self.writer.image_path(case_id), self.writer.label_path(case_id)
        status_path = self._status_path(case_id)
        previous = read_statuses_one(status_path)
        if self.writer.has_case(case_id):
            # Image already there (killed before its status, or DICOM asked for later): keep it as is.
            if not self.dicom_done(case_id):
                self._write_dicom(case, read_volume(image_path), read_volume(label_path, kind="label"))
            record = previous if previous and previous.get("status") in WRITTEN_STATUSES else {
                "case_id": case_id, "status": "done", "recovered": True, "class": case["class"],
                "image": str(image_path.relative_to(self.out)), "label": str(label_path.relative_to(self.out)),
                "rank": self.rank, "provenance": provenance_record(modality=self.pipeline.modality, kind="image",
                                                                   extra=self._facts(case))}
            write_json_atomic(status_path, record)
            return record
        facts = self._facts(case)
        metadata = dict(case["metadata"])
        label = None
        passed, attempts, seed_used = True, [], int(case["seed"])
        if self.use_masks:
            try:
                label, mask_info, records, mask_seed, cleared = self.case_label(case)
            except ConfigError as err:
                record = {"case_id": case_id, "status": "failed", "class": case["class"], "reason": err.problem,
                          "rank": self.rank}
                write_json_atomic(status_path, record)
                log.warning("%s", err)
                return record

            def make(seed: int, label: Volume = label) -> Volume:
                return self.pipeline(case["prompt"], self.steps, self.guidance, [torch.Generator().manual_seed(seed)],
                                     metadata=metadata, mask=label, mask_guidance_scale=self.spec.mask_guidance)[0]

            volume, seed_used, attempts, passed = generate_checked(make, label, int(case["seed"]), self.check,
                                                                   self.spec.max_retries)
            facts.update(mask=mask_info, mask_seed=mask_seed, lesions=records, cleared_real_lesion_voxels=cleared,
                         mask_guidance_scale=volume.metadata.extra.get("mask_guidance_scale"))
            if self.check is not None:
                facts["quality"] = {"passed": passed, "seed_used": seed_used, "attempts": attempts}
                facts["flagged"] = not passed
        else:
            volume = self.pipeline(case["prompt"], self.steps, self.guidance,
                                   [torch.Generator().manual_seed(int(case["seed"]))], spacing=case["spacing"],
                                   size=self.spec.size, metadata=metadata)[0]
        status = "done" if passed else ("flagged" if self.spec.keep_failed else "skipped")
        if status == "skipped":
            record = {"case_id": case_id, "status": "skipped", "class": case["class"], "rank": self.rank,
                      "reason": "failed the quality gate: " + ", ".join(attempts[-1]["failing"]),
                      "quality": facts.get("quality")}
            write_json_atomic(status_path, record)
            return record
        volume.metadata.extra.update(seed=case["seed"], case_id=case_id, pipeline=str(self.pipeline.path))
        facts.update(size=list(volume.shape), spacing=[round(float(s), 6) for s in volume.spacing],
                     metadata=volume.metadata.extra["metadata"])
        if label is None:
            label = placeholder_label(volume, self.ignore, self.pipeline.modality)
        label.metadata.modality = self.pipeline.modality
        label.metadata.extra = dict(volume.metadata.extra)
        lesion_records = facts.get("lesions", [])
        case_meta = {**volume.metadata.extra["metadata"], "cohort": self.plan["cohort"], "cohort_class": case["class"],
                     "has_lesion": bool(lesion_records), "lesion_count": len(lesion_records)}
        self.writer.add_case(case_id, volume, label, prompt=case["prompt"], metadata=case_meta,
                             image_dtype="int16" if self.pipeline.modality == "CT" else "float32")
        if self.fmt in ("dicom", "both"):
            self._write_dicom(case, volume, label)
        record = {"case_id": case_id, "status": status, "class": case["class"], "rank": self.rank,
                  "image": str(image_path.relative_to(self.out)), "label": str(label_path.relative_to(self.out)),
                  "seconds": round(time.perf_counter() - start, 3),
                  "provenance": provenance_record(modality=self.pipeline.modality, kind="image", extra=facts)}
        write_json_atomic(status_path, record)  # last: the case is finished
        return record

    def _facts(self, case: dict[str, Any]) -> dict[str, Any]:
        return {"case_id": case["case_id"], "cohort": self.plan["cohort"], "class": case["class"],
                "prompt": case["prompt"], "seed": case["seed"], "planned_lesions": case["lesions"],
                "size_bin": case["size_bin"], "num_inference_steps": self.steps, "guidance_scale": self.guidance,
                "pipeline": str(self.pipeline.path), "pipeline_hash": self.pipeline.pipeline_hash}

    def run(self, cases: Sequence[dict[str, Any]], progress: bool = True,
            on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, int]:
        """Run this rank's cases (finished ones are skipped); returns status counts of this run.

        Raises:
            OutputError: a write failed (disk full, ...); finished cases are kept, rerun to resume.
        """
        statuses = read_statuses(self.out)
        todo = [c for c in cases if not self.finished(c, statuses.get(c["case_id"]))]
        counts: dict[str, int] = {"already_finished": len(cases) - len(todo)}
        with tqdm(total=len(cases), initial=len(cases) - len(todo), desc=f"cohort rank {self.rank}", unit="case",
                  disable=not progress) as bar:
            for case in todo:
                try:
                    record = self.run_case(case)
                except OSError as err:
                    done = sum(1 for s in read_statuses(self.out).values() if s.get("status") in WRITTEN_STATUSES)
                    why = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
                    raise OutputError(f"cannot write case {case['case_id']} ({why}); the {done} finished case(s) are "
                                      f"kept: free space and rerun the same command to resume", self.out) from None
                counts[record["status"]] = counts.get(record["status"], 0) + 1
                bar.update(1)
                if on_case is not None:
                    on_case(record)
        return counts


def read_statuses_one(path: Path) -> dict[str, Any] | None:
    """One status file, or None when missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def finalize_cohort(out: Path, plan: dict[str, Any], writer: Any) -> Dataset | None:
    """Rank 0, after every rank: ``provenance.jsonl``, ``dataset.json`` (+ sidecars) and ``manifest.jsonl``.

    Raises:
        InputError: no case could be written (every one failed or was skipped).
    """
    statuses = read_statuses(out)
    write_manifest(out, plan, statuses)
    written = [s for s in statuses.values() if s.get("status") in WRITTEN_STATUSES and "provenance" in s]
    if not written:
        raise InputError(f"no case of the cohort could be made (statuses in {MANIFEST_FILE}); check the reasons there",
                         out)
    _write_if_changed(out / PROVENANCE_FILE, "".join(json.dumps(s["provenance"]) + "\n" for s in
                                                     sorted(written, key=lambda s: s["case_id"])))
    return writer.finalize()


def run_cohort(spec: CohortSpec, out: str | Path, *, fmt: str | None = None, devices: int | str = 1,
               num_nodes: int = 1, accelerator: str = "auto", progress: bool = True, pipeline: Any = None,
               check: Any = None, verify: bool = True) -> dict[str, Any]:
    """Plan (or reuse the folder's plan), claim ``out`` and generate this process's share of the cohort.

    Args:
        spec: the validated spec.
        out: the output folder (new, empty, or this cohort's from an earlier run).
        fmt: "nifti", "dicom" or "both" (default: the spec's).
        devices, num_nodes, accelerator: Lightning Fabric settings; ``devices=1`` on CPU is a
            single process. With several devices Fabric launches one process per device.
        progress: progress bar with ETA.
        pipeline: an already loaded pipeline (tests; otherwise loaded from ``spec.pipeline`` on
            the rank's device).
        check: quality gate override.
        verify: check the pipeline files' sha256.

    Returns:
        ``{"out", "rank", "world_size", "counts" (this run), "statuses" (all cases, rank 0)}``.

    Raises:
        ConfigError: bad spec for the data/pipeline, another cohort in ``out``, a changed pipeline.
        OutputError: a write failed; finished cases are kept.
    """
    out = Path(out)
    fmt = fmt or spec.format
    generation_settings(spec, None, fmt)  # mask options checked before anything is written
    plan = load_or_plan(spec, out, progress=progress)
    from lightning.fabric import Fabric

    # "auto": one process for one device, DDP (one process per device, gloo on CPU) for several.
    fabric = Fabric(accelerator="cpu" if pipeline is not None else accelerator, devices=devices,
                    num_nodes=num_nodes, strategy="auto")
    fabric.launch()
    if fabric.global_rank == 0:
        claim_output(out, plan)
    fabric.barrier()
    if pipeline is None:
        from medsynth.pipelines.pipeline import MedSynthPipeline

        pipeline = MedSynthPipeline.from_pretrained(spec.pipeline, device=fabric.device, verify=verify)
    if plan["pipeline_hash"] and pipeline.pipeline_hash != plan["pipeline_hash"]:
        raise ConfigError(f"the pipeline changed since the cohort was planned (pipeline.json sha256 "
                          f"{pipeline.pipeline_hash[:12]}... vs {plan['pipeline_hash'][:12]}... in {out / PLAN_FILE}); "
                          f"use a new output folder")
    runner = CohortRunner(pipeline, spec, plan, out, fmt, check, rank=fabric.global_rank)
    mine = shard(plan["cases"], fabric.global_rank, fabric.world_size)
    last = [time.monotonic()]

    def refresh(_: dict[str, Any]) -> None:  # rank 0 keeps manifest.jsonl current (at most every 10 s)
        if time.monotonic() - last[0] >= MANIFEST_INTERVAL_S:
            write_manifest(out, plan, read_statuses(out))
            last[0] = time.monotonic()

    counts = runner.run(mine, progress=progress, on_case=refresh if fabric.global_rank == 0 else None)
    fabric.barrier()
    result: dict[str, Any] = {"out": str(out), "rank": fabric.global_rank, "world_size": fabric.world_size,
                              "counts": counts}
    if fabric.global_rank == 0:
        finalize_cohort(out, plan, runner.open_writer())  # every rank's records; unchanged files are not rewritten
        statuses = read_statuses(out)
        result["statuses"] = {s: sum(1 for c in plan["cases"]
                                     if statuses.get(c["case_id"], {}).get("status", "pending") == s)
                              for s in ("done", "flagged", "skipped", "failed", "pending")}
    return result


__all__ = ["run_cohort", "shard", "claim_output", "CohortRunner", "OutputError", "read_statuses", "write_manifest",
           "clear_lesions", "finalize_cohort", "COHORT_FILE", "MANIFEST_FILE", "STATUS_DIR"]
