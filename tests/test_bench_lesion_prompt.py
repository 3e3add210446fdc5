"""scripts/bench_lesion_prompt.py: the quick run trains the judge and both models, samples both prompts, writes JSON + md + figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_judges_both_prompts_and_reports_the_judge_on_real_cases(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick", "--out",
                           str(tmp_path), "--dit-region-weight", "20", "--guidance", "3", "1", "--via-masks",
                           "--label-guidance", "1", "2", "--negative", "--refiner-steps", "3",
                           "--hold-findings"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the DiT trained with loss weight 20 inside the lesions: its cache carried the label maps
    result = json.loads((tmp_path / "lesion_prompt_cpu_dw20_neg_masks_held_refiner.json").read_text())
    assert result["settings"]["dit_region_weight"] == 20
    rows = result["rows"]
    assert set(rows) == {"lesion_prompt", "no_lesion_prompt"}
    assert "liver lesion" in rows["lesion_prompt"]["prompt"] and "no lesion" in rows["no_lesion_prompt"]["prompt"]
    for row in rows.values():
        assert row["samples"] == 2 == len(row["lesion_voxels"])
        assert row["with_lesion"] == sum(v >= result["settings"]["min_lesion_voxels"] for v in row["lesion_voxels"])
        # the spot rule is not fit when the 4-step judge outlines no liver big enough to search: said, not crashed
        assert row["with_spot"] == sum(row["spot_found"]) == 0 and row["spot_scores"] == [None, None]
    judge = result["judge_on_real_held_out"]
    # the held-out real phantoms are split by whether they truly carry a lesion (rate 0.5, 30-45 mm)
    assert judge["with_lesion"]["cases"] >= 1 and judge["without_lesion"]["cases"] >= 1
    assert judge["with_lesion"]["cases"] + judge["without_lesion"]["cases"] == result["settings"]["held_out"]
    assert "inside its rim" in result["spot_rule"]["skipped"]
    assert result["lesion_contrast_held_out"]["real"] > 0  # the lesions are darker than the liver
    assert 0 <= result["fisher_p"] <= 1 and 0 <= result["fisher_p_spot"] <= 1
    assert (tmp_path / "figures" / "lesion_prompt_cpu_dw20_neg_masks_held_refiner.png").stat().st_size > 5000
    page = (tmp_path / "lesion_prompt_cpu_dw20_neg_masks_held_refiner.md").read_text()
    assert "| `CT abdomen portal venous, liver lesion" in page and "loss weight 20 inside liver lesions" in page
    assert "Spot rule: not fit (" in page
    # two guidance scales from the same DiT and seeds: the first is the headline, both are tabulated
    sweep = result["guidance_sweep"]
    assert [row["guidance"] for row in sweep] == [3.0, 1.0] and result["settings"]["guidance"] == 3.0
    assert sweep[0]["segmenter"] == [rows["lesion_prompt"]["with_lesion"], rows["no_lesion_prompt"]["with_lesion"]]
    assert all(len(row["spread"]) == 2 and all(v > 0 for v in row["spread"]) for row in sweep)
    assert result["real_spread"]["held_out"] > 0 and result["real_spread"]["cases"] == 2
    assert "| 1 | " in page and "Spread between samples" in page
    # negative prompts: each prompt guided away from the other, at the scales that guide (not at 1)
    negative = result["negative_sweep"]
    assert [row["guidance"] for row in negative] == [3.0]
    assert all(row["samples"] == 2 and 0 <= row["fisher_p_spot"] <= 1 for row in negative)
    assert negative[0]["unsearched"] == [2, 2]  # the 4-step judge outlines no liver: every sample unsearched
    assert all(row["unsearched"] == [2, 2] for row in sweep)
    assert "Negative prompts (`--negative`)" in page and "| 2/2 vs 2/2 |" in page
    assert (tmp_path / "figures" / "lesion_prompt_cpu_dw20_neg_masks_held_refiner_negative.png").stat().st_size > 5000
    assert "lesion_prompt_cpu_dw20_neg_masks_held_refiner_negative.png" in page
    # the mask route: a label generator and a ControlNet trained, each prompt's maps drawn and their images judged
    route = result["mask_route"]
    assert route["settings"]["controlnet_steps"] == 4 == route["settings"]["label_steps"]
    assert result["train_seconds"]["controlnet"] > 0 and result["train_seconds"]["label_generator"] > 0
    assert [row["label_guidance"] for row in route["summary"]] == [1.0, 2.0]
    for key, row in route["rows"].items():
        assert row["samples"] == 2 == len(row["map_lesions"]) == len(row["lesion_voxels"]) == len(row["spot_found"])
        assert row["maps_with_lesion"] == sum(c > 0 for c in row["map_lesions"])
        assert all((c > 0) == (v > 0) for c, v in zip(row["map_lesions"], row["map_lesion_voxels"]))
        assert route["summary"][0]["maps"][0 if key == "lesion_prompt" else 1] == row["maps_with_lesion"]
    assert all(0 <= row[k] <= 1 for row in route["summary"] for k in ("fisher_p_maps", "fisher_p", "fisher_p_spot"))
    # --hold-findings: each map holds its prompt's finding: none for "no lesion", at most the one asked for
    assert route["settings"]["hold_findings"] is True and "holds each prompt's finding" in page
    assert route["rows"]["no_lesion_prompt"]["map_lesions"] == [0, 0]
    assert all(c <= 1 for c in route["rows"]["lesion_prompt"]["map_lesions"])
    for row in route["summary"]:
        assert row["maps_inserted"][1] == 0 and 0 <= row["maps_inserted"][0] <= row["maps"][0]
    assert (tmp_path / "figures" / "lesion_prompt_cpu_dw20_neg_masks_held_refiner_route.png").stat().st_size > 5000
    assert "## The mask route" in page and "| 2 | " in page and "lesion_prompt_cpu_dw20_neg_masks_held_refiner_route.png" in page
    # the refiner: trained 3 steps (--quick caps at 4), the same images judged again after it, per guidance
    assert route["settings"]["refiner_steps"] == 3 and result["train_seconds"]["refiner"] > 0
    assert set(route["rows_refined"]) == set(route["rows"])
    for key, row in route["rows_refined"].items():  # the same maps, judged in the refined images
        assert row["map_lesions"] == route["rows"][key]["map_lesions"] and len(row["lesion_voxels"]) == 2
    for row in route["summary"]:
        assert row["refined"]["maps"] == row["maps"] and row["refined"]["label_guidance"] == row["label_guidance"]
        assert len(row["map_lesion_contrast"]) == 2 == len(row["refined"]["map_lesion_contrast"])
    assert "| 1 refined | " in page and "| 2 refined | " in page and "mask refiner (`configs/refiner/tiny.yaml`, 3 steps" in page


def test_mask_route_row_counts_map_lesions_as_connected_regions() -> None:
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_lesion_prompt import mask_route_row, mask_route_summary

    one, two, none = (np.zeros((8, 8, 8), np.int64) for _ in range(3))
    one[1:3, 1:3, 1:3] = 9
    two[1:3, 1:3, 1:3] = 9
    two[5:7, 5:7, 5:7] = 9
    two[3, 3, 3] = 9  # touches the first region at a corner: the same lesion (26-connectivity)
    spots = [{"detected": True, "score": 1.0}, {"detected": False, "score": 0.1}, {"detected": False, "score": 0.0}]
    row = mask_route_row("p", [one, two, none], [(5, spots[0]), (2, spots[1]), (0, spots[2])], lesion=9, min_voxels=3)
    assert row["map_lesions"] == [1, 2, 0] and row["maps_with_lesion"] == 2
    assert row["map_lesion_voxels"] == [8, 17, 0]
    assert row["with_lesion"] == 1 and row["with_spot"] == 1 and row["spot_scores"] == [1.0, 0.1, 0.0]
    empty = mask_route_row("q", [none, none, none], [(0, spots[2])] * 3, lesion=9, min_voxels=3)
    summary = mask_route_summary(4.0, {"lesion_prompt": row, "no_lesion_prompt": empty})
    assert summary["maps"] == [2, 0] and summary["segmenter"] == [1, 0] and summary["spot"] == [1, 0]
    assert summary["fisher_p_maps"] == 0.4  # 2/3 vs 0/3
    assert summary["map_lesion_contrast"] == [None, None]  # rows that carry no contrast: none reported
    summary = mask_route_summary(1.0, {"lesion_prompt": {**row, "map_lesion_contrast": 0.05},
                                       "no_lesion_prompt": {**empty, "map_lesion_contrast": None}})
    assert summary["map_lesion_contrast"] == [0.05, None]


def test_map_lesion_contrast_and_a_fresh_refiner_leave_the_images_as_they_are() -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_lesion_prompt import map_lesion_contrast, refine_images

    from medsynth.models.mask_refiner import MaskRefiner3D, MaskRefinerConfig

    label = np.zeros((8, 8, 8), np.int64)
    label[2:6, 2:6, 2:6] = 1  # liver
    label[3:5, 3:5, 3:5] = 9  # lesion inside it
    image = np.where(label == 9, -0.2, np.where(label == 1, 0.3, -1.0)).astype(np.float32)
    # only maps that hold a lesion count: the lesion-free map's image would otherwise add 0
    assert map_lesion_contrast([image, image], [label, np.where(label == 9, 1, label)], 1, 9) == 0.5
    assert map_lesion_contrast([image], [np.where(label == 9, 1, label)], 1, 9) is None
    refiner = MaskRefiner3D(MaskRefinerConfig(num_classes=10, channels=4, num_groups=2)).eval()
    assert np.array_equal(refine_images(refiner, [image], [label])[0], image)  # zero-initialised output: identity
    with torch.no_grad():
        refiner.conv_out.bias.fill_(5.0)  # a correction far above the model range: clamped into it
    assert np.array_equal(refine_images(refiner, [image], [label])[0], np.ones_like(image))


def test_random_crops_for_larger_grids_cover_the_volume_and_refuse_odd_sizes(tmp_path) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_modality import RandomCrops

    volume = np.arange(64 ** 3, dtype=np.float32).reshape(64, 64, 64)
    crops = RandomCrops([volume], 32, seed=0)
    seen = [crops[0]["image"] for _ in range(20)]
    assert all(c.shape == (1, 32, 32, 32) for c in seen)
    corners = {float(c[0, 0, 0, 0]) for c in seen}
    assert len(corners) > 10  # a new crop at each draw
    for c in seen:  # each crop is a contiguous block of the volume
        x, y, z = np.unravel_index(int(c[0, 0, 0, 0]), volume.shape)
        assert np.array_equal(c[0].numpy(), volume[x:x + 32, y:y + 32, z:z + 32])
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick", "--size", "48",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "multiple of 32" in proc.stderr and not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick",
                           "--dit-region-weight", "0.5", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--dit-region-weight must be >= 1" in proc.stderr and not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick",
                           "--guidance", "3", "0.5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--guidance must be >= 1" in proc.stderr and not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick",
                           "--refiner-steps", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--refiner-steps needs --via-masks" in proc.stderr and not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lesion_prompt.py"), "--quick",
                           "--hold-findings", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--hold-findings steers the label generator" in proc.stderr
    assert not any(tmp_path.iterdir())
