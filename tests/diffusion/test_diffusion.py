"""Schedulers, objectives, guidance and the denoising loop (analytic checks with exact models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsynth.diffusion import (bucket_losses, classifier_free_guidance, default_sampler, make_objective,
                                make_scheduler)
from medsynth.errors import ConfigError
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.text_encoder import VocabTextEncoder
from medsynth.pipelines.sampling import Conditions, denoise, resolve_device

SHAPE = (2, 3, 4, 5, 6)


class ExactModel(nn.Module):
    """Predicts exactly what the objective asks for, given a fixed clean target ``x0``."""

    def __init__(self, target: torch.Tensor, objective: str) -> None:
        super().__init__()
        self.register_buffer("target", target)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the loop a device and dtype
        self.objective = objective
        self.alphas = None if objective == "rectified_flow" else make_objective(objective).alphas_cumprod
        self.calls: list[int] = []

    def forward(self, x, timesteps, text=None, metadata=None, *, drop_text=None, drop_metadata=None,
                block_residuals=None):
        self.calls.append(x.shape[0])
        x0 = self.target[: x.shape[0]] if x.shape[0] == self.target.shape[0] else torch.cat([self.target] * 2)
        shape = (-1, 1, 1, 1, 1)
        if self.objective == "rectified_flow":
            sigma = (timesteps / 1000).reshape(shape)
            return (x - x0) / sigma  # velocity noise - x0, with noise = (x - (1 - sigma) x0) / sigma
        a = self.alphas[timesteps.long()].reshape(shape)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.objective == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_loop_reaches_target_exactly(shift):
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    model = ExactModel(target, "rectified_flow")
    out = denoise(model, make_scheduler("rectified_flow", shift=shift), SHAPE, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    assert model.calls == [2, 2, 2, 2]  # guidance 1: one conditional call per step


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction"])
def test_ddim_loop_with_exact_model_lands_on_target(objective):
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = denoise(ExactModel(target, objective), make_scheduler(objective, "ddim"), SHAPE, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(0))
    # the last DDIM step lands on alpha_bar(0) = 1 - 0.00085, i.e. ~3 % of noise is left
    assert (out - target).abs().mean() < 0.05


def test_ddpm_loop_is_deterministic_per_seed():
    target = torch.zeros(SHAPE)
    model = ExactModel(target, "epsilon")

    def run(seed):
        return denoise(model, make_scheduler("epsilon", "ddpm"), SHAPE, num_inference_steps=8,
                       generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_guidance_scale_one_is_the_conditional_prediction():
    cond, uncond = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def tiny_dit_and_conditions():
    torch.manual_seed(0)
    prompts = ["CT abdomen portal venous, liver lesion 14 mm, female, 63", "MR head FLAIR, no tumour, male, 50"]
    encoder = VocabTextEncoder.from_prompts(prompts, dim=32, depth=1, num_heads=4)
    model = DiT3D(DiTConfig(in_channels=3, patch_size=(2, 1, 2), hidden_size=48, depth=2, num_heads=4, text_dim=32))
    with torch.no_grad():  # leave adaLN-Zero so that conditions matter
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 0:
                p.normal_(std=0.05)
    metadata = model.encode_metadata([{"modality": "CT", "region": "abdomen", "spacing": [1, 1, 2]},
                                      {"modality": "MR", "region": "head", "spacing": [1, 1, 1], "age": 50}])
    with torch.no_grad():
        text = encoder.encode(prompts)
    return model.eval(), Conditions(text=text, metadata=metadata)


def test_dit_sampling_same_seed_same_output_and_guidance_runs():
    model, conditions = tiny_dit_and_conditions()
    shape = (2, 3, 4, 4, 6)
    sched = make_scheduler("rectified_flow")
    a = denoise(model, sched, shape, conditions, 3, 2.5, torch.Generator().manual_seed(0))
    b = denoise(model, sched, shape, conditions, 3, 2.5, torch.Generator().manual_seed(0))
    c = denoise(model, sched, shape, conditions, 3, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_denoise_guided_step_matches_manual_combination():
    model, conditions = tiny_dit_and_conditions()
    shape = (2, 3, 4, 4, 6)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 1, 4.0, latents=start)
    with torch.no_grad():
        t = torch.full((2,), 1000.0)
        cond = model(start, t, conditions.text, conditions.metadata)
        drop = torch.ones(2, dtype=torch.bool)
        uncond = model(start, t, conditions.text, conditions.metadata, drop_text=drop, drop_metadata=drop)
    expected = start + (0.0 - 1.0) * (uncond + 4.0 * (cond - uncond))  # one Euler step from sigma 1 to 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_negative_prompt_stands_where_the_null_text_was():
    """Guided step with a negative prompt: uncond + g * (cond - uncond), where "uncond" keeps the
    negative prompt's text (never dropped) and drops only the metadata."""
    model, conditions = tiny_dit_and_conditions()
    encoder_prompts = ["CT abdomen portal venous, liver lesion 14 mm, female, 63", "MR head FLAIR, no tumour, male, 50"]
    encoder = VocabTextEncoder.from_prompts(encoder_prompts, dim=32, depth=1, num_heads=4)
    with torch.no_grad():
        negative = encoder.encode(["no lesion", "no tumour"])
    shape = (2, 3, 4, 4, 6)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with_negative = Conditions(conditions.text, conditions.metadata, negative_text=negative)
    out = denoise(model, make_scheduler("rectified_flow"), shape, with_negative, 1, 4.0, latents=start)
    plain = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 1, 4.0, latents=start)
    with torch.no_grad():
        t = torch.full((2,), 1000.0)
        cond = model(start, t, conditions.text, conditions.metadata)
        keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
        uncond = model(start, t, negative, conditions.metadata, drop_text=keep, drop_metadata=drop)
    expected = start + (0.0 - 1.0) * (uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, plain)  # the negative prompt changed the sample
    # without guidance there is one branch and the negative prompt is not used
    unguided = denoise(model, make_scheduler("rectified_flow"), shape, with_negative, 1, 1.0, latents=start)
    torch.testing.assert_close(unguided, denoise(model, make_scheduler("rectified_flow"), shape, conditions, 1, 1.0,
                                                 latents=start))
    with pytest.raises(ConfigError, match="needs a prompt"):
        denoise(model, make_scheduler("rectified_flow"), shape, Conditions(None, conditions.metadata, negative), 1,
                4.0, latents=start)
    with pytest.raises(ConfigError, match="1 negative prompts for 2"):
        denoise(model, make_scheduler("rectified_flow"), shape,
                Conditions(conditions.text, conditions.metadata, encoder.encode(["no lesion"])), 1, 4.0,
                latents=start)


