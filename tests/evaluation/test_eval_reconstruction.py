"""``medsynth evaluate --autoencoder``: reconstruction metrics on the real held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data.manifest import read_dataset
from medsynth.data.phantom_dataset import write_phantom_dataset
from medsynth.evaluation.evaluate import EvaluationConfig, _reconstruction
from medsynth.io.checkpoint import save_autoencoder
from medsynth.models.autoencoder_config import VQGANConfig
from medsynth.models.vqgan import VQGAN

TINY = {"channels": [8, 16], "latent_channels": 4, "num_embeddings": 16, "patch_size": [16, 16, 16]}


def test_autoencoder_metrics_on_the_held_out_split(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = write_phantom_dataset(tmp_path / "real", modality="ct", num=4, size=16, seed=0, progress=False)
    ae = save_autoencoder(tmp_path / "ae", VQGAN(VQGANConfig.from_dict(TINY)).eval(), {"modality": "CT"})
    dataset = read_dataset(data.root)
    config = EvaluationConfig(real=data.root, synthetic=data.root, out=tmp_path / "out")
    assert "skipped" in _reconstruction(config, dataset)
    config.autoencoder = ae
    result = _reconstruction(config, dataset)
    assert result["split"] == "test"
    assert result["num_cases"] == len(dataset.cases_for("test"))
    assert {c["case_id"] for c in result["cases"]} == {c.case_id for c in dataset.cases_for("test")}
    overall = result["overall"]
    assert np.isfinite(overall["psnr"]) and 0 < overall["ssim"] <= 1 and overall["mae"] > 0
    assert result["unit"] == "HU"


def test_missing_autoencoder_is_a_clear_error(tmp_path: Path) -> None:
    from medsynth.errors import MedsynthError

    data = write_phantom_dataset(tmp_path / "real", modality="ct", num=3, size=16, seed=0, progress=False)
    config = EvaluationConfig(real=data.root, synthetic=data.root, out=tmp_path / "out",
                              autoencoder=tmp_path / "nope")
    with pytest.raises(MedsynthError):
        _reconstruction(config, read_dataset(data.root))
