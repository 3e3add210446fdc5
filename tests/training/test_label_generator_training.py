"""Label generator training: configs, train-split data, learning, export round trip, sampling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medsynth.errors import ConfigError, InputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "labels"
SMALL = {
    "autoencoder": {"channels": [4, 8, 8], "latent_channels": 4, "num_groups": 4},
    "autoencoder_training": {"max_steps": 2, "batch_size": 2},
    "dit": {"patch_size": [1, 1, 1], "hidden_size": 32, "depth": 1, "num_heads": 4, "text_dim": 16},
    "text_encoder": {"kind": "vocab", "dim": 16, "depth": 1, "num_heads": 4, "max_length": 16},
    "sampling": {"sampler": "euler", "num_inference_steps": 2},
    "dit_training": {"max_steps": 2, "batch_size": 2},
}


# Small 3D convolutions run faster on one thread, and far faster on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medsynth.data.phantom_dataset import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("lgdata") / "data", modality="ct", num=6, size=16,
                                 seed=1, progress=False)


@pytest.fixture(scope="module")
def export(data, tmp_path_factory):
    from medsynth.training.label_generator import fit_label_generator

    torch.set_num_threads(1)
    return fit_label_generator(data.root, tmp_path_factory.mktemp("lgrun"), SMALL, accelerator="cpu", devices=1)


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_config_files_parse(name):
    from medsynth.cli.labels import load_label_config

    config = load_label_config(CONFIGS / f"{name}.yaml")
    assert config["objective"]["name"] == "rectified_flow" and config["sampling"]["num_inference_steps"] <= 20


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(extra={}), "unknown section(s) ['extra']"),
    (lambda c: c["autoencoder"].update(chanels=[8]), "unknown key(s) ['chanels']"),
    (lambda c: c["dit"].update(in_channels=4), "dit.in_channels is set from the label autoencoder"),
    (lambda c: c["attributes"].update(drop_rate=2), "drop_rate"),
    (lambda c: c["autoencoder_training"].update(class_weighting="x"), "unknown class_weighting 'x'"),
    (lambda c: c["sampling"].update(sampler="ddpm"), "does not fit objective"),
])
def test_config_errors_name_the_file_and_key(tmp_path, edit, fragment):
    from medsynth.cli.labels import load_label_config

    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_label_config(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_reads_the_train_split_only(data):
    from medsynth.training.label_generator import read_label_cases

    cases = read_label_cases(data.root, 4)
    assert cases.case_ids == sorted(data.splits["train"])
    assert not set(cases.case_ids) & set(data.splits["test"])
    assert all(a.shape == cases.shape for a in cases.arrays) and all(s % 4 == 0 for s in cases.shape)
    assert len(cases.statistics["volumes_ml"]["liver"]) == len(cases.case_ids)
    values = cases.attribute_values(("volume:liver", "lesions:liver_lesion"))
    assert all(0 <= v["volume:liver"] <= 1 for v in values)


def test_class_weighted_autoencoder_loss_is_finite_and_trains(data):
    from medsynth.training.label_generator import LabelAutoencoderModule, read_label_cases

    cases = read_label_cases(data.root, 4)
    module = LabelAutoencoderModule({**SMALL["autoencoder"], "num_classes": 10},
                                    {"class_weighting": "sqrt_inverse", "lr": 1e-2})
    batch = {"label": torch.from_numpy(np.stack(cases.arrays[:2]))}
    opt = module.configure_optimizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        losses = []
        for _ in range(5):
            loss = module.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_label_dit_learns_on_label_latents(data):
    """The label DiT's loss falls on the encoded training maps (attributes included)."""
    from medsynth.training.dit import DiTModule, collate_latents, text_encoder_config_for
    from medsynth.training.label_generator import LabelLatentDataset, read_label_cases

    torch.manual_seed(0)
    cases = read_label_cases(data.root, 4)
    latents = torch.randn(len(cases.arrays), 4, *(s // 4 for s in cases.shape))
    names = ("volume:liver", "lesions:liver_lesion")
    dataset = LabelLatentDataset(latents, cases.prompts, cases.records, cases.attribute_values(names), 0.3)
    module = DiTModule({**SMALL["dit"], "in_channels": 4, "attributes": list(names)},
                       text_encoder_config_for(SMALL["text_encoder"], cases.prompts),
                       {"name": "rectified_flow", "options": {"timestep_sampling": "uniform"}}, {"lr": 5e-3})
    opt = module.configure_optimizers()
    batch = collate_latents([dataset[i] for i in range(len(dataset))])
    assert batch["metadata"][0]["attributes"].keys() <= set(names)

    def held_loss() -> float:  # the same noise, timesteps and dropped attributes each time
        torch.manual_seed(123)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            return float(np.mean([float(module.training_step(batch, 0)) for _ in range(8)]))

    before = held_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(100):
            loss = module.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert held_loss() < 0.85 * before


def test_export_round_trip_records_training_statistics(export, data):
    from medsynth.training.label_generator import load_label_generator, save_label_generator

    record = json.loads((export / "config.json").read_text())
    assert record["kind"] == "label_generator"
    config = record["config"]
    assert config["statistics"]["case_ids"] == sorted(data.splits["train"]) and config["statistics"]["splits"] == ["train"]
    assert config["labels"] == data.labels and config["grid"]["shape"] == [16, 16, 16]
    assert "volume:liver" in config["dit"]["attributes"] and "lesions:liver_lesion" in config["dit"]["attributes"]
    ae, dit, encoder, exp = load_label_generator(export)
    again = save_label_generator(export.parent / "again", ae, dit, encoder,
                                 {k: config[k] for k in ("labels", "grid", "latent", "statistics", "sampling")})
    ae2, dit2, _, _ = load_label_generator(again)
    for a, b in ((ae, ae2), (dit, dit2)):
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
    from medsynth.io.checkpoint import save_export

    other = save_export(export.parent / "other", torch.nn.Linear(2, 2), "dit", {})
    with pytest.raises(InputError, match="'dit' model, but a 'label_generator'"):
        load_label_generator(other)


def test_sampled_maps_use_known_labels_on_the_requested_grid(export, data):
    from medsynth.pipelines.label_generator_source import LabelGenerator
    from medsynth.pipelines.pipeline import centred_ras_affine

    gen = LabelGenerator.from_pretrained(export)
    size, spacing = (20, 18, 12), (15.0, 16.0, 30.0)
    maps = gen(["CT abdomen", None], [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
               size=size, spacing=spacing, volume_quantiles={"liver": 0.9})
    for volume in maps:
        assert volume.kind == "label" and volume.shape == size and volume.array.dtype == np.uint8
        np.testing.assert_allclose(volume.affine, centred_ras_affine(size, spacing))
        assert set(np.unique(volume.array).tolist()) <= set(data.labels.values())
        assert volume.metadata.extra["mask_source"]["attributes"] == {"volume:liver": 0.9}
    again = gen("CT abdomen", [torch.Generator().manual_seed(0)], size=size, spacing=spacing,
                volume_quantiles={"liver": 0.9})[0]
    np.testing.assert_array_equal(again.array, maps[0].array)  # deterministic per seed
    native = gen(None)[0]
    assert native.shape == (16, 16, 16)


@pytest.mark.parametrize("request_, fragment", [
    ({"volume_quantiles": {"lung": 0.5}}, "unknown label 'lung'"),
    ({"volume_quantiles": {"liver": 1.2}}, "must lie in [0, 1]"),
    ({"lesion_counts": {"liver_lesion": 7}}, "outside what the model saw in training"),
    ({"lesion_counts": {"liver": 1}}, "counts lesions of ['liver_lesion'], not 'liver'"),
    ({"metadata": {"region": "moon"}}, "unknown body region 'moon'"),
])
def test_sampling_refuses_what_the_model_never_saw(export, request_, fragment):
    from medsynth.pipelines.label_generator_source import LabelGenerator

    with pytest.raises(ConfigError) as err:
        LabelGenerator.from_pretrained(export)(None, **request_)
    assert fragment in str(err.value)
