"""Fixtures: a tiny mask-conditioned pipeline (16^3 CT phantoms, random ControlNet, mask bank) and specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def cohort_parts(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(pipeline dir with ControlNet + bank, real dataset dir, root)`` built once per session."""
    from medsynth.data.manifest import read_dataset
    from medsynth.pipelines.assemble import assemble_pipeline
    from medsynth.pipelines.mask_bank import MaskBank
    from tests.pipelines.test_masked_generation import build_controlnet
    from tests.pipelines.test_pipeline import build_components

    root = tmp_path_factory.mktemp("cohort")
    ae_dir, dit_dir, cache = build_components(root)
    cn_dir = build_controlnet(root, ae_dir, dit_dir, cache)
    MaskBank.build(read_dataset(root / "data"), ("train",)).save(root / "bank")
    pipeline = assemble_pipeline(ae_dir, dit_dir, cache, root / "pipeline", controlnet_dir=cn_dir,
                                 bank_dir=root / "bank", segmenter_steps=0)
    return pipeline, root / "data", root


@pytest.fixture(scope="session")
def cohort_pipe(cohort_parts):
    from medsynth.pipelines.pipeline import MedSynthPipeline

    return MedSynthPipeline.from_pretrained(cohort_parts[0])


def write_spec(folder: Path, parts: tuple[Path, Path, Path], **overrides) -> Path:
    """A tiny spec (6 cases: 3 with one liver lesion, 3 healthy, 2 sampling steps) written to ``folder``."""
    pipeline, data, _ = parts
    raw = {"name": "tiny", "total": 6, "modality": "CT", "pipeline": str(pipeline), "data": str(data), "seed": 3,
           "size": [16, 16, 16], "spacing": [12, 12, 12],
           "classes": {"liver_lesion": {"share": 0.5, "count": 1, "size_bins": [{"range_mm": [25, 30], "share": 1.0}]},
                       "healthy": {"share": 0.5}},
           "demographics": {"sex": "real", "age": [40, 70]},
           "quality": {"gate": False}, "sampling": {"steps": 2, "guidance": 1.0}}
    raw.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cohort.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
