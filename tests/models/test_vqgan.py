"""VQ-GAN model, quantiser, discriminator, configs and export round trip (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import load_autoencoder, load_feature_network, save_autoencoder
from medsynth.models import (VQGAN, DiscriminatorConfig, GroupedVectorQuantizer, PatchDiscriminator3d,
                             VectorQuantizer, VQGANConfig, preset)


def tiny_config(**kw) -> VQGANConfig:
    base = dict(channels=(8, 16, 16), norm_num_groups=8, latent_channels=4, num_embeddings=64,
                patch_size=(16, 16, 16))
    base.update(kw)
    return VQGANConfig(**base)


@pytest.mark.parametrize("channels,factor", [((8, 16, 16), 4), ((8, 8, 16, 16), 8)])
def test_shapes_and_factor(channels, factor):
    torch.manual_seed(0)
    model = VQGAN(tiny_config(channels=channels, attention=True, patch_size=(16, 16, 16)))
    x = torch.randn(2, 1, 16, 16, 24)
    z = model.encode(x)
    assert z.shape == (2, 4, 16 // factor, 16 // factor, 24 // factor)
    recon, q = model(x)
    assert recon.shape == x.shape
    assert q.indices.shape == (2, 16 // factor, 16 // factor, 24 // factor)
    assert model.decode(z).shape == x.shape


def test_bad_inputs_name_values():
    model = VQGAN(tiny_config())
    with pytest.raises(ValueError, match="1 input channel"):
        model.encode(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        model.encode(torch.randn(1, 1, 18, 16, 16))
    with pytest.raises(ConfigError, match="channels=\\(30, 64\\) and norm_num_groups=32"):
        VQGANConfig(channels=(30, 64), norm_num_groups=32)
    with pytest.raises(ConfigError, match="patch_size=\\(30, 32, 32\\)"):
        VQGANConfig(channels=(8, 16, 32), patch_size=(30, 32, 32))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['chanels'\\]"):
        VQGANConfig.from_dict({"chanels": [8, 16]})
    with pytest.raises(ConfigError, match="norm='LAYER'"):
        DiscriminatorConfig(norm="layer")
    with pytest.raises(ConfigError, match="num_codebooks=3 and latent_channels=4"):
        VQGANConfig(latent_channels=4, num_codebooks=3)
    with pytest.raises(ConfigError, match="num_codebooks=0"):
        VQGANConfig(latent_channels=4, num_codebooks=0)


def test_presets_build_configs():
    for name in ("tiny", "base", "large"):
        cfg = preset(name)
        assert VQGANConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("tiny").downsample_factor == 4 and preset("large").downsample_factor == 8


def test_quantizer_monitoring_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_embeddings=32, dim=4, decay=0.5, dead_code_threshold=0.2)
    vq.train()
    z = torch.randn(2, 4, 4, 4, 4)
    out = vq(z)  # data-dependent init spreads codes over the batch
    assert 1.0 < float(out.perplexity) <= 32
    # Collapse: every code but one is parked far away, so nothing is assigned to them.
    with torch.no_grad():
        vq.embedding[1:] = 100.0
        vq.ema_sum[1:] = 100.0
        vq.ema_count.fill_(1.0)
    out = vq(z)
    assert float(out.perplexity) == pytest.approx(1.0, abs=1e-3)
    # counts decay 1 -> 0.5 -> 0.25 -> 0.125 < 0.2: the dead codes are restarted on the 3rd step
    dead = [float(vq(z).dead_fraction) for _ in range(2)]
    assert dead[0] == 0.0 and dead[1] > 0.9  # reported before the restart
    revived = vq(z)
    assert float(revived.perplexity) > 4.0, "restarted codes should be used again"
    assert vq.embedding.abs().max() < 50


def test_quantizer_straight_through_and_eval_is_frozen():
    vq = VectorQuantizer(16, 4)
    vq.train()
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    out = vq(z)
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    vq.eval()
    before = vq.embedding.clone()
    vq(torch.randn(1, 4, 2, 2, 2) * 5)
    assert torch.equal(before, vq.embedding)


def test_grouped_quantizer_shapes_codebooks_and_straight_through():
    torch.manual_seed(0)
    model = VQGAN(tiny_config(latent_channels=8, num_codebooks=4, num_embeddings=16))
    assert isinstance(model.quantizer, GroupedVectorQuantizer)
    assert [vq.embedding.shape for vq in model.quantizer.codebooks] == [(16, 2)] * 4
    model.train()
    x = torch.randn(2, 1, 16, 16, 16)
    recon, q = model(x)
    assert recon.shape == x.shape and q.quantized.shape == (2, 8, 4, 4, 4)
    assert q.indices.shape == (2, 4, 4, 4, 4) and q.perplexities.shape == (4,)
    assert float(q.perplexity) == pytest.approx(float(q.perplexities.mean()))
    assert all(1.0 < float(p) <= 16 for p in q.perplexities)
    # each group is snapped onto its own codebook: lookup of the indices gives the quantised latent
    assert torch.allclose(model.quantizer.lookup(q.indices), q.quantized, atol=1e-6)
    # product quantisation represents more distinct vectors than one codebook of the same size
    distinct = torch.unique(q.indices.permute(0, 2, 3, 4, 1).reshape(-1, 4), dim=0).shape[0]
    assert distinct > 16
    z = torch.randn(1, 8, 2, 2, 2, requires_grad=True)
    model.quantizer(z).quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    with pytest.raises(ValueError, match="8 latent channels"):
        model.quantizer(torch.randn(1, 4, 2, 2, 2))
    model.eval()
    assert model.decode(model.encode(x)).shape == x.shape


def test_single_codebook_keeps_state_dict_keys():
    # exports made before num_codebooks existed hold quantizer.embedding etc.: they must still load
    keys = set(VQGAN(tiny_config()).state_dict())
    assert {"quantizer.embedding", "quantizer.ema_count", "quantizer.ema_sum"} <= keys
    assert VQGANConfig.from_dict({k: v for k, v in tiny_config().to_dict().items()
                                  if k != "num_codebooks"}).num_codebooks == 1


def test_discriminator_shape():
    d = PatchDiscriminator3d(DiscriminatorConfig(channels=8, num_layers=2))
    assert d(torch.randn(2, 1, 32, 32, 32)).shape[:2] == (2, 1)


def test_export_round_trip_and_corruption(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(tiny_config())
    model.train()
    model(torch.randn(1, 1, 16, 16, 16))  # initialise the codebook
    model.eval()
    save_autoencoder(tmp_path / "m", model, {"modality": "CT"})
    loaded, export = load_autoencoder(tmp_path / "m")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    # an export written before num_codebooks existed loads as one codebook, unchanged
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    del record["config"]["num_codebooks"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(record))
    old, _ = load_autoencoder(tmp_path / "m")
    with torch.no_grad():
        assert old.config.num_codebooks == 1 and torch.equal(model(x)[0], old(x)[0])
    assert export.metadata["modality"] == "CT" and len(export.sha256) == 64
    # truncated weights
    w = tmp_path / "m" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        load_autoencoder(tmp_path / "m")
    # weights that do not fit the config (hash check disabled to reach the key check)
    save_autoencoder(tmp_path / "m2", VQGAN(tiny_config(latent_channels=8)))
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["config"]["latent_channels"] = 4
    cfg.pop("weights_sha256")
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="shape mismatch"):
        load_autoencoder(tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_autoencoder(tmp_path / "m2")
    with pytest.raises(InputError, match="does not exist"):
        load_autoencoder(tmp_path / "absent")
    # grouped quantiser round trip
    grouped = VQGAN(tiny_config(latent_channels=8, num_codebooks=2))
    grouped.train()
    grouped(torch.randn(1, 1, 16, 16, 16))
    grouped.eval()
    save_autoencoder(tmp_path / "g", grouped)
    loaded, export = load_autoencoder(tmp_path / "g")
    assert loaded.config.num_codebooks == 2
    with torch.no_grad():
        assert torch.equal(grouped(x)[0], loaded(x)[0])


def test_feature_network_sha256_check(tmp_path):
    import hashlib

    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3)))
    path = tmp_path / "feat.pt"
    net.save(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_feature_network(path, digest)(torch.randn(1, 1, 8, 8, 8)).shape == (1, 4, 6, 6, 6)
    with pytest.raises(ConfigError, match="refusing to use unverified weights"):
        load_feature_network(path, "0" * 64)
