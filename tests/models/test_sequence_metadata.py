"""The MR sequence as a metadata field: names normalised, read from prompts, embedded without
changing models (or CT training) that do not use it, and "not given" trained by forgetting."""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion import forget_sequence
from medsynth.errors import ConfigError
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.embeddings import normalise_sequence, sequence_named_in

SEQUENCES = ("T1", "T1C", "T2", "FLAIR")
CT = {"modality": "CT", "region": "abdomen", "spacing": [1.5, 1.5, 2.0], "sex": "female", "age": 63}
MR = {"modality": "MR", "region": "head", "spacing": [1.0, 1.0, 1.0]}


def tiny(**kw) -> DiTConfig:
    return DiTConfig(**{**dict(in_channels=4, patch_size=(2, 2, 2), hidden_size=48, depth=2, num_heads=4,
                               text_dim=32), **kw})


@pytest.mark.parametrize("written, canonical", [("t2w", "T2"), ("T2-FLAIR", "FLAIR"), ("t2_flair", "FLAIR"),
                                                ("t2f", "FLAIR"), ("T1ce", "T1C"), ("t1-Gd", "T1C"), ("T1w", "T1"),
                                                ("t1n", "T1"), ("dwi", "DWI")])
def test_dataset_spellings_are_normalised(written, canonical):
    assert normalise_sequence(written) == canonical


@pytest.mark.parametrize("prompt, named", [("MR head T2, tumour 30 mm with oedema", "T2"),
                                           ("MR head T2-FLAIR, female, 43", "FLAIR"),
                                           ("mr head t2 flair", "FLAIR"),
                                           ("MR head FLAIR", "FLAIR"), ("MR head T1c, tumour", "T1C"),
                                           ("MR head T1 and T2", None),  # two sequences: not given
                                           ("CT abdomen portal venous, liver lesion 14 mm", None),
                                           ("MR head T12 vertebra", None),  # not a word of its own
                                           ("", None), (None, None)])
def test_the_sequence_a_prompt_names(prompt, named):
    assert sequence_named_in(prompt, SEQUENCES) == named
    assert sequence_named_in("MR head T2", ()) is None  # a model without the field reads none


def test_encoding_indexes_refuses_unknown_and_ignores_without_vocabulary():
    model = DiT3D(tiny(sequences=SEQUENCES))
    meta = model.encode_metadata([{**MR, "sequence": "t2w"}, CT, {**MR, "sequence": "FLAIR"}, {**MR, "sequence": ""}])
    assert meta["sequence"].tolist() == [3, 0, 4, 0]  # 0 = not given, i = SEQUENCES[i - 1]
    with pytest.raises(ConfigError, match=r"'DWI'.*\['T1', 'T1C', 'T2', 'FLAIR'\]"):
        model.encode_metadata([{**MR, "sequence": "DWI"}])
    plain = DiT3D(tiny())
    assert plain.encode_metadata([{**MR, "sequence": "DWI"}])["sequence"].tolist() == [0]
    with pytest.raises(ConfigError, match="without repeats"):
        tiny(sequences=("T2", "t2w"))
    assert tiny(sequences=("t2w", "T2-FLAIR")).sequences == ("T2", "FLAIR")
    assert DiTConfig.from_dict(tiny(sequences=SEQUENCES).to_dict()).sequences == SEQUENCES


def test_the_field_leaves_everything_else_as_it_was():
    """Same seed: the same initial weights as a model without the field, and the same prediction
    for a case without a sequence; the sequence then changes the prediction."""
    torch.manual_seed(0)
    plain = DiT3D(tiny())
    torch.manual_seed(0)
    with_field = DiT3D(tiny(sequences=SEQUENCES))
    extra = set(with_field.state_dict()) - set(plain.state_dict())
    assert extra == {"conditions.metadata.sequence.weight"}
    assert all(torch.equal(v, with_field.state_dict()[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():  # the same perturbation of both (zero-initialised gates would hide the conditioning)
        fields = dict(with_field.named_parameters())
        for name, param in plain.named_parameters():
            noise = 0.05 * torch.randn_like(param)
            param.add_(noise)
            fields[name].add_(noise)
        torch.nn.init.normal_(with_field.conditions.metadata.sequence.weight[1:], std=1.0)
    x = torch.randn(2, 4, 4, 4, 4)
    ct = plain(x, 50.0, None, plain.encode_metadata([CT, MR]))
    assert torch.equal(ct, with_field(x, 50.0, None, with_field.encode_metadata([CT, MR])))
    t1 = with_field(x, 50.0, None, with_field.encode_metadata([{**MR, "sequence": "T1"}] * 2))
    t2 = with_field(x, 50.0, None, with_field.encode_metadata([{**MR, "sequence": "T2"}] * 2))
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, ct)


def test_not_given_stays_a_zero_vector_under_training():
    model = DiT3D(tiny(sequences=SEQUENCES))
    meta = model.encode_metadata([CT, {**MR, "sequence": "T2"}])
    model.conditions.metadata(meta).sum().backward()
    grad = model.conditions.metadata.sequence.weight.grad
    assert torch.all(grad[0] == 0) and grad[3].abs().sum() > 0 and torch.all(grad[[1, 2, 4]] == 0)


def test_forgetting_the_sequence():
    model = DiT3D(tiny(sequences=SEQUENCES))
    meta = model.encode_metadata([{**MR, "sequence": "T2"}] * 400)
    kept = forget_sequence(meta, 0.25, torch.Generator().manual_seed(0))["sequence"]
    assert set(kept.tolist()) == {0, 3} and abs((kept == 0).float().mean().item() - 0.25) < 0.07
    assert meta["sequence"].eq(3).all()  # the input is not modified
    assert forget_sequence(meta, 1.0)["sequence"].eq(0).all()
    assert forget_sequence(meta, 0.0)["sequence"].eq(3).all()
    ct = model.encode_metadata([CT] * 4)
    state = torch.random.get_rng_state()
    assert forget_sequence(ct, 0.5) is ct and torch.equal(state, torch.random.get_rng_state())  # CT: nothing drawn
    with pytest.raises(ConfigError, match="metadata_drop_rate"):
        forget_sequence(meta, 1.5)
