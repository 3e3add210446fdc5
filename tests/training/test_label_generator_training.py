"""Label generator training: configs, train-split data, learning, export round trip, sampling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

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
    # the decoder's volume calibration is stored with the model, one offset per label value
    assert len(config["decoding"]["class_offsets"]) == max(data.labels.values()) + 1
    assert set(record["metadata"]["volume_calibration"]["volume_ratio_after"]) <= set(data.labels)
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


def test_lesion_region_weighting_of_the_label_dit(data, tmp_path):
    """``region_classes: [lesions]`` names every lesion class; the DiT's loss then weighs latent
    voxels holding a lesion by ``region_loss_weight`` (the items carry their label maps)."""
    from medsynth.training.dit import DiTModule, collate_latents, text_encoder_config_for
    from medsynth.diffusion import expand_region_classes
    from medsynth.training.label_generator import LabelLatentDataset, fit_label_generator, read_label_cases

    assert expand_region_classes(["lesions", "spleen"], data.labels) == ["liver_lesion", "spleen"]
    cases = read_label_cases(data.root, 4)
    lesion = data.labels["liver_lesion"]
    with_lesion = [i for i, a in enumerate(cases.arrays) if (a == lesion).any()]
    assert with_lesion, "the fixture needs a training map with a lesion"
    latents = torch.zeros(len(cases.arrays), 4, *(s // 4 for s in cases.shape))
    names = ("lesions:liver_lesion",)
    dataset = LabelLatentDataset(latents, cases.prompts, cases.records, cases.attribute_values(names), 0.0,
                                 maps=cases.arrays)
    assert torch.equal(dataset[0]["label"], torch.from_numpy(cases.arrays[0]))
    batch = collate_latents([dataset[i] for i in with_lesion[:1]])

    def loss(weight: float) -> float:
        torch.manual_seed(0)
        module = DiTModule({**SMALL["dit"], "in_channels": 4, "attributes": list(names)},
                           text_encoder_config_for(SMALL["text_encoder"], cases.prompts),
                           {"name": "rectified_flow"}, {"region_classes": ["liver_lesion"], "region_loss_weight": weight},
                           labels=data.labels)
        torch.manual_seed(1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            return float(module.training_step(batch, 0))

    assert loss(50.0) > 1.5 * loss(1.0)  # the lesion's latent voxel dominates once weighted
    # and the whole fit accepts the entry (CT phantoms: it becomes liver_lesion)
    config = {**SMALL, "dit_training": {**SMALL["dit_training"], "region_classes": ["lesions"],
                                        "region_loss_weight": 10.0}}
    export = fit_label_generator(data.root, tmp_path / "weighted", config, accelerator="cpu", devices=1)
    record = json.loads((export / "config.json").read_text())
    assert record["metadata"]["training"]["dit_training"]["region_classes"] == ["liver_lesion"]


class _BiasedDecoder(torch.nn.Module):
    """Stand-in label autoencoder whose logits favour class 2 at every boundary: blurred one-hot
    maps (passed in as the "latent") plus a prior of +1.2 on class 2, as class weighting gives."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from medsynth.models.label_generator import LabelAutoencoder, LabelAutoencoderConfig

        self.inner = LabelAutoencoder(LabelAutoencoderConfig(num_classes=num_classes, channels=(4,), num_groups=4))
        self.config = self.inner.config
        self.prior = torch.zeros(num_classes)
        self.prior[2] = 1.2

    def decode(self, latent):
        blurred = torch.nn.functional.avg_pool3d(latent, 3, stride=1, padding=1, count_include_pad=False)
        return 3.0 * blurred + self.prior[None, :, None, None, None]

    def allowed_logits(self, *args, **kwargs):
        return self.inner.allowed_logits(*args, **kwargs)

    def decode_labels(self, latent, allowed=None, class_offsets=None):
        return self.allowed_logits(self.decode(latent), allowed, class_offsets).argmax(dim=1)


