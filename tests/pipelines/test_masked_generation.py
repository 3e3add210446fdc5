"""Mask-conditioned generation: ControlNet in the pipeline, masks -> paired labels, lesions, bank, quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.errors import ConfigError
from medsynth.io import read_volume
from medsynth.io.volume import Volume
from medsynth.pipelines.assemble import assemble_pipeline
from medsynth.pipelines.pipeline import PIPELINE_FILE, QUALITY_FILE, MedSynthPipeline
from medsynth.pipelines.quality_gate import GateResult, QualityGate, derived_seed
from tests.pipelines.test_pipeline import build_components


def build_controlnet(root, ae_dir, dit_dir, cache):
    """A random tiny ControlNet export for the DiT at ``dit_dir`` (zero projections perturbed)."""
    from medsynth.models.controlnet import ControlNet3D
    from medsynth.training.controlnet import save_controlnet
    from medsynth.training.dit import load_dit

    labels = json.loads((cache / "cache.json").read_text())["labels"]
    dit, _, dit_export = load_dit(dit_dir)
    torch.manual_seed(1)
    cn = ControlNet3D.from_dit(dit, 1, max(labels.values()) + 1, 2, embed_channels=(4, 8))
    with torch.no_grad():
        for p in list(cn.zero_projections.parameters()) + list(cn.mask_embed.patchify.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return save_controlnet(root / "controlnet", cn, labels, {"name": "rectified_flow"},
                           {"mask_guidance_scale": 1.5, "guidance_rescale": 0.5},
                           {"base_dit": str(dit_dir), "base_dit_sha256": dit_export.sha256})


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """``(root, plain pipeline dir, pipeline dir with ControlNet + bank, dataset dir)``."""
    from medsynth.data.manifest import read_dataset
    from medsynth.pipelines.mask_bank import MaskBank

    root = tmp_path_factory.mktemp("masked")
    ae_dir, dit_dir, cache = build_components(root)
    cn_dir = build_controlnet(root, ae_dir, dit_dir, cache)
    MaskBank.build(read_dataset(root / "data"), ("train",)).save(root / "bank")
    plain = assemble_pipeline(ae_dir, dit_dir, cache, root / "plain")
    full = assemble_pipeline(ae_dir, dit_dir, cache, root / "pipeline", controlnet_dir=cn_dir, bank_dir=root / "bank",
                             segmenter_steps=0)  # the threshold baseline: its behaviour is what is tested here
    return root, plain, full, root / "data"


@pytest.fixture(scope="module")
def pipe(masked):
    return MedSynthPipeline.from_pretrained(masked[2])


def train_label(data_dir, split="train") -> Volume:
    from medsynth.data.manifest import read_dataset

    dataset = read_dataset(data_dir)
    return read_volume(dataset.cases_for(split)[0].label, kind="label")


def test_assemble_adds_controlnet_quality_and_bank(masked, pipe):
    from medsynth.io.checkpoint import file_sha256

    _, _, full, data = masked
    record = json.loads((full / PIPELINE_FILE).read_text())
    comps = record["components"]
    assert comps["controlnet"]["files"]["model.safetensors"] == file_sha256(full / "controlnet" / "model.safetensors")
    assert comps["controlnet"]["labels"] == record["labels"] and comps["controlnet"]["mask_guidance_scale"] == 1.5
    assert comps["controlnet"]["guidance_rescale"] == 0.5 and pipe.default_guidance_rescale == 0.5
    assert comps["quality"]["files"][QUALITY_FILE] == file_sha256(full / QUALITY_FILE)
    quality = json.loads((full / QUALITY_FILE).read_text())
    assert quality["splits"] == ["train"] and quality["intensity_unit"] == "HU" and quality["segmenter"]["intervals"]
    assert comps["bank"]["splits"] == ["train"] and "bank.json" in comps["bank"]["files"]
    assert pipe.controlnet is not None and pipe.bank_path == full / "bank" and pipe.quality == quality


def test_pipeline_generates_on_the_mask_grid(masked, pipe):
    _, plain, _, data = masked
    mask = train_label(data)
    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    image = pipe("CT abdomen", 1, 2.0, g(), mask=mask, mask_guidance_scale=3.0)[0]
    assert image.shape == mask.shape and np.array_equal(image.affine, mask.affine)
    assert image.metadata.extra["conditioned_on_mask"] and image.metadata.extra["mask_guidance_scale"] == 3.0
    # the ControlNet's guidance rescale applies to masked images unless the call overrides it
    assert image.metadata.extra["guidance_rescale"] == 0.5
    unrescaled = pipe("CT abdomen", 1, 2.0, g(), mask=mask, mask_guidance_scale=3.0, guidance_rescale=0.0)[0]
    assert unrescaled.metadata.extra["guidance_rescale"] == 0.0 and not np.allclose(unrescaled.array, image.array)
    assert pipe("CT abdomen", 1, 2.0, g())[0].metadata.extra["guidance_rescale"] == 0.0  # no mask: off by default
    other = mask.with_array(np.where(mask.array > 0, 1, 0).astype(np.uint8), kind="label")
    assert not np.allclose(pipe("CT abdomen", 1, 2.0, g(), mask=other)[0].array, image.array)  # the mask matters
    # Both scales 1: the plain conditional prediction, one branch (as with no stored mask guidance).
    a = pipe("CT abdomen", 1, 1.0, g(), mask=mask, mask_guidance_scale=1.0)[0]
    default, pipe.default_mask_guidance = pipe.default_mask_guidance, None
    try:
        b = pipe("CT abdomen", 1, 1.0, g(), mask=mask)[0]
    finally:
        pipe.default_mask_guidance = default
    np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(ConfigError, match="no ControlNet"):
        MedSynthPipeline.from_pretrained(plain)("CT abdomen", 1, mask=mask)
    with pytest.raises(ConfigError, match="empty"):
        pipe("CT abdomen", 1, mask=mask.with_array(np.zeros(mask.shape, np.uint8), kind="label"))
    with pytest.raises(ConfigError, match="does not know"):
        pipe("CT abdomen", 1, mask=mask.with_array(np.full(mask.shape, 99, np.uint8), kind="label"))
    with pytest.raises(ConfigError, match="needs a mask"):
        pipe("CT abdomen", 1, mask_guidance_scale=2.0)
    # a negative prompt with a mask: it replaces the null text in the mask-only and unconditional
    # branches of the base DiT and of the ControlNet; text guidance 1 still acts through the mask's
    negative = pipe("CT abdomen", 1, 1.0, g(), mask=mask, mask_guidance_scale=3.0, negative_prompt="CT head")[0]
    again = pipe("CT abdomen", 1, 1.0, g(), mask=mask, mask_guidance_scale=3.0, negative_prompt="CT head")[0]
    np.testing.assert_array_equal(negative.array, again.array)
    plain_text = pipe("CT abdomen", 1, 1.0, g(), mask=mask, mask_guidance_scale=3.0)[0]
    assert not np.allclose(negative.array, plain_text.array)
    assert negative.metadata.extra["negative_prompt"] == "CT head"
    with pytest.raises(ConfigError, match="guidance_scale is 1"):
        pipe("CT abdomen", 1, 1.0, g(), mask=mask, mask_guidance_scale=1.0, negative_prompt="CT head")


def _settings(**kw):
    from medsynth.pipelines.generate import GenerationSettings

    base = dict(prompts=["CT abdomen"], num=1, seed=3, num_inference_steps=1, guidance_scale=1.0)
    return GenerationSettings(**{**base, **kw})


def _provenance(out):
    return [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]


def test_user_mask_with_lesion_is_written_as_the_label(masked, pipe, tmp_path):
    from medsynth.data.manifest import read_dataset
    from medsynth.io import write_volume
    from medsynth.pipelines.generate import generate_dataset, plan_masks

    _, _, _, data = masked
    mask_file = write_volume(train_label(data), tmp_path / "mask.nii.gz")
    settings = _settings(mask=str(mask_file), lesions=["liver_lesion:1:20-24mm:liver"], quality_gate=False,
                         size=(32, 32, 24), spacing=(10.0, 10.0, 10.0))  # finer grid: room for a lesion
    expected, _, records = plan_masks(pipe, settings).case_mask(3)
    out = tmp_path / "synth"
    dataset = generate_dataset(pipe, out, settings, progress=False)
    label = read_volume(dataset.cases[0].label, kind="label")
    image = read_volume(dataset.cases[0].image)
    np.testing.assert_array_equal(label.array, expected.array)  # exactly the conditioning mask
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-6)
    np.testing.assert_allclose(label.affine, expected.affine, atol=1e-6)
    assert read_dataset(out).description["medsynth"]["labels"] == "conditioning_mask"
    (prov,) = _provenance(out)
    lesion_value = dataset.labels["liver_lesion"]
    assert prov["mask"] == {"kind": "user", "file": str(mask_file)} and len(prov["lesions"]) == 1 == len(records)
    placed = prov["lesions"][0]
    assert placed["class"] == "liver_lesion" and label.array[tuple(placed["center_vox"])] == lesion_value
    assert int((label.array == lesion_value).sum()) >= placed["voxels"]


def test_bank_is_the_default_source_and_excludes_test_cases(masked, pipe, tmp_path):
    from medsynth.data.manifest import read_dataset
    from medsynth.pipelines.generate import generate_dataset

    _, _, _, data = masked
    dataset = read_dataset(data)
    out = tmp_path / "bank_synth"
    generate_dataset(pipe, out, _settings(num=3, quality_gate=False), progress=False)
    train = {c.case_id for c in dataset.cases_for("train")}
    sources = [p["mask"] for p in _provenance(out)]
    assert all(s["kind"] == "bank" and s["case_id"] in train for s in sources)
    assert not {s["case_id"] for s in sources} & {c.case_id for c in dataset.cases_for("test")}


class FailCalls:
    """Stub gate: fails its first ``n`` calls, then passes (deterministic)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, image, label):
        self.calls += 1
        fail = self.calls <= self.n
        return GateResult(passed=not fail, failing=["dice:liver"] if fail else [], dice={"liver": 0.1 if fail else 0.9})


