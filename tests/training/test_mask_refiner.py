"""Mask refiner: identity at initialisation, learns to undo the autoencoder's round trip, export/load, configs, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medsynth.errors import ConfigError, InputError
from medsynth.models.controlnet import one_hot_mask
from medsynth.models.mask_refiner import MaskRefiner3D, MaskRefinerConfig
from medsynth.training.mask_refiner import (MaskRefinerTrainingConfig, RefinerCases, collate_refiner, crop_batch,
                                            fit_mask_refiner, load_mask_refiner, refinement_scores)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "refiner" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from tests.pipelines.test_pipeline import build_components

    root = tmp_path_factory.mktemp("refiner")
    return (root, *build_components(root))


def test_fresh_refiner_is_the_identity_and_checks_shapes():
    torch.manual_seed(0)
    model = MaskRefiner3D(MaskRefinerConfig(num_classes=3, channels=8, num_groups=4))
    image = torch.randn(2, 1, 8, 6, 4)
    label = torch.randint(0, 3, (2, 8, 6, 4))
    assert torch.equal(model(image, one_hot_mask(label, 3)), image)
    with torch.no_grad():
        model.conv_out.weight.normal_(std=0.1)
    moved = model(image, one_hot_mask(label, 3))
    assert not torch.allclose(moved, image)
    other = label.clone()
    other[0, 0, 0, 0] = (other[0, 0, 0, 0] + 1) % 3
    assert not torch.equal(model(image, one_hot_mask(other, 3)), moved)  # the mask is read
    with pytest.raises(ConfigError, match="one-hot mask of shape"):
        model(image, one_hot_mask(label, 4))
    with pytest.raises(ConfigError, match="even spatial sizes"):
        model(image[..., :3], one_hot_mask(label[..., :3], 3))
    with pytest.raises(ConfigError, match="multiple of num_groups"):
        MaskRefinerConfig(num_classes=3, channels=6, num_groups=4)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        MaskRefinerConfig(num_classes=1)


def test_training_config_and_patches():
    cfg = MaskRefinerTrainingConfig.from_dict(yaml.safe_load(CONFIG.read_text())["training"])
    assert cfg.max_steps > 0 and cfg.patch_size == (16, 16, 16)
    assert MaskRefinerTrainingConfig(patch_size=[8, 8, 4]).patch_size == (8, 8, 4)
    for bad in ({"latent_noise": 2.0}, {"patch_size": [8, 8]}, {"lr": 0}, {"bogus": 1}):
        with pytest.raises((ConfigError, TypeError)):
            MaskRefinerTrainingConfig.from_dict(bad)
    item = {"latent": torch.zeros(4, 4, 4, 2), "label": torch.arange(8 * 8 * 4).reshape(8, 8, 4),
            "image": torch.randn(1, 8, 8, 4)}
    cases = RefinerCases([item], patch_size=(4, 4, 6))
    batch = collate_refiner([cases[0], cases[0]])
    assert batch["latent"].shape == (2, 4, 4, 4, 2)  # whole latents: cropped only after decoding
    starts, sizes = batch["crop"][:, 0], batch["crop"][:, 1]
    assert sizes.tolist() == [[4, 4, 4]] * 2 and (starts % 2 == 0).all()  # clipped to the volume, even starts
    label, image = crop_batch(batch["label"], batch["crop"]), crop_batch(batch["image"], batch["crop"])
    assert label.shape == (2, 4, 4, 4) and image.shape == (2, 1, 4, 4, 4)
    for i in range(2):  # the label crop is the image crop: its first voxel's index gives the offset of both
        first = int(label[i, 0, 0, 0])
        x, y, z = first // 32, (first // 4) % 8, first % 4
        assert [x, y, z] == starts[i].tolist()
        assert torch.equal(image[i], item["image"][:, x:x + 4, y:y + 4, z:z + 4])
    whole = RefinerCases([item])[0]["crop"]
    assert whole.tolist() == [[0, 0, 0], [8, 8, 4]]
    with pytest.raises(ConfigError, match="even"):
        RefinerCases([item], patch_size=(5, 4, 4))


def test_fit_learns_to_undo_the_round_trip_and_exports(components, tmp_path):
    root, ae_dir, _, cache = components
    config = yaml.safe_load(CONFIG.read_text())
    config["refiner"]["channels"] = 8
    config["training"].update(batch_size=2, lr=3e-3, ema_decay=0.5)
    export = fit_mask_refiner(ae_dir, cache, tmp_path / "run", config, accelerator="cpu", devices=1, max_steps=40)
    model, record = load_mask_refiner(export)
    from medsynth.io.checkpoint import read_export

    assert record.metadata["autoencoder_sha256"] == read_export(ae_dir).sha256
    assert record.config["labels"] and model.config.num_classes == max(record.config["labels"].values()) + 1
    scores = record.metadata["val_scores"]
    # the refined images are closer to the real ones than the decoded ones (val split: unseen cases)
    assert scores["cases"] >= 1 and scores["refined_mae"] < scores["decoded_mae"]
    assert scores["refined_psnr_db"] > scores["decoded_psnr_db"]
    # the recorded scores are what refinement_scores gives for the exported weights
    from medsynth.io.checkpoint import load_autoencoder
    from medsynth.training.mask_refiner import read_refiner_cases

    ae, _ = load_autoencoder(ae_dir)
    items, _ = read_refiner_cases(cache, None, ae.downsample_factor, splits=("val",))
    assert refinement_scores(ae, model, items)["refined_mae"] == pytest.approx(scores["refined_mae"], abs=1e-4)


def test_fit_refusals(components, tmp_path):
    root, ae_dir, _, cache = components
    config = yaml.safe_load(CONFIG.read_text())
    with pytest.raises(ConfigError, match="unknown section"):
        fit_mask_refiner(ae_dir, cache, tmp_path / "a", {**config, "model": {}})
    from medsynth.io.checkpoint import save_autoencoder
    from medsynth.io.checkpoint import load_autoencoder

    ae, _ = load_autoencoder(ae_dir)
    with torch.no_grad():
        next(ae.parameters()).add_(1.0)
    other = save_autoencoder(tmp_path / "other_ae", ae)
    with pytest.raises(InputError, match="encoded by the autoencoder"):
        fit_mask_refiner(other, cache, tmp_path / "b", config, max_steps=1)
    with pytest.raises(InputError, match="is not there"):
        fit_mask_refiner(ae_dir, cache, tmp_path / "c", config, data_dir=tmp_path / "nowhere", max_steps=1)


def test_refiner_cli(components, tmp_path, capsys):
    from medsynth.cli import main

    root, ae_dir, _, cache = components
    config = yaml.safe_load(CONFIG.read_text())
    config["refiner"]["channels"] = 8
    config["training"]["batch_size"] = 2
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["refiner", "fit", "--autoencoder", str(ae_dir), "--cache", str(cache), "--config", str(cfg),
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--accelerator", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "trained the mask refiner" in out and "val MAE" in out
    assert (tmp_path / "run" / "export" / "config.json").is_file() and (tmp_path / "run" / "fit_summary.json").is_file()
    config["refiner"]["num_classes"] = 4
    cfg.write_text(yaml.safe_dump(config))
    assert main(["refiner", "fit", "--autoencoder", str(ae_dir), "--cache", str(cache), "--config", str(cfg),
                 "--out", str(tmp_path / "run2")]) != 0
    assert "num_classes comes from the dataset" in capsys.readouterr().err
    assert main(["refiner", "fit", "--autoencoder", str(tmp_path / "none"), "--cache", str(cache),
                 "--config", str(CONFIG), "--out", str(tmp_path / "run3")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


def test_export_round_trip_and_broken_config(tmp_path):
    import json

    from medsynth.training.mask_refiner import save_mask_refiner

    torch.manual_seed(0)
    model = MaskRefiner3D(MaskRefinerConfig(num_classes=3, channels=8))
    with torch.no_grad():
        model.conv_out.weight.normal_(std=0.1)
    export = save_mask_refiner(tmp_path / "ref", model, {"background": 0, "a": 1, "b": 2}, {"autoencoder_sha256": "x"})
    loaded, record = load_mask_refiner(export)
    image, label = torch.randn(1, 1, 4, 4, 4), torch.randint(0, 3, (1, 4, 4, 4))
    assert torch.equal(loaded(image, one_hot_mask(label, 3)), model.eval()(image, one_hot_mask(label, 3)))
    assert record.metadata["autoencoder_sha256"] == "x" and not loaded.training
    cfg = json.loads((export / "config.json").read_text())
    cfg["config"]["model"]["channels"] = 6  # not a multiple of num_groups
    (export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="invalid mask refiner config"):
        load_mask_refiner(export)
    with pytest.raises(InputError, match="'mask_refiner' model"):
        from medsynth.training.controlnet import load_controlnet

        load_controlnet(export)
