"""ControlNet training: learns a mask-only toy task with the base DiT bit-exactly frozen; export/load; configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from medsynth.diffusion import region_weights
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import save_tensors
from medsynth.models.controlnet import ControlNetConfig, one_hot_mask
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.text_encoder import VocabTextEncoder
from medsynth.training.controlnet import (ControlNetModule, ControlNetTrainingConfig, MaskedLatentDataset,
                                          collate_masked, load_controlnet)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "controlnet"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
PROMPT = "CT abdomen"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_cache(root: Path, n: int = 8) -> Path:
    """Labels 8x8x4 (a random box of 'organ' with a 'lesion' corner); latent 4x4x2 = +1 on the organ, -1 elsewhere."""
    (root / "latents").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(n + 1):
        label = torch.zeros(8, 8, 4, dtype=torch.int16)
        x0, y0 = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
        label[2 * x0:2 * x0 + 4, 2 * y0:2 * y0 + 4, :2] = 1
        label[2 * x0:2 * x0 + 2, 2 * y0:2 * y0 + 2, :2] = 2
        latent = torch.nn.functional.max_pool3d((label > 0).float()[None, None], 2)[0].repeat(4, 1, 1, 1) * 2 - 1
        meta = {"case_id": f"c{i}", "split": "test" if i == n else "train", "prompt": PROMPT,
                "metadata": {"modality": "CT", "region": "abdomen"}, "spacing": [1.0, 1.0, 1.0], "modality": "CT"}
        save_tensors(root / "latents" / f"c{i}.safetensors", {"latent": latent, "label": label}, meta)
    (root / "stats.json").write_text(json.dumps({"scale_factor": 1.0}))
    return root


def base_dit() -> tuple[DiT3D, VocabTextEncoder]:
    torch.manual_seed(0)
    dit = DiT3D(DiTConfig(in_channels=4, patch_size=(1, 1, 1), hidden_size=32, depth=2, num_heads=4, text_dim=16))
    with torch.no_grad():
        for block in dit.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(dit.final.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(dit.final.linear.weight, std=0.05)
    encoder = VocabTextEncoder.from_prompts([PROMPT], dim=16, depth=1, num_heads=4, max_length=8)
    return dit, encoder


@torch.no_grad()
def fixed_loss(module: ControlNetModule, batch, controlnet, use_mask: bool = True) -> float:
    """Loss with fixed noise and timesteps and no dropout, so before/after are comparable."""
    gen = torch.Generator().manual_seed(1)
    x0 = batch["latent"]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.linspace(100, 900, x0.shape[0])
    xt = module.objective.add_noise(x0, noise, t)
    text = module.encode_text(batch["prompt"])
    mask = one_hot_mask(batch["label"], 3) if use_mask else None
    residuals = controlnet(xt, t, text, None, mask)
    pred = module.dit(xt, t, text, None, block_residuals=residuals)
    return float(((pred - module.objective.target(x0, noise, t)) ** 2).mean())


def test_controlnet_learns_mask_task_with_frozen_base(tmp_path):
    cache = toy_cache(tmp_path / "cache")
    data = MaskedLatentDataset(cache)
    assert len(data) == 8 and all(it["case_id"] != "c8" for it in data.items)  # test case held out
    dit, encoder = base_dit()
    frozen_before = copy.deepcopy(dit.state_dict())
    L.seed_everything(0)
    module = ControlNetModule(dit, encoder, LABELS, {"num_blocks": 2, "image_to_latent_factor": 2,
                                                     "embed_channels": [8, 16]},
                              {"name": "rectified_flow"},
                              {"max_steps": 60, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.5, "text_drop_rate": 0.0,
                               "mask_drop_rate": 0.1, "region_classes": ["lesion"], "region_loss_weight": 3.0})
    batch = collate_masked([data[i] for i in range(8)])
    before = fixed_loss(module, batch, module.controlnet)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
    trainer.fit(module, DataLoader(data, batch_size=8, collate_fn=collate_masked))
    after = fixed_loss(module, batch, module.controlnet)
    assert after < 0.8 * before, (before, after)
    assert fixed_loss(module, batch, module.controlnet, use_mask=False) > 1.2 * after  # it learned from the mask
    for name, value in module.dit.state_dict().items():
        assert torch.equal(value, frozen_before[name]), name  # bit-exact: the base never moved
    assert all(not p.requires_grad for p in module.dit.parameters())

    export = module.export(tmp_path / "export")
    loaded, record = load_controlnet(export)
    assert record.config["labels"] == LABELS and record.kind == "controlnet"
    x = torch.randn(1, 4, 4, 4, 2)
    mask = one_hot_mask(batch["label"][:1], 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 300.0, None, None, mask), module.ema(x, 300.0, None, None, mask))


def test_training_refusals_and_region_weights(tmp_path):
    cache = toy_cache(tmp_path / "cache", n=2)
    with pytest.raises(ConfigError, match="held out"):
        MaskedLatentDataset(cache, ("test",))
    with pytest.raises(InputError, match="stats.json"):
        MaskedLatentDataset(tmp_path)
    dit, encoder = base_dit()
    with pytest.raises(ConfigError, match="region_classes.*tumour.*'lesions' for every lesion class"):
        ControlNetModule(dit, encoder, LABELS, {"image_to_latent_factor": 2}, None, {"region_classes": ["tumour"]})
    # 'lesions' stands for every lesion class of the table, so one config serves CT and MR
    module = ControlNetModule(dit, encoder, LABELS, {"image_to_latent_factor": 2}, None,
                              {"region_classes": ["lesions"], "region_loss_weight": 10.0})
    assert module.region_values == [2]
    from medsynth.data.phantoms import CT_LABELS
    from medsynth.data.phantoms_mr import MR_LABELS
    from medsynth.diffusion import region_label_values

    assert region_label_values(["lesions"], CT_LABELS) == [CT_LABELS["liver_lesion"]]
    assert region_label_values(["lesions"], MR_LABELS) == [MR_LABELS["tumour_oedema"], MR_LABELS["tumour_core"]]
    assert region_label_values(["lesions", "tumour_core"], MR_LABELS) == [7, 8]  # no duplicates
    assert region_label_values(["lesions"], {"background": 0, "lesions": 3}) == [3]  # a label of that very name
    assert region_label_values(["lesions"], {"background": 0, "liver": 1}) == []  # no lesion class: unweighted
    with pytest.raises(ConfigError, match="mask_drop_rate"):
        ControlNetTrainingConfig(mask_drop_rate=1.5)
    label = torch.zeros(1, 4, 4, 2, dtype=torch.long)
    label[0, 0, 0, 0] = 2
    w = region_weights(label, [2], (2, 2, 2), 5.0)
    assert w.shape == (1, 1, 2, 2, 1) and w[0, 0, 0, 0, 0] == 5.0 and w.sum() == 5.0 + 3.0


@pytest.mark.parametrize("name", ["tiny", "tiny_long", "base"])
def test_controlnet_configs_parse(name):
    config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert set(config) <= {"controlnet", "sampling", "training"}
    ControlNetTrainingConfig.from_dict(config["training"])
    ControlNetConfig.from_dict({**config["controlnet"], "dit": DiTConfig(depth=12), "num_classes": 10})


def test_fit_controlnet_from_exports(tmp_path):
    from medsynth.training.controlnet import fit_controlnet
    from medsynth.training.dit import save_dit

    cache = toy_cache(tmp_path / "cache", n=3)
    (cache / "cache.json").write_text(json.dumps({"labels": LABELS, "downsample_factor": 2}))
    dit, encoder = base_dit()
    save_dit(tmp_path / "dit", dit, encoder, {"name": "rectified_flow"})
    config = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    config["controlnet"]["embed_channels"] = [4, 8]
    config["training"].update(batch_size=3)
    assert config["training"]["region_classes"] == ["lesions"]  # the tiny config's entry: here the class 'lesion'
    export = fit_controlnet(tmp_path / "dit", cache, tmp_path / "run", config, accelerator="cpu", devices=1,
                            max_steps=2)
    model, record = load_controlnet(export)
    assert model.config.image_to_latent_factor == (2, 2, 2) and model.config.num_classes == 3
    assert record.metadata["base_dit_sha256"] and record.config["labels"] == LABELS
    with pytest.raises(ConfigError, match="unknown section"):
        fit_controlnet(tmp_path / "dit", cache, tmp_path / "run2", {"model": {}})
