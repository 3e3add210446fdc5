"""DiT training on a small hand-written latent cache: logging per timestep bucket, EMA, export/load."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medsynth.diffusion import make_scheduler
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import save_tensors
from medsynth.pipelines.sampling import Conditions, denoise
from medsynth.training.dit import (DiTModule, LatentCacheDataset, collate_latents, fit_dit, load_dit,
                                   text_encoder_config_for)

PROMPTS = ["CT abdomen portal venous, liver lesion 14 mm, female, 63", "CT abdomen non-contrast, no lesion, male, 70",
           "MR head FLAIR, tumour 26 mm with oedema, female, 43"]
MODEL = {"in_channels": 4, "patch_size": [1, 1, 1], "hidden_size": 32, "depth": 2, "num_heads": 4, "text_dim": 32}
TEXT = {"kind": "vocab", "dim": 32, "depth": 1, "num_heads": 4, "max_length": 24}


def write_cache(root, mr_sequence: str | None = None):
    """A latent cache in the layout of medsynth.pipelines.latent_cache (3 train cases, 1 test case);
    the MR case's metadata names ``mr_sequence`` when given."""
    (root / "latents").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(PROMPTS + ["held out"]):
        modality, region = ("MR", "head") if "MR" in prompt else ("CT", "abdomen")
        meta = {"case_id": f"c{i}", "split": "test" if i == 3 else "train", "prompt": prompt,
                "metadata": {"modality": modality, "region": region, "sex": "female", "age": 40 + i},
                "spacing": [1.0, 1.0, 1.5], "modality": modality}
        if modality == "MR" and mr_sequence:
            meta["metadata"]["sequence"] = mr_sequence
        save_tensors(root / "latents" / f"c{i}.safetensors",
                     {"latent": 2 * torch.randn(4, 5, 4, 6, generator=gen)}, meta)
    (root / "stats.json").write_text(json.dumps({"scale_factor": 0.5}))
    return root


@pytest.fixture()
def cache(tmp_path):
    return write_cache(tmp_path / "cache")


def test_dataset_reads_train_split_scaled_and_crops(cache):
    data = LatentCacheDataset(cache, ("train",), crop=(4, 4, 4))
    assert len(data) == 3
    item = data[0]
    assert item["latent"].shape == (4, 4, 4, 4) and item["metadata"]["spacing"] == [1.0, 1.0, 1.5]
    batch = collate_latents([data[i] for i in range(3)])
    assert batch["latent"].shape == (3, 4, 4, 4, 4) and len(batch["prompt"]) == 3
    with pytest.raises(ConfigError, match="held out"):
        LatentCacheDataset(cache, ("test",))
    with pytest.raises(InputError, match="stats.json"):
        LatentCacheDataset(cache / "latents")


def test_module_logs_buckets_updates_ema_and_exports(cache, tmp_path):
    L.seed_everything(0)
    data = LatentCacheDataset(cache, ("train",), crop=(4, 4, 4))
    module = DiTModule(MODEL, text_encoder_config_for(TEXT, PROMPTS), {"name": "rectified_flow"},
                       {"max_steps": 6, "batch_size": 3, "lr": 1e-3, "ema_decay": 0.9, "loss_buckets": 2},
                       {"num_inference_steps": 3}, {"scale_factor": data.scale_factor})
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
    trainer.fit(module, DataLoader(data, batch_size=3, collate_fn=collate_latents))
    keys = set(trainer.callback_metrics)
    assert "train/loss" in keys and keys & {"train/loss_t000-500", "train/loss_t500-1000"}
    live = dict(module.model.named_parameters())
    assert any(not torch.equal(p, live[n]) for n, p in module.ema.named_parameters())  # EMA lags
    export = module.export(tmp_path / "export")
    model, encoder, record = load_dit(export)
    assert record.config["sampling"] == {"num_inference_steps": 3} and record.metadata["scale_factor"] == 0.5
    x = torch.randn(1, 4, 4, 4, 4)
    meta = model.encode_metadata([{"modality": "CT", "region": "abdomen", "spacing": [1, 1, 1.5]}])
    with torch.no_grad():
        ours = model(x, 500.0, encoder.encode(PROMPTS[:1]), meta)
        theirs = module.ema.eval()(x, 500.0, module.ema_text_encoder.encode(PROMPTS[:1]), meta)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(InputError, match="vqgan"):
        from medsynth.io.checkpoint import read_export
        read_export(export, kind="vqgan")


