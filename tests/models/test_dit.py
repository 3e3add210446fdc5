"""DiT3D: shapes on odd grids, adaLN-Zero identity, conditioning, dropout, learning, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medsynth.diffusion import make_objective, make_scheduler, sample_condition_dropout
from medsynth.errors import ConfigError
from medsynth.models.dit import PRESETS, DiT3D, DiTConfig, preset
from medsynth.models.embeddings import sincos_position_embedding_3d
from medsynth.models.text_encoder import VocabTextEncoder, build_text_encoder

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "dit"
PROMPTS = ["CT abdomen portal venous, liver lesion 14 mm, female, 63",
           "MR head FLAIR, tumour 26 mm with oedema, female, 43"]
META = [{"modality": "CT", "region": "abdomen", "spacing": [1.5, 1.5, 2.0], "sex": "female", "age": 63},
        {"modality": "MR", "region": "head", "spacing": [1.0, 1.0, 1.0]}]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP barriers make
    each training step ~50x slower (measured: 2 s vs 0.02 s); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw) -> DiTConfig:
    base = dict(in_channels=4, patch_size=(2, 2, 2), hidden_size=48, depth=2, num_heads=4, text_dim=32)
    return DiTConfig(**{**base, **kw})


@pytest.fixture()
def encoder() -> VocabTextEncoder:
    torch.manual_seed(0)
    return VocabTextEncoder.from_prompts(PROMPTS, dim=32, depth=1, num_heads=4, max_length=24)


def randomise_gates(model: DiT3D) -> None:
    """Give the zero-initialised adaLN/final layers random weights, so outputs depend on the inputs."""
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(model.final.adaLN_modulation[-1].weight, std=0.05)
        torch.nn.init.normal_(model.final.linear.weight, std=0.05)


@pytest.mark.parametrize("patch,spatial", [((2, 2, 2), (4, 6, 8)), ((1, 2, 4), (3, 4, 8)), ((4, 4, 1), (8, 4, 5))])
def test_shapes_non_cubic_grids(encoder, patch, spatial):
    model = DiT3D(tiny_config(patch_size=patch))
    randomise_gates(model)
    x = torch.randn(2, 4, *spatial)
    out = model(x, torch.tensor([3.0, 900.0]), encoder.encode(PROMPTS), model.encode_metadata(META))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_variable_grids_one_model(encoder):
    model = DiT3D(tiny_config(patch_size=(1, 1, 1))).eval()
    randomise_gates(model)
    for spatial in [(4, 4, 4), (6, 5, 4), (8, 8, 7)]:
        assert model(torch.randn(1, 4, *spatial), 10.0).shape == (1, 4, *spatial)


def test_positions_differ_per_axis_and_grid():
    pos = sincos_position_embedding_3d((2, 3, 4), 48)
    assert pos.shape == (24, 48)
    assert torch.unique(pos, dim=0).shape[0] == 24  # every token has its own position
    # (x, y, z) -> row x*12 + y*4 + z; the same voxel index gives the same code on a bigger grid
    bigger = sincos_position_embedding_3d((3, 3, 4), 48)
    assert torch.equal(pos, bigger[:24])


def test_indivisible_grid_is_refused_naming_padding():
    model = DiT3D(tiny_config(patch_size=(2, 2, 2)))
    with pytest.raises(ConfigError, match=r"\(5, 4, 4\).*patch_size \(2, 2, 2\).*\(6, 4, 4\)"):
        model(torch.randn(1, 4, 5, 4, 4), 1.0)
    with pytest.raises(ConfigError, match=r"\(B, 4, X, Y, Z\)"):
        model(torch.randn(1, 3, 4, 4, 4), 1.0)


def test_adaln_zero_blocks_are_identity_at_init(encoder):
    model = DiT3D(tiny_config())
    cond, context, mask = model.conditions(2, encoder.encode(PROMPTS), model.encode_metadata(META), None, None)
    c = model.time_embed(torch.tensor([5.0, 700.0])) + cond
    tokens = torch.randn(2, 27, 48)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, context, mask), tokens)
    assert torch.equal(model(torch.randn(2, 4, 4, 4, 4), 10.0), torch.zeros(2, 4, 4, 4, 4))


def test_zero_block_residuals_change_nothing_and_others_do(encoder):
    model = DiT3D(tiny_config()).eval()
    randomise_gates(model)
    x, t = torch.randn(2, 4, 4, 4, 6), torch.tensor([100.0, 400.0])
    text, meta = encoder.encode(PROMPTS), model.encode_metadata(META)
    base = model(x, t, text, meta)
    zeros = [torch.zeros(2, 12, 48) for _ in range(2)]
    assert torch.equal(model(x, t, text, meta, block_residuals=zeros), base)
    ones = [torch.ones(2, 12, 48)]
    assert not torch.allclose(model(x, t, text, meta, block_residuals=ones), base)
    with pytest.raises(ConfigError, match="block_residuals"):
        model(x, t, text, meta, block_residuals=[torch.zeros(2, 5, 48)])


def test_dropped_conditions_use_null_embeddings(encoder):
    model = DiT3D(tiny_config())
    text, meta = encoder.encode(PROMPTS), model.encode_metadata(META)
    drop_text, drop_meta = torch.tensor([True, False]), torch.tensor([False, True])
    cond, context, mask = model.conditions(2, text, meta, drop_text, drop_meta)
    null_cond, null_ctx, null_mask = model.conditions(2, None, None, None, None)
    full_cond, full_ctx, _ = model.conditions(2, text, meta, None, None)
    # sample 0: text dropped -> null token sequence (one valid token) and null pooled vector
    assert torch.equal(context[0, 0], null_ctx[0, 0]) and mask[0].tolist() == [True] + [False] * (mask.shape[1] - 1)
    assert torch.equal(context[1], full_ctx[1])
    meta_emb = model.conditions.metadata(meta)
    text_pooled = model.conditions.text_pooled(text.pooled)
    torch.testing.assert_close(cond[0], model.conditions.null_text_pooled + meta_emb[0])
    torch.testing.assert_close(cond[1], text_pooled[1] + model.conditions.null_metadata)
    torch.testing.assert_close(null_cond[0], model.conditions.null_text_pooled + model.conditions.null_metadata)
    assert not torch.allclose(full_cond[0], cond[0])


def test_empty_prompt_gets_null_text(encoder):
    model = DiT3D(tiny_config())
    text = encoder.encode(["", PROMPTS[1]])
    assert not text.mask[0].any() and torch.equal(text.pooled[0], torch.zeros(32))
    cond, context, _ = model.conditions(2, text, None, None, None)
    dropped, dctx, _ = model.conditions(2, text, None, torch.tensor([True, False]), None)
    torch.testing.assert_close(cond, dropped)
    torch.testing.assert_close(context, dctx)


def test_condition_dropout_rates_are_separate():
    gen = torch.Generator().manual_seed(0)
    drop_text, drop_meta = sample_condition_dropout(20_000, 0.1, 0.3, generator=gen)
    assert abs(drop_text.float().mean().item() - 0.1) < 0.01
    assert abs(drop_meta.float().mean().item() - 0.3) < 0.015
    assert abs((drop_text & drop_meta).float().mean().item() - 0.03) < 0.007  # independent draws
    assert not sample_condition_dropout(100, 0.0, 0.0)[0].any()
    with pytest.raises(ConfigError, match="text_drop_rate"):
        sample_condition_dropout(4, 1.5, 0.1)


def test_unknown_metadata_values_name_valid_ones():
    model = DiT3D(tiny_config())
    with pytest.raises(ConfigError, match=r"'PET'.*\['CT', 'MR'\]"):
        model.encode_metadata([{**META[0], "modality": "PET"}])
    with pytest.raises(ConfigError, match="region 'tail'"):
        model.encode_metadata([{**META[0], "region": "tail"}])
    with pytest.raises(ConfigError, match="spacing"):
        model.encode_metadata([{"modality": "CT", "region": "head"}])
    with pytest.raises(ConfigError, match="sex"):
        model.encode_metadata([{**META[0], "sex": "x"}])
    meta = model.encode_metadata([{**META[0], "sex": None, "age": None}])  # optional fields
    assert meta["sex"].item() == 0 and not meta["age_known"].item()


def test_metadata_changes_prediction(encoder):
    model = DiT3D(tiny_config()).eval()
    randomise_gates(model)
    x = torch.randn(1, 4, 4, 4, 4)
    a = model(x, 50.0, None, model.encode_metadata([META[0]]))
    b = model(x, 50.0, None, model.encode_metadata([{**META[0], "spacing": [3.0, 3.0, 5.0]}]))
    assert not torch.allclose(a, b)


def test_gradient_checkpointing_matches_plain(encoder):
    torch.manual_seed(0)
    model = DiT3D(tiny_config())
    randomise_gates(model)
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([10.0, 20.0])
    text = encoder.encode(PROMPTS)
    model(x, t, text).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, encoder.encode(PROMPTS)).square().mean().backward()
    ckpt = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["rectified_flow", "epsilon"])
def test_loss_falls_on_tiny_overfit(encoder, objective):
    torch.manual_seed(0)
    model = DiT3D(tiny_config(patch_size=(1, 1, 1), hidden_size=64))
    obj = make_objective(objective)
    params = list(model.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    x0 = torch.randn(2, 4, 4, 4, 4)
    meta = model.encode_metadata(META)
    # fixed noise and timesteps: a pure overfit, so the loss must fall far, not just drift
    xt, t, noise = obj.training_inputs(x0, torch.Generator().manual_seed(1))
    losses = []
    for _ in range(60):
        loss = obj.loss(model(xt, t, encoder.encode(PROMPTS), meta), x0, noise, t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


def test_presets_and_config_validation():
    assert preset("S").hidden_size == 384 and preset("tiny", depth=2).depth == 2
    for name, cfg in PRESETS.items():
        assert DiTConfig.from_dict(cfg.to_dict()) == cfg, name
    with pytest.raises(ConfigError, match="unknown DiT preset"):
        preset("xl")
    with pytest.raises(ConfigError, match="patch_size"):
        DiTConfig(patch_size=3)
    with pytest.raises(ConfigError, match="hidden_size=50 and num_heads=4"):
        DiTConfig(hidden_size=50, num_heads=4)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depht'\]"):
        DiTConfig.from_dict({"depht": 3})


@pytest.mark.parametrize("name", ["tiny", "s", "b", "l"])
def test_config_files_parse(name):
    data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    cfg = DiTConfig.from_dict(data["model"])
    assert cfg == preset(name)
    objective = data["objective"]
    make_objective(objective["name"], **objective.get("options", {}))
    make_scheduler(objective["name"], data["sampling"].get("sampler"), shift=data["sampling"].get("shift", 1.0))
    text = dict(data["text_encoder"])
    if text["kind"] == "vocab":
        enc = build_text_encoder(text, prompts=PROMPTS)
        assert enc.dim == cfg.text_dim
    else:
        assert text["name_or_path"] and cfg.text_dim > 0
    from medsynth.training.dit import DiTTrainingConfig

    assert DiTTrainingConfig.from_dict(data["training"]).max_steps > 0
    assert set(data) == {"model", "text_encoder", "objective", "sampling", "training"}
