"""Label autoencoder (shapes, validation, overfit reconstruction) and the DiT's attribute conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.errors import ConfigError
from medsynth.models.dit import DiT3D, DiTConfig
from medsynth.models.embeddings import encode_attributes
from medsynth.models.label_generator import LabelAutoencoder, LabelAutoencoderConfig, preset

SMALL = {"num_classes": 4, "channels": [4, 8, 8], "latent_channels": 4, "num_groups": 4}
DIT = {"in_channels": 4, "patch_size": [1, 1, 1], "hidden_size": 32, "depth": 1, "num_heads": 4, "text_dim": 16}
META = {"modality": "CT", "region": "abdomen", "spacing": [2.0, 2.0, 2.0]}


# Small 3D convolutions run faster on one thread, and far faster on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _phantom_labels(n: int = 16) -> torch.Tensor:
    """``(1, n, n, n)``: a body ball (1) holding an organ (2) and a small lesion (3)."""
    grid = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2
    r = np.sqrt((grid ** 2).sum(0))
    label = np.zeros((n, n, n), np.int64)
    label[r < n * 0.45] = 1
    label[np.sqrt(((grid - np.array([2, 0, 0])[:, None, None, None]) ** 2).sum(0)) < n * 0.2] = 2
    label[np.sqrt(((grid - np.array([3, 1, 0])[:, None, None, None]) ** 2).sum(0)) < 1.6] = 3
    return torch.from_numpy(label)[None]


def test_shapes_and_factor():
    model = LabelAutoencoder(LabelAutoencoderConfig.from_dict(SMALL))
    onehot = model.one_hot(torch.randint(0, 4, (2, 16, 16, 8)))  # non-cubic
    logits, latent = model(onehot)
    assert onehot.shape == (2, 4, 16, 16, 8) and model.downsample_factor == 4
    assert latent.shape == (2, 4, 4, 4, 2) and logits.shape == (2, 4, 16, 16, 8)
    assert preset("tiny", num_classes=10).downsample_factor == 4


@pytest.mark.parametrize("bad, fragment", [
    ({"num_classes": 1}, "num_classes >= 2"),
    ({"channels": [4, 10]}, "multiple of num_groups"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"chanels": [8]}, "unknown key(s) ['chanels']"),
])
def test_config_validation_names_the_bad_value(bad, fragment):
    with pytest.raises(ConfigError) as err:
        LabelAutoencoderConfig.from_dict({**SMALL, **bad})
    assert fragment in str(err.value)


def test_refuses_unknown_labels_and_bad_grids():
    model = LabelAutoencoder(LabelAutoencoderConfig.from_dict(SMALL))
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        model.one_hot(torch.full((1, 8, 8, 8), 7))
    with pytest.raises(ConfigError, match="not a multiple of the label autoencoder factor 4"):
        model.encode(model.one_hot(torch.zeros((1, 10, 8, 8), dtype=torch.long)))
    with pytest.raises(ConfigError, match="integer labels"):
        model.one_hot(torch.zeros((1, 8, 8, 8)))


def test_decode_labels_only_gives_allowed_values():
    torch.manual_seed(0)
    model = LabelAutoencoder(LabelAutoencoderConfig.from_dict(SMALL)).eval()
    label = model.decode_labels(torch.randn(2, 4, 2, 2, 2) * 3, allowed=[0, 2])
    assert label.shape == (2, 8, 8, 8) and set(label.unique().tolist()) <= {0, 2}


def test_autoencoder_overfits_one_label_map():
    from medsynth.training.label_generator import soft_dice_loss

    torch.manual_seed(0)
    model = LabelAutoencoder(LabelAutoencoderConfig.from_dict(SMALL))
    label = _phantom_labels()
    onehot = model.one_hot(label)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits, _ = model(onehot)
        loss = torch.nn.functional.cross_entropy(logits, label) + soft_dice_loss(logits, onehot)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    recon = model.decode_labels(model.encode(onehot))
    assert float((recon == label).float().mean()) > 0.97
    for value in (1, 2):  # every organ comes back
        inter = float(((recon == value) & (label == value)).sum())
        assert 2 * inter / float((recon == value).sum() + (label == value).sum()) > 0.9


def test_attributes_encode_with_nan_for_missing_and_refuse_unknown_names():
    out = encode_attributes([{"attributes": {"volume:liver": 0.9}}, {}], ("volume:liver", "lesions:x"))
    assert out.shape == (2, 2) and out[0, 0] == pytest.approx(0.9) and torch.isnan(out[0, 1]) and torch.isnan(out[1]).all()
    with pytest.raises(ConfigError, match="unknown attribute 'volume:lung'.*volume:liver"):
        encode_attributes([{"attributes": {"volume:lung": 0.5}}], ("volume:liver",))
    with pytest.raises(ConfigError, match="finite number"):
        encode_attributes([{"attributes": {"volume:liver": float("inf")}}], ("volume:liver",))
    plain = DiT3D(DiTConfig.from_dict(DIT))
    with pytest.raises(ConfigError, match="takes none"):
        plain.encode_metadata([{**META, "attributes": {"volume:liver": 0.5}}])


def test_attributes_steer_the_dit_and_leave_plain_dits_unchanged():
    torch.manual_seed(0)
    dit = DiT3D(DiTConfig.from_dict({**DIT, "attributes": ["volume:liver", "lesions:lesion"]}))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 4, 4, 4, 4)
    t = torch.tensor([500.0])
    small = dit(x, t, None, dit.encode_metadata([{**META, "attributes": {"volume:liver": 0.1}}]))
    large = dit(x, t, None, dit.encode_metadata([{**META, "attributes": {"volume:liver": 0.9}}]))
    unknown = dit(x, t, None, dit.encode_metadata([META]))
    assert not torch.allclose(small, large) and not torch.allclose(small, unknown)
    # Dropping metadata (the unconditional guidance branch) drops the attributes too.
    drop = torch.tensor([True])
    a = dit(x, t, None, dit.encode_metadata([{**META, "attributes": {"volume:liver": 0.1}}]), drop_metadata=drop)
    b = dit(x, t, None, dit.encode_metadata([{**META, "attributes": {"volume:liver": 0.9}}]), drop_metadata=drop)
    assert torch.equal(a, b)
    # Without attributes the state dict is what older exports hold.
    keys = set(DiT3D(DiTConfig.from_dict(DIT)).state_dict())
    assert not any("attributes" in k for k in keys)
    assert DiTConfig.from_dict({k: v for k, v in DIT.items()}).attributes == ()