def test_volume_calibration_undoes_a_class_prior_exactly():
    from medsynth.training.label_generator import fit_class_offsets, reconstruction_dice

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), axis=-1)
    arrays = []
    for _ in range(5):
        label = np.zeros((16, 16, 16), dtype=np.int64)
        label[np.linalg.norm(grid - rng.uniform(6, 10, 3), axis=-1) < rng.uniform(5, 7)] = 1
        label[np.linalg.norm(grid - rng.uniform(6, 10, 3), axis=-1) < rng.uniform(2, 3)] = 2
        arrays.append(label)
    labels = {"background": 0, "organ": 1, "lesion": 2}  # value 3 is not in the table
    model = _BiasedDecoder(num_classes=4)
    latents = torch.nn.functional.one_hot(torch.from_numpy(np.stack(arrays)), 4).permute(0, 4, 1, 2, 3).float()

    calibration = fit_class_offsets(model, latents, arrays, labels, max_cases=4, batch_size=2)

    assert calibration.cases == 4
    assert calibration.volume_ratio_before["lesion"] > 1.2  # the prior inflates the small class
    # within 5 %: a few-voxel class moves by whole boundary shells
    assert all(abs(r - 1) < 0.05 for r in calibration.volume_ratio_after.values()), calibration
    assert calibration.class_offsets[0] == 0 and calibration.class_offsets[2] < calibration.class_offsets[1]
    # "after" is what decoding with the offsets really gives (the settled voxels are not approximated)
    chosen = [0, 1, 3, 4]  # evenly spaced over 5 maps
    decoded = model.decode_labels(latents[chosen], allowed=[0, 1, 2], class_offsets=calibration.class_offsets)
    truth = np.stack([arrays[i] for i in chosen])
    for name, value in labels.items():
        assert (decoded.numpy() == value).sum() / (truth == value).sum() == pytest.approx(
            calibration.volume_ratio_after[name], abs=1e-3)
    assert not (decoded == 3).any()
    plain = reconstruction_dice(model, latents, arrays, labels)
    calibrated = reconstruction_dice(model, latents, arrays, labels, calibration.class_offsets)
    assert calibrated["lesion"] > plain["lesion"]
    with pytest.raises(ConfigError, match="expects 4 class offsets"):
        model.decode_labels(latents[:1], class_offsets=[0.0, 1.0])


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


def _map_with_lesions(radii: list[float], liver_radius: float = 7.0) -> np.ndarray:
    """16^3 map: body (1) holding a liver (3) holding one ball of liver_lesion (9) per radius (voxels)."""
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), axis=-1)
    label = np.ones((16, 16, 16), dtype=np.int64)
    label[np.linalg.norm(grid - 7.5, axis=-1) < liver_radius] = 3
    centres = [(4, 7, 7), (11, 7, 7), (7, 4, 11), (7, 11, 4)]
    for radius, centre in zip(radii, centres):
        label[np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius] = 9
    return label


def test_keep_largest_lesions_fills_the_rest_with_the_host():
    from medsynth.evaluation.label_statistics import case_statistics
    from medsynth.pipelines.lesions import keep_largest_lesions

    labels = {"background": 0, "body": 1, "liver": 3, "liver_lesion": 9}
    label = _map_with_lesions([2.2, 1.0, 1.5])
    assert case_statistics(label, labels, (1, 1, 1))["lesion_counts"]["liver_lesion"] == 3
    kept, found = keep_largest_lesions(label, 9, 1)
    assert found == 3 and case_statistics(kept, labels, (1, 1, 1))["lesion_counts"]["liver_lesion"] == 1
    assert (kept[4, 7, 7] == 9) and kept[11, 7, 7] == 3 and kept[7, 4, 11] == 3  # the largest stays, the host closes
    assert ((kept != label) <= (label == 9)).all()  # only lesion voxels changed
    same, found = keep_largest_lesions(label, 9, 5)
    assert found == 3 and np.array_equal(same, label)
    cleared, found = keep_largest_lesions(label, 9, 0)
    assert found == 3 and not (cleared == 9).any() and (cleared[label == 9] == 3).all()