def test_fit_dit_end_to_end_then_sample(cache, tmp_path):
    config = {"model": MODEL, "text_encoder": TEXT, "objective": {"name": "rectified_flow"},
              "sampling": {"num_inference_steps": 2}, "training": {"batch_size": 2, "crop": [4, 4, 4]}}
    export = fit_dit(cache, tmp_path / "run", config, accelerator="cpu", devices=1, max_steps=3)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    model, encoder, _ = load_dit(export)
    with torch.no_grad():
        text = encoder.encode(["CT abdomen, liver lesion 20 mm", ""])
    meta = model.encode_metadata([{"modality": "CT", "region": "abdomen", "spacing": [1, 1, 1.5]},
                                  {"modality": "MR", "region": "head", "spacing": [1, 1, 1]}])
    z = denoise(model, make_scheduler("rectified_flow"), (2, 4, 4, 6, 4), Conditions(text, meta), 2, 2.0,
                torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 4, 6, 4) and torch.isfinite(z).all()
    bad = json.loads(json.dumps(config))
    bad["model"]["modalities"] = ["MR"]
    with pytest.raises(ConfigError, match=r"case 'c0'.*unknown modality 'CT'"):
        fit_dit(cache, tmp_path / "bad", bad, accelerator="cpu", max_steps=1)
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trainig'\]"):
        fit_dit(cache, tmp_path / "bad", {"trainig": {}}, accelerator="cpu")


def test_the_sequence_field_changes_nothing_without_sequences_and_trains_with_them(cache, tmp_path):
    config = {"model": MODEL, "text_encoder": TEXT, "objective": {"name": "rectified_flow"},
              "sampling": {"num_inference_steps": 2}, "training": {"batch_size": 2, "crop": [4, 4, 4],
                                                                   "metadata_drop_rate": 0.5}}
    with_field = {**config, "model": {**MODEL, "sequences": ["T1", "T2", "FLAIR"]}}
    plain, _, _ = load_dit(fit_dit(cache, tmp_path / "plain", config, accelerator="cpu", max_steps=4))
    same, _, _ = load_dit(fit_dit(cache, tmp_path / "field", with_field, accelerator="cpu", max_steps=4))
    weights = same.state_dict()
    # no case names a sequence: every shared weight ends bit for bit where the plain model's does
    assert set(weights) - set(plain.state_dict()) == {"conditions.metadata.sequence.weight"}
    assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())
    assert torch.all(weights["conditions.metadata.sequence.weight"] == 0)
    named = write_cache(tmp_path / "named", mr_sequence="t2w")  # a dataset spelling of T2
    # adaLN-Zero: no gradient reaches the metadata before the gates open, so a few more steps
    often = {**with_field, "training": {**with_field["training"], "metadata_drop_rate": 0.1}}
    trained, _, _ = load_dit(fit_dit(named, tmp_path / "named_run", often, accelerator="cpu", max_steps=10))
    rows = trained.conditions.metadata.sequence.weight
    assert torch.all(rows[0] == 0) and rows[2].abs().sum() > 0  # "not given" stays zero; T2 learnt
    assert torch.all(rows[[1, 3]] == 0)  # sequences no case has are untouched
    with pytest.raises(ConfigError, match=r"case 'c2'.*unknown MR sequence 'DWI'"):
        fit_dit(write_cache(tmp_path / "dwi", mr_sequence="DWI"), tmp_path / "bad", with_field, accelerator="cpu",
                max_steps=1)