def test_quality_gate_retries_then_flags_or_skips(masked, pipe, tmp_path):
    from medsynth.errors import InputError
    from medsynth.pipelines.generate import generate_dataset, skipped_cases

    retried = generate_dataset(pipe, tmp_path / "retry", _settings(mask_source="bank"), progress=False,
                               check=FailCalls(1))
    (prov,) = _provenance(tmp_path / "retry")
    assert retried.case_ids == ["synth_0000"] and prov["quality"]["passed"] and not prov["flagged"]
    assert [a["attempt"] for a in prov["quality"]["attempts"]] == [0, 1]
    assert prov["quality"]["seed_used"] == derived_seed(3, 1) != 3
    # Case 0 never passes (2 attempts): skipped and reported by default; case 1 passes.
    skip = generate_dataset(pipe, tmp_path / "skip", _settings(num=2, max_retries=1), progress=False,
                            check=FailCalls(2))
    assert skipped_cases(tmp_path / "skip") == ["synth_0000"] and skip.case_ids == ["synth_0001"]
    assert _provenance(tmp_path / "skip")[0]["quality"]["attempts"][-1]["failing"] == ["dice:liver"]
    kept = generate_dataset(pipe, tmp_path / "keep", _settings(max_retries=1, keep_failed=True), progress=False,
                            check=FailCalls(2))
    (prov,) = _provenance(tmp_path / "keep")
    assert kept.case_ids == ["synth_0000"] and prov["flagged"] and not prov["quality"]["passed"]
    assert len(prov["quality"]["attempts"]) == 2 and prov["quality"]["attempts"][-1]["dice"] == {"liver": 0.1}
    with pytest.raises(InputError, match="every case failed the quality gate"):
        generate_dataset(pipe, tmp_path / "none", _settings(max_retries=0), progress=False, check=FailCalls(9))