def test_asked_lesion_counts_and_sizes_are_held_by_redrawing_and_trimming(export):
    from medsynth.pipelines.label_generator_source import LabelGenerator

    gen = LabelGenerator.from_pretrained(export)
    draws = iter([_map_with_lesions([2.2, 1.5, 1.0]), _map_with_lesions([2.0, 1.2])])
    # one lesion drawn, two asked: a second draw with three is kept and trimmed to its two largest
    held, record = gen._hold_requests(_map_with_lesions([1.5]), {"liver_lesion": 2}, {}, lambda: next(draws))
    assert record == {"draws": 2, "met": True, "lesion_counts": {"asked": {"liver_lesion": 2},
                                                                 "drawn": {"liver_lesion": 3},
                                                                 "removed": {"liver_lesion": 1}}}
    assert held[4, 7, 7] == 9 and held[11, 7, 7] == 9 and held[7, 4, 11] == 3
    # a draw budget that cannot reach the count keeps the best draw and says so
    gen.max_draws = 2
    short, record = gen._hold_requests(_map_with_lesions([]), {"liver_lesion": 2}, {},
                                       lambda: _map_with_lesions([1.5]))
    assert record["met"] is False and record["draws"] == 2 and record["lesion_counts"]["drawn"] == {"liver_lesion": 1}
    assert (short == 9).sum() == (_map_with_lesions([1.5]) == 9).sum()
    # sizes: training livers of radius 3..7 voxels at 1 mm; a radius-3 draw sits at quantile 0.1,
    # so asking for 0.9 draws again until a radius-7 liver comes
    gen.max_draws = 8
    gen.native_spacing = (1.0, 1.0, 1.0)
    gen.statistics = {**gen.statistics, "volumes_ml": {**gen.statistics["volumes_ml"], "liver": [
        float((_map_with_lesions([], r) == 3).sum()) / 1000.0 for r in (3, 4, 5, 6, 7)]}}
    sizes = iter([_map_with_lesions([], 4), _map_with_lesions([], 7)])
    big, record = gen._hold_requests(_map_with_lesions([], 3), {}, {"liver": 0.9}, lambda: next(sizes))
    assert record["draws"] == 3 and record["met"] and record["size_quantiles"]["reached"] == {"liver": 0.9}
    assert (big == 3).sum() == (_map_with_lesions([], 7) == 3).sum()
    gen = LabelGenerator.from_pretrained(export)
    # end to end: zero lesions asked -> none in any map, and the record travels with the map
    maps = gen(["CT abdomen"] * 2, [torch.Generator().manual_seed(s) for s in (0, 1)],
               lesion_counts={"liver_lesion": 0}, guidance_scale=1.0)
    for volume in maps:
        info = volume.metadata.extra["mask_source"]["held"]
        assert info["met"] and info["draws"] == 1 and not (volume.array == 9).any()
    gen.max_draws = 0  # the model's own maps, untouched and unrecorded
    plain = gen("CT abdomen", [torch.Generator().manual_seed(0)], lesion_counts={"liver_lesion": 0})[0]
    assert "held" not in plain.metadata.extra["mask_source"]


