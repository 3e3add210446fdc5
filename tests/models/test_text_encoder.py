"""Text encoders: a tiny random BERT loaded offline from tmp_path, and the vocabulary encoder."""

from __future__ import annotations

import warnings

import pytest
import torch

from medsynth.errors import ConfigError
from medsynth.models.text_encoder import (HFTextEncoder, TextEmbedding, VocabTextEncoder, build_text_encoder,
                                          build_vocabulary, tokenize_prompt)

PROMPTS = ["CT abdomen portal venous, liver lesion 14 mm, female, 63",
           "MR head FLAIR, tumour 26 mm with oedema, female, 43"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT + WordPiece tokenizer saved to a temp folder (nothing downloads)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({t for p in PROMPTS for t in tokenize_prompt(p)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def test_hf_encoder_loads_offline_and_shapes(tiny_bert):
    enc = HFTextEncoder(tiny_bert, max_length=32)
    assert enc.dim == 32 and not enc.trainable
    assert all(not p.requires_grad for p in enc.parameters())
    out = enc.encode(PROMPTS)
    b, t, d = out.tokens.shape
    assert (b, d) == (2, 32) and t >= 10
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, t) and out.mask.all(dim=1).any()
    assert out.pooled.shape == (2, 32) and torch.isfinite(out.pooled).all()
    enc.train()
    assert not enc.model.training  # frozen encoders stay in eval mode
    torch.testing.assert_close(enc.encode(PROMPTS).pooled, out.pooled)


def test_hf_encoder_truncates_long_prompts_with_warning(tiny_bert):
    enc = HFTextEncoder(tiny_bert, max_length=8)
    with pytest.warns(UserWarning, match="truncated to 8 tokens"):
        out = enc.encode(PROMPTS)
    assert out.tokens.shape[1] == 8


def test_hf_encoder_empty_prompt_is_blank(tiny_bert):
    out = HFTextEncoder(tiny_bert).encode(["", PROMPTS[0]])
    assert not out.mask[0].any() and out.mask[1].any()
    assert torch.equal(out.pooled[0], torch.zeros(32)) and torch.equal(out.tokens[0], torch.zeros_like(out.tokens[0]))


def test_hf_encoder_missing_model_says_local_only(tmp_path):
    with pytest.raises(ConfigError, match="local_files_only=True"):
        HFTextEncoder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="never downloads"):
        HFTextEncoder("medsynth-test/no-such-model-xyz")


def test_build_hf_from_config(tiny_bert):
    enc = build_text_encoder({"kind": "hf", "name_or_path": str(tiny_bert), "pooling": "cls"})
    assert isinstance(enc, HFTextEncoder) and enc.config()["pooling"] == "cls"


def test_vocabulary_and_tokenizer():
    assert tokenize_prompt("CT abdomen, 63") == ["ct", "abdomen", ",", "6", "3"]
    vocab = build_vocabulary(PROMPTS)
    assert vocab[:2] == ["[PAD]", "[UNK]"] and "abdomen" in vocab and "9" in vocab  # all digits, always
    assert vocab.index("female") < vocab.index("abdomen")  # more frequent words first


def test_vocab_encoder_shapes_unknown_words_and_truncation():
    torch.manual_seed(0)
    enc = VocabTextEncoder.from_prompts(PROMPTS, dim=32, depth=1, num_heads=4, max_length=12)
    assert enc.trainable
    ids, mask = enc.token_ids(["CT pancreas 7"])
    assert ids[0].tolist() == [enc.index["ct"], 1, enc.index["7"]]  # unseen word -> [UNK]
    with pytest.warns(UserWarning, match="truncated to 12 tokens"):
        out = enc.encode(PROMPTS + [""])
    assert out.tokens.shape == (3, 12, 32) and out.pooled.shape == (3, 32)
    assert not out.mask[2].any() and torch.equal(out.pooled[2], torch.zeros(32))
    assert torch.isfinite(out.tokens).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["CT abdomen"])  # short prompts warn about nothing


def test_vocab_encoder_is_trainable_and_rebuildable():
    torch.manual_seed(0)
    enc = VocabTextEncoder.from_prompts(PROMPTS, dim=32, depth=1, num_heads=4)
    enc.encode(PROMPTS).pooled.sum().backward()
    assert enc.token_embedding.weight.grad is not None
    copy = build_text_encoder(enc.config())
    copy.load_state_dict(enc.state_dict())
    torch.testing.assert_close(copy.encode(PROMPTS).tokens, enc.encode(PROMPTS).tokens)


def test_text_encoder_errors():
    with pytest.raises(ConfigError, match="unknown text encoder kind 'clip'"):
        build_text_encoder({"kind": "clip"})
    with pytest.raises(ConfigError, match="vocabulary or the training prompts"):
        build_text_encoder({"kind": "vocab"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dims'\]"):
        build_text_encoder({"kind": "vocab", "dims": 3})
    enc = VocabTextEncoder.from_prompts(PROMPTS, dim=32, depth=0, num_heads=4)
    with pytest.raises(ConfigError, match="list of prompts"):
        enc.encode("CT abdomen")


def test_text_embedding_cat_pads():
    a = TextEmbedding(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4))
    b = TextEmbedding(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4))
    c = TextEmbedding.cat([a, b])
    assert c.tokens.shape == (3, 3, 4) and c.mask[0].tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="shapes disagree"):
        TextEmbedding(torch.ones(1, 2, 4), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4))