def test_frozen_hf_encoder_path_trains_and_exports_by_reference(cache, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = tmp_path / "bert"
    bert.mkdir()
    words = sorted({w for p in PROMPTS for w in p.lower().replace(",", " ").split()})
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    config = {"model": MODEL, "text_encoder": {"kind": "hf", "name_or_path": str(bert)},
              "training": {"batch_size": 3, "crop": [4, 4, 4]}}
    export = fit_dit(cache, tmp_path / "run", config, accelerator="cpu", devices=1, max_steps=2)
    model, encoder, record = load_dit(export)
    assert record.config["text_encoder"]["kind"] == "hf" and not encoder.trainable
    assert not any(k.startswith("text_encoder.") for k in record.state_dict)  # referenced, not copied


LABELS = {"background": 0, "liver": 1, "liver_lesion": 2}


@pytest.fixture()
def labelled_cache(tmp_path):
    """Latents ``(4, 5, 4, 6)`` whose channel 0 holds a voxel id, with label maps at 2x that carry the same id."""
    root = tmp_path / "labelled"
    (root / "latents").mkdir(parents=True)
    ids = torch.arange(5 * 4 * 6, dtype=torch.float32).reshape(5, 4, 6)
    for i, prompt in enumerate(PROMPTS[:2]):
        latent = torch.randn(4, 5, 4, 6, generator=torch.Generator().manual_seed(i))
        latent[0] = ids
        label = ids.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2).long()
        meta = {"case_id": f"c{i}", "split": "train", "prompt": prompt,
                "metadata": {"modality": "CT", "region": "abdomen"}, "spacing": [1.0, 1.0, 1.0], "modality": "CT"}
        save_tensors(root / "latents" / f"c{i}.safetensors", {"latent": latent, "label": label}, meta)
    (root / "stats.json").write_text(json.dumps({"scale_factor": 1.0, "labels": LABELS}))
    return root


def test_labels_are_cropped_with_their_latents(labelled_cache):
    data = LatentCacheDataset(labelled_cache, ("train",), crop=(3, 6, 4), with_labels=True)
    assert data.label_table == LABELS
    for seed in range(5):
        torch.manual_seed(seed)
        item = data[seed % 2]
        assert item["latent"].shape == (4, 3, 6, 4) and item["label"].shape == (6, 12, 8)
        # y is padded (4 -> 6) with 0 in both; elsewhere the label's id is the latent voxel's id
        torch.testing.assert_close(item["label"][::2, ::2, ::2].float(), item["latent"][0])
        assert torch.equal(item["label"][1::2, 1::2, 1::2], item["label"][::2, ::2, ::2])
    batch = collate_latents([data[0], data[1]])
    assert batch["label"].shape == (2, 6, 12, 8)
    assert "label" not in LatentCacheDataset(labelled_cache, ("train",))[0]


def test_region_weights_raise_the_loss_only_where_the_class_is(cache, labelled_cache, tmp_path):
    training = {"batch_size": 2, "region_classes": ["liver_lesion"], "region_loss_weight": 50.0}
    data = LatentCacheDataset(labelled_cache, ("train",), with_labels=True)
    batch = collate_latents([data[0], data[1]])

    def loss_of(training_cfg: dict, label: torch.Tensor) -> float:
        torch.manual_seed(0)  # the same weights, noise, timesteps and condition dropout for every call
        module = DiTModule(MODEL, text_encoder_config_for(TEXT, PROMPTS), {"name": "rectified_flow"},
                           training_cfg, None, None, labels=LABELS)
        with torch.no_grad():
            return float(module.training_step({**batch, "label": label}, 0))

    no_lesion = torch.ones_like(batch["label"])  # all liver
    one_lesion = no_lesion.clone()
    one_lesion[:, 4, 4, 4] = LABELS["liver_lesion"]
    plain = loss_of({"batch_size": 2}, one_lesion)
    assert loss_of(training, no_lesion) == pytest.approx(plain)
    assert loss_of(training, one_lesion) > plain * 1.1  # one weighted latent voxel of 120 moves the mean
    with pytest.raises(ConfigError, match=r"\['tumour'\], which are not labels; known labels are"):
        DiTModule(MODEL, text_encoder_config_for(TEXT, PROMPTS), None, {"region_classes": ["tumour"],
                                                                        "region_loss_weight": 5.0}, labels=LABELS)
    with pytest.raises(ConfigError, match="needs a label table"):
        DiTModule(MODEL, text_encoder_config_for(TEXT, PROMPTS), None, training)
    with pytest.raises(ConfigError, match="region_loss_weight >= 1"):
        DiTModule(MODEL, text_encoder_config_for(TEXT, PROMPTS), None, {"region_loss_weight": 0.5})
    config = {"model": MODEL, "text_encoder": TEXT, "training": training}
    export = fit_dit(labelled_cache, tmp_path / "run", config, accelerator="cpu", devices=1, max_steps=2)
    _, _, record = load_dit(export)
    assert record.metadata["training"]["region_classes"] == ["liver_lesion"]
    with pytest.raises(InputError, match="has no label map"):  # the unlabelled cache
        fit_dit(cache, tmp_path / "bad", config, accelerator="cpu", max_steps=1)
