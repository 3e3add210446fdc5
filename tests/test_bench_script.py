"""scripts/bench.py: the quick run writes every section with the expected keys (not timings).

Also checks the opt-in bf16 autocast of the sampling loop that the benchmark's GPU path uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "bench_cpu.md").is_file()
    return json.loads((out / "bench_cpu.json").read_text())


def test_quick_run_has_every_section_and_key(quick_results: dict) -> None:
    data = quick_results
    assert data["device"] == "cpu" and data["scale"] == "quick"
    for key in ("torch", "torch_threads", "platform", "diffusers", "monai"):
        assert key in data["machine"]
    assert data["memory_method"] and data["timing_method"]
    for section in ("stages", "models", "tokens", "sampling"):
        assert {"command", "seconds", "load_average"} <= set(data[section])

    stages = data["stages"]["rows"]
    assert [r["stage"][0] for r in stages] == ["1", "1", "2", "3"]
    assert all({"median_s", "peak_mb", "params"} <= set(r) for r in stages)

    models = data["models"]
    assert {"ours", "wan", "unet", "within_10_percent"} <= set(models["sizes"])
    names = {(r["model"].split(" (")[0], r["objective"]) for r in models["rows"]}
    assert {("medsynth DiT3D", "rectified_flow"), ("diffusers WanTransformer3DModel", "rectified_flow"),
            ("MONAI DiffusionModelUNet", "rectified_flow"), ("MONAI DiffusionModelUNet", "epsilon")} <= names
    for row in models["rows"]:
        assert {"params", "train_step", "forward", "heldout_loss", "latent_fd", "sample_seconds"} <= set(row)
        assert row["train_step"]["median_s"] > 0
    assert {"train_vs_heldout", "noise_vs_heldout"} <= set(models["latent_fd_reference"])

    tokens = data["tokens"]
    assert {"ours p1", "ours p2", "wan p1", "unet"} <= set(tokens["forward_time_exponent_vs_tokens"])
    assert all("forward" in r or r.get("skipped") for r in tokens["rows"])

    sampling = data["sampling"]
    assert {"denoiser_step", "decode", "per_volume", "end_to_end"} <= set(sampling)
    pipelines = {r["pipeline"].split(":")[0] for r in sampling["per_volume"]}
    assert pipelines == {"ours", "MONAI LDM", "Wan 3D transformer + VQ-GAN"}
    assert {r["steps"] for r in sampling["per_volume"]} == {10, 30, 50, 1000}


def test_bad_section_is_refused_by_name() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--only", "models,speed"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "speed" in proc.stderr


def test_denoise_bf16_autocast_is_close_to_fp32() -> None:
    from medsynth.diffusion import make_scheduler
    from medsynth.errors import ConfigError
    from medsynth.models.dit import DiT3D, DiTConfig
    from medsynth.pipelines.sampling import denoise

    torch.manual_seed(0)
    model = DiT3D(DiTConfig(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=8)).eval()
    for p in model.parameters():  # adaLN-Zero starts as the identity; give the blocks something to do
        p.data.add_(0.02 * torch.randn_like(p))
    shape = (1, 4, 4, 4, 4)
    full = denoise(model, make_scheduler("rectified_flow"), shape, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(1))
    half = denoise(model, make_scheduler("rectified_flow"), shape, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(1), autocast_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)  # autocast really ran in bf16
    assert (half - full).abs().mean() < 0.05 * full.abs().mean()
    with pytest.raises(ConfigError, match="autocast_dtype"):
        denoise(model, make_scheduler("rectified_flow"), shape, num_inference_steps=1, autocast_dtype=torch.int8)


def _rendered_label_generator_record(name: str) -> tuple[dict, str]:
    """A committed label generator bench record (docs/benchmarks/NAME) and the page its bench renders."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_label_generator as bench
    finally:
        sys.path.pop(0)
    record = json.loads((REPO / "docs" / "benchmarks" / name).read_text())
    return record, bench.render_markdown(record)


def test_label_generator_bench_page_renders_from_its_record():
    """The committed label generator record renders: the calibrated/uncalibrated columns, the
    calibration ratios, the lesion loss weight, and lesion counts of the model alone and held."""
    record, page = _rendered_label_generator_record("label_generator_cpu.json")
    assert "uncalibrated: median mL" in page and "Volume calibration" in page
    assert "DiT loss weight in lesion voxels: 20x in liver_lesion" in page
    assert "the model alone" in page and "count held" in page
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| ")}
    for name, verdict in record["few_step"]["within_tolerance"].items():
        assert rows[name].split("|")[6].strip() == ("yes" if verdict else "no")


def test_label_generator_lesion_sizes_record_renders():
    """The rerun with per-lesion sizes renders its lesion size table, one row per set of maps, and
    each count request's lesion size."""
    record, page = _rendered_label_generator_record("label_generator_cpu_lesion_sizes.json")
    assert "## Lesion sizes" in page
    sizes = record["few_step"]["comparison"]["lesion_sizes"]["liver_lesion"]
    row = next(line for line in page.splitlines() if line.startswith("| liver_lesion | few-step |"))
    assert f"| {sizes['generated_lesions']} | {sizes['generated_median_ml']} | {sizes['size_ratio']} |" in row
    assert "lesion median" in page and "x training)" in page