def test_block_residuals_hook_is_called_with_model_batch():
    model, conditions = tiny_dit_and_conditions()
    shape = (2, 3, 4, 4, 6)
    seen = []

    def zeros(x, t):
        seen.append((x.shape[0], t.shape))
        return [torch.zeros(x.shape[0], 2 * 4 * 3, 48)]

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 2, 2.0, gen())
    hooked = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 2, 2.0, gen(),
                     block_residuals_fn=zeros)
    assert torch.equal(base, hooked) and seen == [(4, torch.Size([4]))] * 2


def test_objectives_targets_and_noising():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    flow = make_objective("rectified_flow")
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.full((2,), 1000.0)), noise)
    torch.testing.assert_close(flow.target(x0, noise, torch.zeros(2)), noise - x0)
    v = make_objective("v_prediction")
    t = torch.tensor([10, 900])
    xt = v.add_noise(x0, noise, t)
    a = v.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v.target(x0, noise, t), x0, atol=1e-5, rtol=1e-5)
    # training noising agrees with the sampler's own schedule
    ddpm = make_scheduler("epsilon", "ddpm")
    torch.testing.assert_close(make_objective("epsilon").add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    ts = flow.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert ts.min() > 0 and ts.max() < 1000 and abs(ts.float().mean().item() - 500) < 30
    assert make_objective("epsilon").sample_timesteps(7).dtype == torch.long


def test_loss_and_buckets():
    obj = make_objective("epsilon")
    x0, noise = torch.zeros(4, 1, 2, 2, 2), torch.ones(4, 1, 2, 2, 2)
    t = torch.tensor([10, 20, 600, 999])
    pred = torch.zeros_like(x0)
    pred[2:] = 1.0  # perfect on the two noisy samples
    out = obj.loss(pred, x0, noise, t)
    assert out.per_sample.tolist() == [1.0, 1.0, 0.0, 0.0] and out.loss.item() == 0.5
    buckets = bucket_losses(out.per_sample, t, num_buckets=4)
    assert buckets == {"t000-250": torch.tensor(1.0), "t500-750": torch.tensor(0.0), "t750-1000": torch.tensor(0.0)}


def test_factory_errors_and_defaults():
    assert default_sampler("rectified_flow") == "euler" and default_sampler("epsilon") == "ddim"
    with pytest.raises(ConfigError, match=r"valid objectives are \['rectified_flow', 'epsilon', 'v_prediction'\]"):
        make_scheduler("score")
    with pytest.raises(ConfigError, match=r"sampler 'ddim' does not fit objective 'rectified_flow'"):
        make_scheduler("rectified_flow", "ddim")
    with pytest.raises(ConfigError, match="timestep_sampling"):
        make_objective("rectified_flow", timestep_sampling="beta")
    with pytest.raises(ConfigError, match="takes no options"):
        make_objective("epsilon", shift=2.0)


def test_bad_inputs_to_denoise():
    model = ExactModel(torch.zeros(SHAPE), "rectified_flow")
    sched = make_scheduler()
    with pytest.raises(ConfigError, match="num_inference_steps"):
        denoise(model, sched, SHAPE, num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"latents_shape \(B, C, X, Y, Z\)"):
        denoise(model, sched, (2, 3, 4))
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="'cuda' is not available.*--device cpu"):
        denoise(ExactModel(torch.zeros(SHAPE), "rectified_flow"), make_scheduler(), SHAPE, device="cuda")