def test_quality_gate_checks_real_against_constant_image(masked, pipe):
    from medsynth.data.manifest import read_dataset

    dataset = read_dataset(masked[3])
    case = dataset.cases_for("train")[0]
    image, label = read_volume(case.image), read_volume(case.label, kind="label")
    gate = QualityGate.from_record(pipe.quality, dataset.labels, min_dice=0.5)
    real = gate(image, label)
    flat = gate(image.with_array(np.full(image.shape, 500.0, np.float32)), label)
    assert real.dice and real.gated and not flat.passed and any(f.startswith("dice:") for f in flat.failing)
    assert sum(real.dice.values()) > sum(flat.dice.values())


def test_generation_warns_about_and_records_classes_the_gate_leaves_out(masked, pipe, tmp_path, caplog):
    import logging

    from medsynth.data.manifest import read_dataset
    from medsynth.pipelines.generate import generate_dataset

    gate = QualityGate.from_record(pipe.quality, pipe.labels, min_dice=0.5)
    # as if its segmenter never found body or spleen on real images
    gate.calibration = {"liver": 1.0, "spleen": 0.1, "body": 0.2}
    with caplog.at_level(logging.WARNING, logger="medsynth.pipelines.generate"):
        generate_dataset(pipe, tmp_path / "out", _settings(mask_source="bank", keep_failed=True, max_retries=0),
                         progress=False, check=gate)
    assert any("body, spleen" in r.getMessage() and "leaves them out" in r.getMessage() for r in caplog.records)
    masks = read_dataset(tmp_path / "out").description["medsynth"]["generation"]["masks"]
    assert masks["ungated_classes"] == ["body", "spleen"]
    (attempt,) = _provenance(tmp_path / "out")[0]["quality"]["attempts"]
    # the body covers most of any mask: a large class, scored, listed as ungated and never failing the sample
    assert "body" in attempt["dice"] and "body" in attempt["ungated"] and "body" not in attempt["gated"]
    assert not any(f in ("dice:body", "dice:spleen") for f in attempt["failing"])


