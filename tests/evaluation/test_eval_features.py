"""Extractors: protocol slice indices, preprocessing, architectures + weight loading/refusal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.features import build_extractor
from medsynth.evaluation.networks_2d import RadImageNetResNet50
from medsynth.evaluation.networks_3d import MedicalNetResNet
from medsynth.evaluation.preprocessing import (Protocol, central_slice_indices, normalise_slices,
                                               prepare_volume, slice_stack)
from medsynth.evaluation.weights import parse_weights_spec
from medsynth.io import Volume


def test_central_slice_indices_follow_the_maisi_protocol_exactly() -> None:
    # MAISI: start = int((1 - r) / 2 * n), end = int((1 + r) / 2 * n), end exclusive.
    assert central_slice_indices(512, 0.4) == range(153, 358)
    assert central_slice_indices(100, 0.4) == range(30, 70)
    assert central_slice_indices(32, 0.4) == range(9, 22)
    assert central_slice_indices(3, 0.1) == range(1, 2)  # never empty
    x, y, z = np.meshgrid(np.arange(20), np.arange(30), np.arange(40), indexing="ij")
    array = (x * 10000 + y * 100 + z).astype(np.float32)
    xy, yz, zx = (slice_stack(array, p, 0.4) for p in ("xy", "yz", "zx"))
    assert xy.shape == (16, 20, 30) and np.array_equal(xy[:, 0, 0], np.arange(12, 28))
    assert yz.shape == (8, 30, 40) and np.array_equal(yz[:, 0, 0], np.arange(6, 14) * 10000)
    assert zx.shape == (12, 20, 40) and np.array_equal(zx[:, 0, 0], np.arange(9, 21) * 100)


def test_slice_normalisation_is_stack_minmax_three_channels_minus_means() -> None:
    stack = np.random.default_rng(0).uniform(-1000, 1000, (4, 8, 8))
    out = normalise_slices(stack)
    assert out.shape == (4, 3, 8, 8)
    scaled = out[:, 0] + 0.406
    assert float(scaled.min()) == pytest.approx(0.0, abs=1e-6) and float(scaled.max()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out[:, 0] - out[:, 2], torch.full((4, 8, 8), 0.485 - 0.406))


def test_prepare_volume_resamples_pads_crops_and_clips_ct() -> None:
    array = np.full((10, 12, 6), 3000.0, np.float32)
    volume = Volume(array, np.diag([2.0, 2.0, 4.0, 1.0]))
    out = prepare_volume(volume, "CT", Protocol(spacing=(1.0, 1.0, 1.0), size=(16, 32, 30)))
    assert out.shape == (16, 32, 30)
    assert out.max() == 1000.0 and out.min() == -1000.0  # clipped HU, padded with air
    assert out[8, 16, 15] == 1000.0 and out[8, 0, 15] == -1000.0  # Y (24 mm) padded to 32


def test_random_default_extractors_are_deterministic_and_shaped() -> None:
    prepared = np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32)
    protocol = Protocol(size=(20, 20, 20))
    a = build_extractor("medsynth_random2d").extract(prepared, protocol)
    b = build_extractor("medsynth_random2d").extract(prepared, protocol)
    assert set(a) == {"xy", "yz", "zx"} and a["xy"].shape == (8, 240)
    assert all(np.array_equal(a[p], b[p]) for p in a)
    v = build_extractor("medsynth_random3d").extract(prepared, protocol)["volume"]
    assert v.shape == (1, 240) and np.isfinite(v).all()


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(v.shape, generator=generator) if v.is_floating_point() else v)
            for k, v in model.state_dict().items()}


def test_medicalnet_release_layout_loads_and_reproduces_outputs(tmp_path: Path) -> None:
    source = MedicalNetResNet(10).eval()
    state = _randomised(source, 0)
    source.load_state_dict(state)
    # The release is a DataParallel checkpoint with a segmentation head, under "state_dict".
    release = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    release["state_dict"]["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save(release, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    extractor = build_extractor("medicalnet_resnet10", parse_weights_spec(f"medicalnet_resnet10={path}:{sha}"))
    assert extractor.weights is not None and extractor.weights.verified and extractor.weights.sha256 == sha
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(extractor.network(x), source(x))
    feats = extractor.extract(np.random.default_rng(0).normal(size=(16, 16, 16)), Protocol(size=(16, 16, 16)))
    assert feats["volume"].shape == (1, 512)
    # Unpinned and unknown to medsynth: refused, and the error gives the hash to check and pin.
    with pytest.raises(InputError, match=f"refusing unverified weights.*sha256 is {sha}"):
        build_extractor("medicalnet_resnet10", parse_weights_spec(f"medicalnet_resnet10={path}"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_missing_or_mismatched_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(MedicalNetResNet(10).state_dict(), path)
    with pytest.raises(InputError, match="wrong weight file.*does not match the sha256 you pinned"):
        build_extractor("medicalnet_resnet10", parse_weights_spec(f"medicalnet_resnet10={path}:{'0' * 64}"))
    with pytest.raises(InputError, match=r"do not fit the medicalnet_resnet50 architecture: \d+ missing keys"):
        build_extractor("medicalnet_resnet50", parse_weights_spec(f"medicalnet_resnet50={path}:{_sha(path)}"))
    with pytest.raises(InputError, match="not found.*never downloads"):
        build_extractor("medicalnet_resnet10", parse_weights_spec(f"medicalnet_resnet10={tmp_path / 'nope.pth'}"))
    with pytest.raises(ConfigError, match="needs local weights"):
        build_extractor("radimagenet_resnet50")
    with pytest.raises(ConfigError, match="unknown feature extractor 'inception'"):
        parse_weights_spec("inception=/x.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "opt": Path("x")}, pickled)
    model_path = tmp_path / "model.pth"
    torch.save(MedicalNetResNet(10), model_path)  # a whole pickled module, not a state_dict
    with pytest.raises(InputError, match="weights_only=True"):
        build_extractor("medicalnet_resnet10", parse_weights_spec(f"medicalnet_resnet10={model_path}:{_sha(model_path)}"))


def test_radimagenet_keras_layout_loads(tmp_path: Path) -> None:
    source = RadImageNetResNet50().eval()
    state = _randomised(source, 1)
    assert "layer2.0.downsample.0.bias" in state and source.layer2[0].conv1.stride == (2, 2)
    source.load_state_dict(state)
    path = tmp_path / "RadImageNet-ResNet50_notop.pth"
    torch.save(state, path)
    extractor = build_extractor("radimagenet_resnet50", parse_weights_spec(f"radimagenet_resnet50={path}:{_sha(path)}"))
    feats = extractor.extract(np.random.default_rng(2).normal(size=(32, 32, 10)), Protocol(size=(32, 32, 10)))
    assert feats["xy"].shape == (4, 2048) and feats["yz"].shape == (13, 2048)


def test_cropping_the_grid_before_resampling_equals_cropping_after() -> None:
    """The fast path (resample only the kept voxels) gives the protocol's values exactly."""
    from medsynth.data.phantoms import generate_phantom
    from medsynth.data.transforms import reorient_to_ras, resample_to_grid, target_grid
    from medsynth.evaluation.preprocessing import _pad_crop, centre_crop_grid

    case = generate_phantom("ct", size=24, seed=5)
    ras = reorient_to_ras(case.image)
    full = resample_to_grid(ras, target_grid(ras, (6.0, 6.0, 6.0)))
    for size in ((16, 16, 16), (20, 70, 9)):
        slow = _pad_crop(full.array, size, fill=-1000.0)
        fast_grid = centre_crop_grid(target_grid(ras, (6.0, 6.0, 6.0)), size)
        fast = _pad_crop(resample_to_grid(ras, fast_grid).array, size, fill=-1000.0)
        np.testing.assert_allclose(fast, slow, atol=1e-3)