class BranchStub(nn.Module):
    """``0.5 x + TEXT (where text is kept) + residual``: each guidance branch is known analytically."""

    TEXT = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, text, metadata, drop_text=None, drop_metadata=None, block_residuals=None):
        self.calls.append(x.shape[0])
        keep = torch.ones(x.shape[0]) if drop_text is None else (~drop_text).float()
        return 0.5 * x + self.TEXT * keep.view(-1, 1, 1, 1, 1) + block_residuals[0]


def mask_hook(value: float = 5.0):
    """A ControlNet stand-in: ``value`` where the mask is kept; [full; mask only; uncond] drops it last."""
    def hook(x, t):
        n = x.shape[0]
        kept = torch.ones(n)
        if n % 3 == 0 and n >= 3:
            kept[2 * n // 3:] = 0.0
        return [value * kept.view(-1, 1, 1, 1, 1)]
    return hook


@pytest.mark.parametrize("text_scale,mask_scale", [(2.0, 3.0), (1.0, 4.0), (0.0, 1.5)])
def test_dual_guidance_in_the_loop_matches_analytic_combination(text_scale, mask_scale):
    shape = (2, 3, 4, 4, 4)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    model = BranchStub()
    out = denoise(model, make_scheduler("rectified_flow"), shape, None, 1, text_scale, latents=start,
                  block_residuals_fn=mask_hook(5.0), mask_guidance_scale=mask_scale)
    prediction = 0.5 * start + mask_scale * 5.0 + text_scale * BranchStub.TEXT  # uncond + s_m M + s_t T
    torch.testing.assert_close(out, start - prediction)  # one Euler step from sigma 1 to 0
    assert model.calls == [6]  # one batch of 3B per step: still one loop


def test_dual_guidance_scales_one_equal_unguided_conditional():
    model, conditions = tiny_dit_and_conditions()
    shape = (2, 3, 4, 4, 6)
    residual = lambda x, t: [0.1 * torch.ones(x.shape[0], 2 * 4 * 3, 48)]  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 2, 1.0, gen(),
                    block_residuals_fn=residual)
    dual = denoise(model, make_scheduler("rectified_flow"), shape, conditions, 2, 1.0, gen(),
                   block_residuals_fn=residual, mask_guidance_scale=1.0)
    assert torch.equal(plain, dual)
    stub = BranchStub()
    start = torch.randn((1, 3, 4, 4, 4), generator=gen())
    out = denoise(stub, make_scheduler("rectified_flow"), start.shape, None, 1, 1.0, latents=start,
                  block_residuals_fn=mask_hook(5.0), mask_guidance_scale=1.0)
    torch.testing.assert_close(out, start - (0.5 * start + 5.0 + BranchStub.TEXT))
    with pytest.raises(ConfigError, match="needs a ControlNet"):
        denoise(stub, make_scheduler("rectified_flow"), start.shape, None, 1, 2.0, latents=start,
                mask_guidance_scale=2.0)