def test_mask_settings_refusals(masked, pipe):
    from medsynth.pipelines.generate import plan_masks

    plain = MedSynthPipeline.from_pretrained(masked[1])
    with pytest.raises(ConfigError, match="needs a label generator in the pipeline"):
        plan_masks(pipe, _settings(mask_source="generator"))
    with pytest.raises(ConfigError, match="add --mask-source generator"):
        _settings(label_attributes=["liver=0.5"])
    with pytest.raises(ConfigError, match="no ControlNet"):
        plan_masks(plain, _settings(mask_source="bank"))
    with pytest.raises(ConfigError, match="--lesion paints"):
        plan_masks(plain, _settings(lesions=["liver_lesion:1:3mm"]))
    with pytest.raises(ConfigError, match="does not fit"):
        plan_masks(pipe, _settings(lesions=["liver_lesion:3:150-200mm:liver"])).case_mask(0)


def test_mask_refiner_in_the_pipeline(masked, pipe, tmp_path):
    """A refiner assembled in refines mask-conditioned images only, deterministically, and is recorded."""
    import yaml

    from medsynth.pipelines.generate import generate_dataset
    from medsynth.training.mask_refiner import fit_mask_refiner, load_mask_refiner, save_mask_refiner

    root, plain, _, data = masked
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "refiner" / "tiny.yaml").read_text())
    config["refiner"]["channels"] = 8
    config["training"].update(batch_size=2, lr=3e-3, ema_decay=0.5)
    export = fit_mask_refiner(root / "ae", root / "cache", tmp_path / "run", config, accelerator="cpu", devices=1,
                              max_steps=3)
    refined_dir = assemble_pipeline(root / "ae", root / "dit", root / "cache", tmp_path / "pipe",
                                    controlnet_dir=root / "controlnet", refiner_dir=export, bank_dir=root / "bank",
                                    segmenter_steps=0)
    from medsynth.io.checkpoint import file_sha256

    comps = json.loads((refined_dir / PIPELINE_FILE).read_text())["components"]
    assert comps["refiner"]["files"]["model.safetensors"] == file_sha256(refined_dir / "refiner" / "model.safetensors")
    refined_pipe = MedSynthPipeline.from_pretrained(refined_dir)
    assert refined_pipe.refiner is not None
    mask = train_label(data)
    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    a = refined_pipe("CT abdomen", 2, 1.0, g(), mask=mask)[0]
    np.testing.assert_array_equal(a.array, refined_pipe("CT abdomen", 2, 1.0, g(), mask=mask)[0].array)
    skipped = refined_pipe("CT abdomen", 2, 1.0, g(), mask=mask, refine=False)[0]
    # refine=False is the pipeline without the refiner; refine=True changes the image
    np.testing.assert_array_equal(skipped.array, pipe("CT abdomen", 2, 1.0, g(), mask=mask)[0].array)
    assert not np.allclose(a.array, skipped.array)
    assert a.metadata.extra["refined_with_mask"] and not skipped.metadata.extra["refined_with_mask"]
    # images without a mask are untouched by it
    np.testing.assert_array_equal(refined_pipe("CT abdomen", 2, 1.0, g())[0].array,
                                  pipe("CT abdomen", 2, 1.0, g())[0].array)
    # windows smaller than the volume give the same image up to blending (the refiner is local)
    refined_pipe.decode_window = tuple(max(4, s // 2) for s in refined_pipe.padded_size(mask.shape))
    windowed = refined_pipe("CT abdomen", 2, 1.0, g(), mask=mask)[0]
    assert windowed.shape == a.shape and np.isfinite(windowed.array).all()
    # generate records it, and --no-refiner (refine=False) is part of the settings
    out = generate_dataset(refined_pipe, tmp_path / "synth", _settings(mask_source="bank", quality_gate=False),
                           progress=False).root
    assert _provenance(out)[0]["refined_with_mask"] is True
    out = generate_dataset(refined_pipe, tmp_path / "synth2", _settings(mask_source="bank", quality_gate=False,
                                                                         refine=False), progress=False).root
    assert _provenance(out)[0]["refined_with_mask"] is False
    assert _settings(refine=False).to_dict()["refine"] is False and "refine" not in _settings().to_dict()
    # refusals: no ControlNet; a refiner trained behind another autoencoder
    with pytest.raises(ConfigError, match="--refiner needs --controlnet"):
        assemble_pipeline(root / "ae", root / "dit", root / "cache", tmp_path / "p2", refiner_dir=export)
    model, record = load_mask_refiner(export)
    other = save_mask_refiner(tmp_path / "other", model, record.config["labels"],
                              {**record.metadata, "autoencoder_sha256": "0" * 64})
    from medsynth.errors import InputError

    with pytest.raises(InputError, match="trained behind the autoencoder"):
        assemble_pipeline(root / "ae", root / "dit", root / "cache", tmp_path / "p3",
                          controlnet_dir=root / "controlnet", refiner_dir=other, segmenter_steps=0)


def test_generation_records_the_guidance_rescale_and_refuses_bad_ones(masked, pipe, tmp_path):
    from medsynth.pipelines.generate import generate_dataset

    common = dict(mask_source="bank", guidance_scale=2.0, quality_gate=False)
    generate_dataset(pipe, tmp_path / "default", _settings(**common), progress=False)
    generate_dataset(pipe, tmp_path / "off", _settings(**common, guidance_rescale=0.0), progress=False)
    (default,), (off,) = _provenance(tmp_path / "default"), _provenance(tmp_path / "off")
    assert default["guidance_rescale"] == 0.5 and off["guidance_rescale"] == 0.0  # the ControlNet's, then the asked
    for bad in (-0.5, 1.2):
        with pytest.raises(ConfigError, match=r"--guidance-rescale must be between 0 and 1, but got"):
            _settings(guidance_rescale=bad)
