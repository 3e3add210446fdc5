"""MedSynthPipeline: assemble -> load -> sample with tiny random components on 16^3 CT phantoms."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medsynth.errors import ConfigError, InputError
from medsynth.pipelines.assemble import assemble_pipeline
from medsynth.pipelines.pipeline import PIPELINE_FILE, MedSynthPipeline, centred_ras_affine

VQGAN = {"channels": [8, 16], "latent_channels": 4, "num_embeddings": 16, "patch_size": [16, 16, 16]}
DIT = {"in_channels": 4, "patch_size": [2, 2, 2], "hidden_size": 32, "depth": 1, "num_heads": 4, "text_dim": 32}
TEXT = {"kind": "vocab", "dim": 32, "depth": 1, "num_heads": 4, "max_length": 16}


def build_components(root, seed: int = 0):
    """Phantom dataset, random tiny VQGAN export, its latent cache and a random tiny DiT export.

    Returns ``(autoencoder_dir, dit_dir, cache_dir)``. Weights are random (perturbed away from
    the DiT's zero init so that prompts, metadata and seeds all change the output).
    """
    from medsynth.data.phantom_dataset import write_phantom_dataset
    from medsynth.io.checkpoint import read_export, save_autoencoder
    from medsynth.models.autoencoder_config import VQGANConfig
    from medsynth.models.dit import DiT3D, DiTConfig
    from medsynth.models.text_encoder import build_text_encoder
    from medsynth.models.vqgan import VQGAN as VQGANModel
    from medsynth.pipelines.latent_cache import encode_dataset
    from medsynth.training.dit import save_dit, text_encoder_config_for

    torch.manual_seed(seed)
    data = write_phantom_dataset(root / "data", modality="ct", num=3, size=16, seed=seed, progress=False)
    ae_dir = save_autoencoder(root / "ae", VQGANModel(VQGANConfig.from_dict(VQGAN)).eval(), {"modality": "CT"})
    model, _ = _load_ae(ae_dir)
    stats = encode_dataset(model, read_export(ae_dir, kind="vqgan"), data.root, root / "cache", progress=False)
    dit = DiT3D(DiTConfig.from_dict(DIT))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder = build_text_encoder(text_encoder_config_for(TEXT, [c.prompt or "" for c in data.cases]))
    dit_dir = save_dit(root / "dit", dit, encoder, {"name": "rectified_flow"},
                       {"sampler": "euler", "num_inference_steps": 2, "guidance_scale": 2.0},
                       {"scale_factor": stats["scale_factor"]})
    return ae_dir, dit_dir, root / "cache"


def _load_ae(path):
    from medsynth.io.checkpoint import load_autoencoder
    return load_autoencoder(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_components(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def pipe_dir(parts, tmp_path_factory):
    return assemble_pipeline(*parts, tmp_path_factory.mktemp("pipe") / "pipeline")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return MedSynthPipeline.from_pretrained(pipe_dir, device="cpu")


def test_assemble_records_components_hashes_and_settings(pipe_dir, parts):
    from medsynth.io.checkpoint import file_sha256

    record = json.loads((pipe_dir / PIPELINE_FILE).read_text())
    for name in ("autoencoder", "dit"):
        comp = record["components"][name]
        for file, digest in comp["files"].items():
            assert file_sha256(pipe_dir / comp["path"] / file) == digest
    stats = json.loads((parts[2] / "stats.json").read_text())
    assert record["latent"]["scale_factor"] == stats["scale_factor"]
    assert record["intensity"]["kind"] == "ct_window" and record["intensity_unit"] == "HU"
    assert record["modality"] == "CT" and record["labels"]["background"] == 0 and len(record["labels"]) > 1
    assert record["defaults"]["size"] == [16, 16, 16] and record["defaults"]["metadata"]["region"] == "abdomen"
    assert record["scheduler"]["objective"] == "rectified_flow" and record["scheduler"]["num_inference_steps"] == 2
    assert record["training_data"]["dataset"] == "phantoms_ct"


def test_sample_units_geometry_and_determinism(pipe):
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    prompt = "CT abdomen, liver lesion"
    a = pipe(prompt, num_inference_steps=2, guidance_scale=2.0, generator=g(1))[0]
    assert a.shape == (16, 16, 16) and a.kind == "image" and a.array.dtype == np.float32
    assert np.allclose(a.spacing, pipe.default_spacing) and a.orientation == ("R", "A", "S")
    centre = a.affine @ np.array([7.5, 7.5, 7.5, 1.0])
    assert np.allclose(centre[:3], 0.0)  # centred on the origin
    assert a.metadata.synthetic and a.metadata.intensity_unit == "HU" and a.metadata.modality == "CT"
    assert a.array.min() >= -1000 and a.array.max() <= 1000 and a.array.std() > 0  # HU window, not [-1, 1]
    assert float(np.abs(a.array).max()) > 1.5
    b = pipe(prompt, num_inference_steps=2, guidance_scale=2.0, generator=g(1))[0]
    c = pipe(prompt, num_inference_steps=2, guidance_scale=2.0, generator=g(2))[0]
    np.testing.assert_array_equal(a.array, b.array)
    assert not np.allclose(a.array, c.array)
    # A list of generators: each volume depends only on its own seed, not on the batch.
    pair = pipe([prompt, prompt], num_inference_steps=2, guidance_scale=2.0, generator=[g(2), g(1)])
    np.testing.assert_allclose(pair[1].array, a.array, atol=0.05)  # HU; batched float sums
    np.testing.assert_allclose(pair[0].array, c.array, atol=0.05)


def test_negative_prompt_changes_the_guided_sample_and_is_recorded(pipe, pipe_dir, tmp_path):
    import json

    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    prompt, negative = "CT abdomen, liver lesion", "CT abdomen, no lesion"
    plain = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=g(1))[0]
    a = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=g(1), negative_prompt=negative)[0]
    b = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=g(1), negative_prompt=negative)[0]
    np.testing.assert_array_equal(a.array, b.array)  # deterministic per seed
    assert not np.allclose(a.array, plain.array)  # guidance now starts from the negative prompt, not null text
    assert a.metadata.extra["negative_prompt"] == negative and "negative_prompt" not in plain.metadata.extra
    pair = pipe([prompt, prompt], num_inference_steps=2, guidance_scale=3.0, generator=[g(1), g(1)],
                negative_prompt=[negative, "CT abdomen"])
    np.testing.assert_allclose(pair[0].array, a.array, atol=0.05)  # one negative per prompt
    assert not np.allclose(pair[1].array, a.array)
    with pytest.raises(ConfigError, match="guidance_scale is 1"):
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, negative_prompt=negative)
    with pytest.raises(ConfigError, match="needs a prompt"):
        pipe(None, num_inference_steps=1, guidance_scale=3.0, negative_prompt=negative)
    with pytest.raises(ConfigError, match="3 negative prompts for 2"):
        pipe([prompt, prompt], num_inference_steps=1, guidance_scale=3.0, negative_prompt=[negative] * 3)
    from medsynth.pipelines.generate import generate

    out = tmp_path / "neg"
    generate(pipe_dir, out, prompt, 1, seed=1, num_inference_steps=2, guidance_scale=3.0, progress=False,
             negative_prompt=negative)
    record = json.loads((out / "provenance.jsonl").read_text().splitlines()[0])
    assert record["negative_prompt"] == negative
    assert json.loads((out / "dataset.json").read_text())["medsynth"]["generation"]["negative_prompt"] == negative
    with pytest.raises(ConfigError, match="guidance_scale is 1"):  # refused before anything is written
        generate(pipe_dir, tmp_path / "neg1", prompt, 1, num_inference_steps=1, guidance_scale=1.0, progress=False,
                 negative_prompt=negative)
    assert not (tmp_path / "neg1").exists()
    with pytest.raises(ConfigError, match="--negative-prompt must be non-empty"):
        generate(pipe_dir, tmp_path / "neg2", prompt, 1, negative_prompt="  ")


def test_size_not_multiple_is_padded_and_cropped_back(pipe):
    assert pipe.size_multiple == (4, 4, 4) and pipe.padded_size((18, 16, 13)) == (20, 16, 16)
    vol = pipe("CT abdomen", num_inference_steps=1, size=(18, 16, 13), spacing=(1.0, 2.0, 3.0),
               generator=torch.Generator().manual_seed(0))[0]
    assert vol.shape == (18, 16, 13) and np.allclose(vol.spacing, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(vol.affine, centred_ras_affine((18, 16, 13), (1.0, 2.0, 3.0)))
    assert vol.metadata.extra["metadata"]["spacing"] == [1.0, 2.0, 3.0]  # conditioned on the asked spacing


def test_bad_inputs_are_clear_errors(pipe, pipe_dir):
    with pytest.raises(ConfigError, match="empty"):
        pipe("  ", num_inference_steps=1)
    with pytest.raises(ConfigError, match=r"unknown metadata key\(s\) \['colour'\]"):
        pipe("CT", num_inference_steps=1, metadata={"colour": "red"})
    with pytest.raises(ConfigError, match="unknown body region 'knee'"):
        pipe("CT", num_inference_steps=1, metadata={"region": "knee"})
    with pytest.raises(ConfigError, match="makes CT volumes"):
        pipe("CT", num_inference_steps=1, metadata={"modality": "MR"})
    with pytest.raises(ConfigError, match="size"):
        pipe("CT", num_inference_steps=1, size=(16, 16))
    with pytest.warns(UserWarning, match="truncat"):
        vol = pipe("CT abdomen " * 40, num_inference_steps=1, generator=torch.Generator().manual_seed(0))[0]
    assert vol.shape == (16, 16, 16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            MedSynthPipeline.from_pretrained(pipe_dir, device="cuda")


def test_mr_sequence_comes_from_metadata_or_the_prompt(pipe_dir):
    from medsynth.models.dit import DiT3D, DiTConfig

    pipe = MedSynthPipeline.from_pretrained(pipe_dir, device="cpu")  # its own copy: the DiT is swapped below
    with pytest.raises(ConfigError, match="without a sequence field"):
        pipe("CT abdomen", num_inference_steps=1, metadata={"sequence": "T2"})
    # the same DiT with a sequence field whose rows are not zero
    dit = DiT3D(DiTConfig.from_dict({**pipe.dit.config.to_dict(), "sequences": ["T1", "T2", "FLAIR"]}))
    dit.load_state_dict(pipe.dit.state_dict(), strict=False)
    with torch.no_grad():
        torch.nn.init.normal_(dit.conditions.metadata.sequence.weight[1:], std=1.0)
    pipe.dit = dit.eval()
    g = lambda: [torch.Generator().manual_seed(0) for _ in range(4)]  # noqa: E731
    prompts = ["CT abdomen T2-FLAIR", "CT abdomen", "CT abdomen t2w", "CT abdomen T1 or T2"]
    named = pipe(prompts, num_inference_steps=2, generator=g())
    assert [v.metadata.extra["metadata"].get("sequence") for v in named] == ["FLAIR", None, "T2", None]
    given = pipe(prompts, num_inference_steps=2, generator=g(), metadata={"sequence": "T1"})  # given wins
    assert [v.metadata.extra["metadata"]["sequence"] for v in given] == ["T1"] * 4
    assert not np.allclose(named[0].array, given[0].array, atol=1.0)  # the field steers the (random) model
    with pytest.raises(ConfigError, match="unknown MR sequence 'DWI'"):
        pipe("CT abdomen", num_inference_steps=1, metadata={"sequence": "DWI"})


def test_hash_mismatch_and_missing_component(pipe_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pipe_dir, bad)
    weights = bad / "dit" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"dit/model\.safetensors.*sha256 of the 'dit' component"):
        MedSynthPipeline.from_pretrained(bad)
    (bad / "autoencoder" / "config.json").unlink()
    with pytest.raises(InputError, match=r"autoencoder/config\.json.*missing file of the 'autoencoder'"):
        MedSynthPipeline.from_pretrained(bad)
    with pytest.raises(InputError, match="missing pipeline.json"):
        MedSynthPipeline.from_pretrained(tmp_path)


def test_assemble_refuses_parts_that_do_not_belong_together(parts, tmp_path):
    from medsynth.io.checkpoint import save_autoencoder
    from medsynth.models.autoencoder_config import VQGANConfig
    from medsynth.models.vqgan import VQGAN as VQGANModel

    ae_dir, dit_dir, cache = parts
    other = save_autoencoder(tmp_path / "other_ae", VQGANModel(VQGANConfig.from_dict(VQGAN)))
    with pytest.raises(InputError, match="encoded by another autoencoder"):
        assemble_pipeline(other, dit_dir, cache, tmp_path / "p1")
    stats = json.loads((cache / "stats.json").read_text())
    fake = tmp_path / "cache"
    shutil.copytree(cache, fake)
    (fake / "stats.json").write_text(json.dumps({**stats, "scale_factor": stats["scale_factor"] * 2}))
    with pytest.raises(InputError, match="scale factor"):
        assemble_pipeline(ae_dir, dit_dir, fake, tmp_path / "p2")
    assert not (tmp_path / "p1" / PIPELINE_FILE).exists()


def test_python_generate_api(pipe_dir, tmp_path):
    from medsynth.pipelines.generate import generate

    dataset = generate(pipe_dir, tmp_path / "synth", "CT abdomen", 1, seed=3, num_inference_steps=1, progress=False)
    assert dataset.case_ids == ["synth_0000"] and (tmp_path / "synth" / "provenance.jsonl").is_file()
    with pytest.raises(ConfigError, match="--num"):
        generate(pipe_dir, tmp_path / "bad", "CT abdomen", 0)