def test_dual_guidance_moved_to_diffusion_guidance():
    from medsynth.diffusion.guidance import dual_guidance
    from medsynth.models import controlnet

    assert controlnet.dual_guidance is dual_guidance


@pytest.mark.parametrize("rescale", [0.7, 1.0])
def test_guidance_rescale_pulls_the_guided_prediction_to_the_conditional_spread(rescale):
    """Lin et al. 2024, Sect. 3.4: each sample's guided prediction is rescaled to the standard
    deviation of the conditional (full) branch and mixed back by ``rescale``; worked out by hand here."""
    shape = (2, 3, 4, 4, 4)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = denoise(BranchStub(), make_scheduler("rectified_flow"), shape, None, 1, 2.0, latents=start,
                  block_residuals_fn=mask_hook(5.0), mask_guidance_scale=3.0, guidance_rescale=rescale)
    guided = 0.5 * start + 3.0 * 5.0 + 2.0 * BranchStub.TEXT
    full = 0.5 * start + 5.0 + BranchStub.TEXT
    ratio = torch.stack([full[i].std() / guided[i].std() for i in range(2)]).view(-1, 1, 1, 1, 1)
    expected = rescale * guided * ratio + (1 - rescale) * guided
    torch.testing.assert_close(out, start - expected)
    if rescale == 1.0:  # fully rescaled: each sample's prediction has the conditional branch's spread
        for i in range(2):
            torch.testing.assert_close((start - out)[i].std(), full[i].std())


def test_guidance_rescale_off_changes_nothing_and_bad_values_are_refused():
    shape = (1, 3, 4, 4, 4)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    def run(**kw):
        return denoise(BranchStub(), make_scheduler("rectified_flow"), shape, None, 1, latents=start,
                       block_residuals_fn=mask_hook(5.0), **kw)

    guided = run(guidance_scale=2.0, mask_guidance_scale=3.0)
    assert torch.equal(run(guidance_scale=2.0, mask_guidance_scale=3.0, guidance_rescale=0.0), guided)
    # without guidance there is one branch and nothing to rescale
    assert torch.equal(run(guidance_scale=1.0, mask_guidance_scale=1.0, guidance_rescale=0.7),
                       run(guidance_scale=1.0, mask_guidance_scale=1.0))
    # two-branch classifier-free guidance is rescaled too
    assert not torch.equal(run(guidance_scale=3.0, guidance_rescale=0.7), run(guidance_scale=3.0))
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"guidance_rescale in \[0, 1\]"):
            run(guidance_scale=2.0, guidance_rescale=bad)
