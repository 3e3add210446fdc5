"""Opt-in torch.compile and channels-last 3D in the training configs.

torch.compile runs with the "eager" backend here (Dynamo traces the model, no code generation),
which exercises the wiring (in-place compilation, unchanged state_dict keys, exports that load)
in seconds on CPU; inductor itself is torch's to test.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medsynth.errors import ConfigError
from medsynth.io.checkpoint import save_tensors
from medsynth.training.acceleration import is_compiled
from medsynth.training.autoencoder import AutoencoderModule, AutoencoderTrainingConfig
from medsynth.training.controlnet import ControlNetTrainingConfig
from medsynth.training.dit import DiTModule, DiTTrainingConfig, LatentCacheDataset, collate_latents, load_dit
from medsynth.training.dit import text_encoder_config_for

MODEL = dict(channels=[8, 16], norm_num_groups=8, latent_channels=4, num_embeddings=32, patch_size=[16, 16, 16])
DISC = dict(channels=8, num_layers=2)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0)


def test_autoencoder_trains_channels_last_and_compiled_and_exports_the_same_keys(tmp_path) -> None:
    from medsynth.io.checkpoint import load_autoencoder, save_autoencoder

    torch.manual_seed(0)
    images = [{"image": torch.rand(1, 16, 16, 16) * 2 - 1} for _ in range(4)]
    module = AutoencoderModule(MODEL, DISC, dict(max_steps=2, adversarial_start_step=1, channels_last=True,
                                                 compile=True, compile_backend="eager"))
    plain = AutoencoderModule(MODEL, DISC, dict(max_steps=2))
    assert is_compiled(module.model) and is_compiled(module.discriminator) and not is_compiled(plain.model)
    conv = next(p for p in module.model.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _trainer(4).fit(module, DataLoader(images, batch_size=2))  # 2 generator steps (manual optimisation)
    assert int(module.generator_step) == 2
    after = module.model.state_dict()
    assert list(after) == list(plain.model.state_dict())  # compiling in place keeps the keys
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    loaded, _ = load_autoencoder(save_autoencoder(tmp_path / "vq", module.model))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)[0], module.model.eval()(x)[0], atol=1e-5, rtol=1e-4)


def test_dit_compiles_the_live_model_not_the_ema_and_exports(tmp_path) -> None:
    root = tmp_path / "cache"
    (root / "latents").mkdir(parents=True)
    prompts = ["CT abdomen, no lesion", "CT abdomen, liver lesion 12 mm"]
    for i, prompt in enumerate(prompts):
        save_tensors(root / "latents" / f"c{i}.safetensors", {"latent": torch.randn(4, 4, 4, 4)},
                     {"case_id": f"c{i}", "split": "train", "prompt": prompt, "modality": "CT",
                      "metadata": {"modality": "CT", "region": "abdomen"}, "spacing": [1.0, 1.0, 1.0]})
    (root / "stats.json").write_text(json.dumps({"scale_factor": 1.0}))
    model = {"in_channels": 4, "patch_size": [1, 1, 1], "hidden_size": 32, "depth": 1, "num_heads": 4, "text_dim": 32}
    text = {"kind": "vocab", "dim": 32, "depth": 1, "num_heads": 4, "max_length": 16}
    module = DiTModule(model, text_encoder_config_for(text, prompts), {"name": "rectified_flow"},
                       {"max_steps": 2, "batch_size": 2, "compile": True, "compile_backend": "eager"})
    assert is_compiled(module.model) and not is_compiled(module.ema)
    data = LatentCacheDataset(root, ("train",))
    _trainer(2).fit(module, DataLoader(data, batch_size=2, collate_fn=collate_latents))
    assert module.global_step == 2
    loaded, _, _ = load_dit(module.export(tmp_path / "dit"))
    assert set(loaded.state_dict()) == set(module.ema.state_dict())


@pytest.mark.parametrize("config", [AutoencoderTrainingConfig, DiTTrainingConfig, ControlNetTrainingConfig])
def test_bad_compile_settings_name_the_value_and_the_valid_ones(config) -> None:
    with pytest.raises(ConfigError, match=r"compile_backend in .*inductor.*but got compile_backend='nvcc'"):
        config.from_dict({"compile": True, "compile_backend": "nvcc"})
    with pytest.raises(ConfigError, match=r"compile_mode in .*max-autotune.*but got compile_mode='fast'"):
        config.from_dict({"compile_mode": "fast"})
    with pytest.raises(ConfigError, match="compile to be true or false"):
        config.from_dict({"compile": "yes"})
    assert config.from_dict({}).compile is False  # off unless asked for


def test_channels_last_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="channels_last to be true or false"):
        AutoencoderTrainingConfig.from_dict({"channels_last": "on"})
