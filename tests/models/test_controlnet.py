"""ControlNet3D: exact zero at init, gradient flow, token grid, mask handling, sampling hook."""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion import make_scheduler
from medsynth.errors import ConfigError
from medsynth.models.controlnet import (ControlNet3D, ControlNetConfig, dual_guidance, make_block_residuals_fn,
                                        one_hot_mask)
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.text_encoder import VocabTextEncoder
from medsynth.pipelines.sampling import Conditions, denoise

PROMPTS = ["CT abdomen portal venous, liver lesion 14 mm", "CT abdomen non-contrast"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like_dit(patch=(2, 2, 1), depth=3) -> DiT3D:
    """A tiny DiT whose zero-initialised layers got random weights, so blocks are not identities."""
    torch.manual_seed(0)
    dit = DiT3D(DiTConfig(in_channels=4, patch_size=patch, hidden_size=48, depth=depth, num_heads=4, text_dim=32))
    with torch.no_grad():
        for block in dit.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(dit.final.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(dit.final.linear.weight, std=0.05)
    return dit.eval()


def random_mask(batch, k, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    return one_hot_mask(torch.randint(0, k, (batch, *spatial), generator=g), k)


def test_zero_init_changes_nothing_exactly():
    dit = trained_like_dit()
    encoder = VocabTextEncoder.from_prompts(PROMPTS, dim=32, depth=1, num_heads=4, max_length=16)
    text = encoder.encode(PROMPTS)
    cn = ControlNet3D.from_dit(dit, num_blocks=2, num_classes=5, image_to_latent_factor=(4, 4, 2))
    x, t = torch.randn(2, 4, 4, 6, 3), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        residuals = cn(x, t, text, None, random_mask(2, 5, (16, 24, 6)))
        assert len(residuals) == 2 and all(r.abs().sum() == 0 for r in residuals)
        assert torch.equal(dit(x, t, text), dit(x, t, text, block_residuals=residuals))
        # the copied branch really is a copy: its tokens before projection match the base blocks
        assert torch.equal(cn.blocks[0].adaLN_modulation[-1].weight, dit.blocks[0].adaLN_modulation[-1].weight)


def test_gradients_reach_zero_projections_and_not_the_frozen_base():
    dit = trained_like_dit().requires_grad_(False)
    cn = ControlNet3D.from_dit(dit, 2, 3, 2)
    x, mask = torch.randn(2, 4, 4, 4, 2), random_mask(2, 3, (8, 8, 4))
    out = dit(x, torch.tensor([100.0, 500.0]), block_residuals=cn(x, torch.tensor([100.0, 500.0]), None, None, mask))
    (out - torch.randn_like(out)).pow(2).mean().backward()
    for proj in cn.zero_projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dit.parameters())


@pytest.mark.parametrize("patch,factor,latent", [((2, 2, 1), (4, 4, 2), (4, 6, 3)), ((1, 1, 1), (2, 4, 1), (3, 5, 7)),
                                                  ((2, 1, 2), (8, 8, 8), (2, 3, 4))])
def test_mask_embedder_lands_on_the_dit_token_grid(patch, factor, latent):
    dit = trained_like_dit(patch=patch, depth=2)
    cn = ControlNet3D.from_dit(dit, 1, 4, factor)
    mask = random_mask(1, 4, tuple(s * f for s, f in zip(latent, factor)))
    tokens, grid = dit.patch_embed(torch.randn(1, 4, *latent))
    assert cn.mask_embed(mask).shape == tokens.shape  # (B, N, D)
    assert cn(torch.randn(1, 4, *latent), 5.0, None, None, mask)[0].shape == tokens.shape


def test_mask_checks_and_null_mask():
    dit = trained_like_dit()
    cn = ControlNet3D.from_dit(dit, 2, 3, (2, 2, 2))
    with torch.no_grad():
        for p in cn.zero_projections:
            torch.nn.init.normal_(p.weight, std=0.1)
        torch.nn.init.normal_(cn.mask_embed.patchify.weight, std=0.1)
    x = torch.randn(2, 4, 4, 4, 2)
    mask = random_mask(2, 3, (8, 8, 4))
    with pytest.raises(ConfigError, match=r"\(2, 3, 8, 8, 4\)"):
        cn(x, 1.0, None, None, random_mask(2, 3, (8, 8, 8)))
    with pytest.raises(ConfigError, match="0..2"):
        one_hot_mask(torch.full((1, 4, 4, 4), 3), 3)
    with torch.no_grad():
        no_mask = cn(x, 1.0, None, None, None)
        dropped = cn(x, 1.0, None, None, mask, drop_mask=torch.tensor([True, False]))
        kept = cn(x, 1.0, None, None, mask)
    assert torch.allclose(dropped[0][0], no_mask[0][0]) and torch.allclose(dropped[0][1], kept[0][1])
    assert not torch.allclose(kept[0][0], no_mask[0][0])  # the mask changes the residuals


def test_config_round_trip_and_typos():
    cfg = ControlNetConfig(dit=DiTConfig(depth=4), num_blocks=2, num_classes=10, image_to_latent_factor=(4, 4, 2))
    assert ControlNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="num_blokcs"):
        ControlNetConfig.from_dict({"num_blokcs": 2})
    with pytest.raises(ConfigError, match="between 1 and the DiT depth 4"):
        ControlNetConfig(dit=DiTConfig(depth=4), num_blocks=5)
    with pytest.raises(ConfigError, match="image_to_latent_factor"):
        ControlNetConfig(image_to_latent_factor=3)


def test_sampling_hook_with_guidance():
    dit = trained_like_dit()
    cn = ControlNet3D.from_dit(dit, 2, 3, 2).eval()
    mask = random_mask(1, 3, (8, 8, 4))
    scheduler = make_scheduler("rectified_flow")
    shape = (1, 4, 4, 4, 2)
    start = torch.randn(shape)
    plain = denoise(dit, scheduler, shape, Conditions(), 3, guidance_scale=2.0, latents=start)
    hook = make_block_residuals_fn(cn, mask, guide_mask=True)
    with_cn = denoise(dit, scheduler, shape, Conditions(), 3, guidance_scale=2.0, latents=start,
                      block_residuals_fn=hook)
    assert torch.equal(plain, with_cn)  # fresh ControlNet: exactly the base sampler
    residuals = hook(torch.randn(3, 4, 4, 4, 2), torch.full((3,), 10.0))  # the 3-branch layout works too
    assert len(residuals) == 2 and residuals[0].shape[0] == 3
    with pytest.raises(ConfigError, match="batch 1"):
        hook(torch.randn(4, 4, 4, 4, 2), torch.full((4,), 10.0))
    a, b, c = torch.randn(3, 2, 4, 4, 4, 2)
    assert torch.equal(dual_guidance(a, b, c, 1.0, 1.0), a)
    assert torch.allclose(dual_guidance(a, b, c, 3.0, 3.0), c + 3.0 * (a - c), atol=1e-5)


def test_sampling_hook_gives_the_guided_branches_the_negative_prompt():
    """The ControlNet sees what the base DiT sees: the prompt in the first branch, the negative
    prompt (never dropped) in the others, metadata dropped there as without one."""
    dit = trained_like_dit()
    cn = ControlNet3D.from_dit(dit, 2, 3, 2).eval()
    with torch.no_grad():  # leave zero-init, so that text reaches the residuals
        for p in cn.parameters():
            if p.abs().sum() == 0 and p.ndim > 0:
                p.normal_(std=0.05)
    encoder = VocabTextEncoder.from_prompts(["liver lesion", "no lesion"], dim=dit.config.text_dim, depth=1,
                                            num_heads=4)
    with torch.no_grad():
        text, negative = encoder.encode(["liver lesion"]), encoder.encode(["no lesion"])
    metadata = dit.encode_metadata([{"modality": "CT", "region": "abdomen", "spacing": [1, 1, 2]}])
    mask = random_mask(1, 3, (8, 8, 4))
    x, t = torch.randn(2, 4, 4, 4, 2), torch.full((2,), 10.0)
    with_negative = make_block_residuals_fn(cn, mask, text, metadata, guide_mask=True, negative_text=negative)(x, t)
    without = make_block_residuals_fn(cn, mask, text, metadata, guide_mask=True)(x, t)
    with torch.no_grad():
        expected = cn(x[1:], t[1:], negative, metadata, mask, drop_text=torch.tensor([False]),
                      drop_metadata=torch.tensor([True]), drop_mask=torch.tensor([True]))
    for got, plain, want in zip(with_negative, without, expected):
        torch.testing.assert_close(got[:1], plain[:1])  # the conditional branch is unchanged
        torch.testing.assert_close(got[1:], want)  # the guided branch holds the negative prompt
        assert not torch.allclose(got[1:], plain[1:])
