"""Autoencoder training: patch datamodule, overfit learning test, bf16 on CPU, tiled vs whole."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsynth.data.patches import PatchDataConfig, PatchDataModule
from medsynth.models.tiling import reconstruct_tiled
from medsynth.training.autoencoder import AutoencoderModule, psnr

MODEL = dict(channels=[8, 16, 16], norm_num_groups=8, latent_channels=4, num_embeddings=128,
             patch_size=[16, 16, 16], ema_decay=0.9)
DISC = dict(channels=8, num_layers=2)


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory):
    from medsynth.data.phantom_dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("ct16")
    write_phantom_dataset(root, modality="ct", num=5, size=32, seed=3, progress=False)
    return root


def _trainer(steps: int, precision: str = "32", **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=2 * steps + 2, max_epochs=-1, precision=precision,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)


class _Record(L.Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_patch_datamodule(ct_dataset):
    dm = PatchDataModule(ct_dataset, (16, 16, 16), PatchDataConfig(batch_size=2, patches_per_volume=3))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 1, 16, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].std() > 0.05
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 1, 16, 16, 16)
    # a patch larger than the volume is padded with the window bottom (air)
    big = PatchDataModule(ct_dataset, (48, 32, 32), PatchDataConfig(cache=False))
    img = next(iter(big.train_dataloader()))["image"]
    assert img.shape[2:] == (48, 32, 32) and float(img[0, 0, 0].max()) == -1.0
    assert dm.describe()["modality"] == "CT"


def test_overfit_learns_and_tiled_matches_whole():
    """Loss falls on a one-volume overfit; afterwards tiled (16^3 windows, overlap 8) and
    whole-volume reconstructions of the 32^3 volume agree within 3 dB PSNR, and tiling is never
    worse than 1 dB below the whole pass. (GroupNorm statistics are per window, the regime the
    model was trained in, so early in training tiled is often the *better* one.)"""
    from medsynth.data.phantoms import generate_phantom
    from medsynth.data.transforms import IntensityMapping

    torch.manual_seed(0)
    vol = generate_phantom("ct", 32, seed=1).image.array
    x = torch.from_numpy(np.asarray(IntensityMapping.ct_window().forward(vol), np.float32))[None]

    class Crops(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            a, b, c = np.random.randint(0, 17, 3)
            return {"image": x[:, a:a + 16, b:b + 16, c:c + 16]}

    module = AutoencoderModule(MODEL, DISC, dict(max_steps=40, lr=2e-3, betas=(0.9, 0.99),
                                                 adversarial_start_step=1000))
    rec = _Record()
    _trainer(40, callbacks=[rec]).fit(module, DataLoader(Crops(), batch_size=2))
    first = np.mean([l["train/l1"] for l in rec.logs[:5]])
    last = np.mean([l["train/l1"] for l in rec.logs[-5:]])
    assert int(module.generator_step) == 40
    assert last < 0.7 * first, (first, last)
    assert rec.logs[-1]["codebook/perplexity"] > 2.0
    model = module.model.eval()
    with torch.no_grad():
        whole = model(x[None])[0]
        tiled = reconstruct_tiled(model, x[None], window=16, overlap=8)
    p_whole, p_tiled = float(psnr(whole, x[None])), float(psnr(tiled, x[None]))
    assert abs(p_whole - p_tiled) < 3.0 and p_tiled > p_whole - 1.0, (p_whole, p_tiled)


def test_bf16_on_cpu_with_adversarial_does_not_nan(ct_dataset):
    torch.manual_seed(0)
    dm = PatchDataModule(ct_dataset, (16, 16, 16), PatchDataConfig(batch_size=1, patches_per_volume=2))
    module = AutoencoderModule(MODEL, DISC, dict(max_steps=6, adversarial_start_step=2,
                                                 adaptive_adversarial_weight=True, lr=1e-3))
    rec = _Record()
    _trainer(6, precision="bf16-mixed", callbacks=[rec]).fit(module, datamodule=dm)
    assert int(module.generator_step) == 6
    assert "train/d_loss" in rec.logs[-1] and "train/g_adv" in rec.logs[-1]
    for logs in rec.logs:
        assert all(math.isfinite(v) for v in logs.values()), logs
    for p in list(module.model.parameters()) + list(module.discriminator.parameters()):
        assert torch.isfinite(p).all()
    assert torch.isfinite(module.model.quantizer.embedding).all()


def test_eval_ssim_matches_monai_and_metrics_per_class():
    from monai.metrics import SSIMMetric

    from medsynth.data.transforms import IntensityMapping
    from medsynth.evaluation.reconstruction import reconstruction_metrics, ssim_map_3d

    torch.manual_seed(0)
    a = torch.rand(1, 1, 20, 22, 24)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ours = float(ssim_map_3d(a, b).mean())
    ref = float(SSIMMetric(spatial_dims=3, data_range=1.0)(a, b).mean())
    assert ours == pytest.approx(ref, abs=1e-4)
    mapping = IntensityMapping.ct_window()
    image = np.zeros((20, 20, 20), np.float32)
    recon = image.copy()
    recon[:10] += 0.1  # 0.1 model units = 100 HU (2000 HU window -> 2 units), first half only
    label = np.zeros((20, 20, 20), np.int64)
    label[:10] = 1
    m = reconstruction_metrics(image, recon, mapping, label, {"background": 0, "liver": 1})
    assert m["per_class"]["liver"]["mae"] == pytest.approx(100.0, rel=1e-4)
    assert m["per_class"]["background"]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert m["mae"] == pytest.approx(50.0, rel=1e-4)
    assert m["per_class"]["liver"]["psnr"] == pytest.approx(10 * np.log10(1 / 0.05 ** 2), rel=1e-4)


def test_training_config_betas_and_lr_schedule():
    from medsynth.errors import ConfigError
    from medsynth.training.autoencoder import AutoencoderTrainingConfig

    old = AutoencoderTrainingConfig.from_dict({"betas": [0.5, 0.9]})
    assert old.betas_discriminator is None and old.lr_factor(0) == 1.0 and old.lr_factor(10 ** 6) == 1.0
    module = AutoencoderModule(MODEL, DISC, dict(betas=(0.9, 0.99), betas_discriminator=(0.5, 0.9)))
    opt_g, opt_d = module.configure_optimizers()
    assert opt_g.defaults["betas"] == (0.9, 0.99) and opt_d.defaults["betas"] == (0.5, 0.9)
    # without betas_discriminator the discriminator uses `betas` (configs written before the field)
    opt_d_old = AutoencoderModule(MODEL, DISC, dict(betas=(0.9, 0.99))).configure_optimizers()[1]
    assert opt_d_old.defaults["betas"] == (0.9, 0.99)
    cfg = AutoencoderTrainingConfig(max_steps=100, lr_warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1)
    assert cfg.lr_factor(0) == pytest.approx(0.1) and cfg.lr_factor(0, generator=False) == pytest.approx(0.1)
    assert cfg.lr_factor(50) == pytest.approx(0.55) and cfg.lr_factor(100) == pytest.approx(0.1)
    assert cfg.lr_factor(100, generator=False) == 1.0
    # a time budget that is half used halves the cosine progress even at step 10
    assert cfg.lr_factor(10, time_fraction=0.5) == pytest.approx(0.55)
    with pytest.raises(ConfigError, match="lr_schedule='linear'"):
        AutoencoderTrainingConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="betas_discriminator=\\(0.5, 1.0\\)"):
        AutoencoderTrainingConfig(betas_discriminator=(0.5, 1.0))
    with pytest.raises(ConfigError, match="lr_warmup_steps=-1"):
        AutoencoderTrainingConfig(lr_warmup_steps=-1)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32, 32), (1, 2, 16, 24, 12)])
def test_separable_ssim_loss_equals_monai_in_value_and_gradient(shape):
    from monai.losses import SSIMLoss

    from medsynth.training.losses import SSIMLoss3d

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=gen) * 2 - 1
    recon = (target + 0.3 * torch.randn(shape, generator=gen)).clamp(-1, 1).requires_grad_(True)
    reference = SSIMLoss(spatial_dims=3, data_range=2.0)(recon, target)
    ours = SSIMLoss3d(data_range=2.0)(recon, target)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    (grad_ref,) = torch.autograd.grad(reference, recon)
    (grad_ours,) = torch.autograd.grad(ours, recon)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-7, rtol=1e-4)
    assert float(SSIMLoss3d()(target, target)) == pytest.approx(0.0, abs=1e-6)  # identical images: SSIM 1