def test_stated_findings_are_held_by_size_and_inserted_when_no_draw_has_them(export):
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter
    from medsynth.pipelines.label_generator_source import FINDING_SIZE_TOLERANCE, LabelGenerator

    gen = LabelGenerator.from_pretrained(export)
    gen.native_spacing = (1.0, 1.0, 1.0)
    grid = Grid((16, 16, 16), gen.native_spacing)
    # a ball of radius 2.2 voxels is ~4 mm across at 1 mm, one of radius 1.0 is ~2.4 mm
    counts, diameters = gen.finding_requests("CT abdomen portal venous, liver lesion 4 mm, female, 60", {})
    assert counts == {"liver_lesion": 1}
    assert diameters == {"liver_lesion": (4 / FINDING_SIZE_TOLERANCE, 4 * FINDING_SIZE_TOLERANCE)}
    assert gen.finding_requests("CT abdomen, liver lesion 4 mm", {"liver_lesion": 0}) == (
        {"liver_lesion": 0}, {})  # an explicit count wins over the prompt's, and zero lesions have no size

    def lesion_diameters(label):
        components, found = ndimage.label(label == 9, structure=np.ones((3, 3, 3)))
        return [equivalent_diameter(int((components == i).sum()), grid) for i in range(1, found + 1)]

    # a too-small lesion does not count: the second draw has one of the stated size, kept alone
    draws = iter([_map_with_lesions([2.2, 1.0])])
    held, record = gen._hold_requests(_map_with_lesions([1.0]), counts, {}, lambda: next(draws), diameters)
    assert record["draws"] == 2 and record["met"]
    assert record["lesion_diameters"] == {"asked": {"liver_lesion": [3.2, 5.0]},
                                          "out_of_range_removed": {"liver_lesion": 1}, "inserted": {}}
    assert [round(d, 1) for d in lesion_diameters(held)] == [round(lesion_diameters(_map_with_lesions([2.2]))[0], 1)]
    # no draw has one: the best draw is cleared of the wrong ones and gets one inserted at the size
    gen.max_draws = 3
    held, record = gen._hold_requests(_map_with_lesions([1.0]), counts, {}, lambda: _map_with_lesions([1.0]),
                                      diameters, seed=5)
    assert record["draws"] == 3 and record["met"] and record["lesion_diameters"]["inserted"] == {"liver_lesion": 1}
    (inserted,) = lesion_diameters(held)
    assert 3.2 <= inserted <= 5.0 and record["lesion_diameters"]["inserted_diameters_mm"] == [round(inserted, 2)]
    assert set(np.unique(held[_map_with_lesions([]) == 1]).tolist()) == {1}  # placed in the liver, not the body
    again, _ = gen._hold_requests(_map_with_lesions([1.0]), counts, {}, lambda: _map_with_lesions([1.0]),
                                  diameters, seed=5)
    np.testing.assert_array_equal(again, held)  # placement follows the seed ...
    other = [gen._hold_requests(_map_with_lesions([1.0]), counts, {}, lambda: _map_with_lesions([1.0]), diameters,
                                seed=s)[0] for s in (6, 7, 8)]
    assert any(not np.array_equal(o, held) for o in other)  # ... and another seed places it elsewhere
    # a host too small for the stated size: nothing inserted, the record says why and that it was not met
    tiny = _map_with_lesions([], liver_radius=1.5)
    held, record = gen._hold_requests(tiny, {"liver_lesion": 1}, {}, lambda: tiny, {"liver_lesion": (8.0, 12.5)})
    assert not record["met"] and "does not fit" in record["lesion_diameters"]["not_inserted"]["liver_lesion"]
    # a stated count over the insertion limit is recorded, not raised after sampling
    held, record = gen._hold_requests(tiny, {"liver_lesion": 150}, {}, lambda: tiny, {"liver_lesion": (0.0, 5.0)})
    assert not record["met"] and "lesion count" in record["lesion_diameters"]["not_inserted"]["liver_lesion"]
    assert np.array_equal(held, tiny)
    # "no lesion" holds zero lesions
    counts, diameters = gen.finding_requests("CT abdomen, no lesion", {})
    held, record = gen._hold_requests(_map_with_lesions([2.2]), counts, {}, lambda: _map_with_lesions([2.2]),
                                      diameters)
    assert record["met"] and not (held == 9).any() and "lesion_diameters" not in record


def test_sampling_holds_prompt_findings_only_when_asked(export):
    from medsynth.pipelines.label_generator_source import LabelGenerator

    gen = LabelGenerator.from_pretrained(export)
    seeds = [torch.Generator().manual_seed(s) for s in (0, 1)]
    plain = gen(["CT abdomen, no lesion"] * 2, seeds, guidance_scale=1.0)
    assert all("held" not in v.metadata.extra["mask_source"] for v in plain)
    seeds = [torch.Generator().manual_seed(s) for s in (0, 1)]
    held = gen(["CT abdomen, no lesion"] * 2, seeds, guidance_scale=1.0, hold_findings=True)
    for volume in held:
        info = volume.metadata.extra["mask_source"]["held"]
        assert info["met"] and info["lesion_counts"]["asked"] == {"liver_lesion": 0}
        assert not (volume.array == 9).any()


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
