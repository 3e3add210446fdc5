"""scripts/bench_conditioning.py on a quick demo: text, mask fidelity (with the autoencoder ceiling), lesion detection, figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_bench_conditioning_on_a_quick_demo_reports_every_ceiling(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "medsynth", "demo", "--quick", "--out", str(demo), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conditioning.py"), "--demo", str(demo),
                           "--out", str(out), "--num", "1", "--steps", "2", "--judge-steps", "3",
                           "--mask-guidance", "1", "4", "--held-out-masks", "2", "--lesion-masks", "2",
                           "--judge-dir", str(tmp_path / "judge"), "--refiner-baseline"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "conditioning_ct.json").read_text())
    fidelity = record["mask_fidelity"]
    assert fidelity["synthetic"] and fidelity["real_ceiling"]
    # the autoencoder ceiling scores the same held-out classes as the real ceiling
    assert set(fidelity["autoencoder_ceiling"]) == set(fidelity["real_ceiling"])
    for row in fidelity["autoencoder_ceiling"].values():
        assert 0.0 <= row["min"] <= row["mean"] <= 1.0 and row["n"] >= 1
    assert record["text"]["lesion_prompt"]["num"] == 1 == record["text"]["no_lesion_prompt"]["num"]
    assert record["segmenter"]["steps"] == 3
    sweep = record["mask_guidance_sweep"]
    assert set(sweep) == {"1", "4"}
    assert all(set(row) <= set(fidelity["real_ceiling"]) | set(fidelity["synthetic"]) for row in sweep.values())
    assert all(0.0 <= v <= 1.0 for row in sweep.values() for v in row.values())
    page = (out / "conditioning_ct.md").read_text()
    assert "after the autoencoder" in page and "| mask guidance |" in page
    assert (out / "figures" / "conditioning_ct.png").stat().st_size > 5000
    # held-out masks: paired real and synthetic Dice over the same classes, at each mask guidance scale
    held = record["held_out_masks"]
    # the demo's pipeline refines mask-conditioned images; --refiner-baseline scores them without it too
    assert record["refiner"] and held["cases"] == 2
    assert set(held["synthetic"]) == {"1", "4", "1 unrefined", "4 unrefined"}
    assert set(held["autoencoder_refined"]) == set(held["autoencoder"])
    assert "with the mask refiner" in page and "without the refiner" in page and "and the mask refiner" in page
    assert all(set(row) <= set(held["real"]) and all(0.0 <= v <= 1.0 for v in row.values())
               for row in held["synthetic"].values())
    assert "held-out masks (paired)" in page
    # case by case: one row per (case, class) at the first scale, each within the means it feeds
    assert held["analysed_scale"] == "1" and set(held["autoencoder"]) == set(held["real"])
    rows = held["rows"]
    assert {row["case_id"] for row in rows} and all(row["voxels"] > 0 for row in rows)
    for name in held["real"]:
        mine = [row for row in rows if row["class"] == name]
        assert abs(sum(row["synthetic"] for row in mine) / len(mine) - held["synthetic"]["1"][name]) < 1e-3
        assert abs(sum(row["real"] for row in mine) / len(mine) - held["real"][name]) < 1e-3
        low, high = held["ci95"]["synthetic"][name]
        assert low - 1e-3 <= held["synthetic"]["1"][name] <= high + 1e-3
        assert sum(group["cases"] for group in held["by_size"][name]) == len(mine)
    assert "By organ size" in page and (out / "figures" / "held_out_masks_ct.png").stat().st_size > 5000
    # organ intensities: real and every generated variant, each organ of the real images with a spread
    assert set(held["intensity"]) == {"real", "1", "4", "1 unrefined", "4 unrefined"}
    assert set(held["intensity"]["real"]) == set(held["real"])
    assert all(row["std"] > 0 for row in held["intensity"]["real"].values())
    assert "Inside each organ" in page
    # lesions by size: the quick demo's training split holds real lesions (seed 0), so it is measured,
    # on both images of each pair
    lesions = record["lesion_contrast"]
    assert "paired, contrast rule" in page and "skipped" not in lesions, lesions.get("skipped")
    rows = lesions["rows"]
    assert len(rows["with_lesion"]) == len(rows["without_lesion"]) == lesions["masks"] - lesions["skipped_masks"] >= 1
    for with_it, without_it in zip(rows["with_lesion"], rows["without_lesion"]):
        assert with_it["diameter_mm"] == without_it["diameter_mm"]  # the same region in both images
    assert list(lesions["rules"]) == ["all"] and lesions["rules"]["all"]["sign"] in (1.0, -1.0)  # CT: one rule
    added = lesions["added_contrast"]
    assert set(added) == set(lesions["synthetic_with_lesion"])
    assert sum(v["lesions"] for v in added.values()) == len(rows["with_lesion"])
    assert all(row["group"] == "all" for row in rows["with_lesion"] + rows["without_lesion"])
    assert lesions["added_contrast_by_group"] == {"all": added}  # one rule: the group table is the whole table
    assert "contrast added by the lesion" in page
    # the same lesions without the refiner: same masks, seeds and regions
    unrefined = record["lesion_contrast_unrefined"]
    assert len(unrefined["rows"]["with_lesion"]) == len(rows["with_lesion"])
    assert [r["diameter_mm"] for r in unrefined["rows"]["with_lesion"]] == [r["diameter_mm"] for r in rows["with_lesion"]]
    assert "without the mask refiner" in page

    # the gate's segmenter by budget and recipe, on the same demo's held-out cases
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gate_segmenter.py"), "--demo", str(demo),
                           "--steps", "2", "3", "--recipes", "constant:none", "poly:standard", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gate = json.loads((out / "gate_segmenter_ct.json").read_text())
    assert [(r["steps"], r["lr_schedule"], r["augmentation"]) for r in gate["rows"]] == [
        (2, "constant", "none"), (2, "poly", "standard"), (3, "constant", "none"), (3, "poly", "standard")]
    assert all(set(r["dice"]) <= set(fidelity["real_ceiling"]) and all(0 <= v <= 1 for v in r["dice"].values())
               for r in gate["rows"])
    assert gate["held_out_cases"] == fidelity["real_cases"]
    assert "| 3 | poly | standard |" in (out / "gate_segmenter_ct.md").read_text()

    # a second pipeline folder scored by the same judge: it is loaded, not trained again
    again = tmp_path / "bench2"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conditioning.py"), "--demo", str(demo),
                           "--pipeline", str(demo / "pipeline"), "--out", str(again), "--num", "1", "--steps", "2",
                           "--judge-steps", "3", "--judge-dir", str(tmp_path / "judge")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((again / "conditioning_ct.json").read_text())
    assert second["segmenter"]["loaded_from"] == str(tmp_path / "judge")
    # the same judge on the same real images gives the same ceiling
    assert second["mask_fidelity"]["real_ceiling"] == fidelity["real_ceiling"]

    # a kept judge trained for another budget is refused, not silently reused
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conditioning.py"), "--demo", str(demo),
                           "--out", str(tmp_path / "bench3"), "--num", "1", "--steps", "2",
                           "--judge-steps", "4", "--judge-dir", str(tmp_path / "judge")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "give another folder" in proc.stderr
    assert not (tmp_path / "bench3" / "conditioning_ct.json").exists()
    # so is one trained without the fresh phantoms asked for now
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conditioning.py"), "--demo", str(demo),
                           "--out", str(tmp_path / "bench3"), "--num", "1", "--steps", "2", "--judge-steps", "3",
                           "--judge-phantoms", "3", "--judge-dir", str(tmp_path / "judge")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "'fresh_phantoms': 3" in proc.stderr

    # a judge trained on 3 fresh real phantoms besides the training split
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conditioning.py"), "--demo", str(demo),
                           "--out", str(tmp_path / "bench4"), "--num", "1", "--steps", "2", "--judge-steps", "3",
                           "--judge-phantoms", "3", "--judge-window", "-160", "240", "--judge-dir",
                           str(tmp_path / "judge_window")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads((tmp_path / "bench4" / "conditioning_ct.json").read_text())["segmenter"]
    # ... reading CT in its own soft-tissue window: the kept judge maps HU through it, not the pipeline's range
    assert fresh["window_hu"] == [-160.0, 240.0]
    from medsynth.training.segmentation import load_agreement_segmenter

    windowed = load_agreement_segmenter(tmp_path / "judge_window").intensity
    assert (windowed.low, windowed.high) == (-160.0, 240.0)
    assert windowed.forward(np.array([40.0, 500.0])).tolist() == [0.0, 1.0]  # 40 HU mid-window, clipped above
    from medsynth.data.manifest import read_dataset

    assert fresh["training_cases"] == len(read_dataset(demo / "prepared").splits["train"]) + 3
    assert fresh["trained_on"] == "real train split + 3 fresh real phantoms"
    assert "real training split + 3 fresh real phantoms" in (tmp_path / "bench4" / "conditioning_ct.md").read_text()


def test_real_mr_cases_reach_the_judge_as_the_models_saw_them(tmp_path: Path) -> None:
    """MR phantoms differ in scale from case to case and are normalised per case for training;
    the judge's predict maps with the pipeline's one fixed window. The real reader must hand it
    each case's own normalisation, or the real-image ceiling measures a distribution shift."""
    from types import SimpleNamespace

    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import real_reader

    from medsynth.data.patches import load_case
    from medsynth.data.phantom_dataset import write_phantom_dataset
    from medsynth.data.transforms import IntensityMapping
    from medsynth.io import read_volume

    dataset = write_phantom_dataset(tmp_path / "mr", modality="mr", num=3, size=16, progress=False)
    fixed = IntensityMapping(kind="mr_percentiles", low=0.0, high=900.0)  # what a pipeline records
    read = real_reader(dataset, SimpleNamespace(intensity=fixed))
    for case in dataset.cases:
        _, trained_on, own, _ = load_case(dataset, case, with_label=False)
        seen = fixed.forward(read(case))
        np.testing.assert_allclose(seen, trained_on, atol=1e-4)
        raw = fixed.forward(read_volume(case.image).array)  # the file read as it is: another image
        assert own.high != fixed.high and np.abs(raw - trained_on).max() > 0.05


def test_finding_prompt_swaps_only_the_finding() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import finding_prompt

    assert finding_prompt("CT abdomen portal venous, no lesion, female, 60", "ct", 34.6) == \
        "CT abdomen portal venous, liver lesion 35 mm, female, 60"
    assert finding_prompt("MR head T1, tumour 22 mm with oedema, male, 41", "mr", None) == \
        "MR head T1, no tumour, male, 41"
    assert finding_prompt(None, "ct", 30.0) is None


def test_mr_tumours_are_judged_by_one_contrast_rule_per_sequence(tmp_path: Path) -> None:
    """A tumour core is darker than white matter on T1 and brighter on T2/FLAIR: one rule for all
    sequences would learn no sign. Each sequence gets its own rule, and each rule's sign follows
    its own real tumours."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import contrast_group, fit_contrast_rules

    from medsynth.data.phantom_dataset import write_phantom_dataset
    from medsynth.data.transforms import IntensityMapping

    dataset = write_phantom_dataset(tmp_path / "mr", modality="mr", num=12, size=32, lesion_rate=1.0,
                                    lesion_size_mm=(20.0, 30.0), progress=False)
    pipe = SimpleNamespace(intensity=IntensityMapping(kind="mr_percentiles", low=0.0, high=900.0),
                           labels={k: int(v) for k, v in dataset.labels.items()})
    train = [c for c in dataset.cases if c.case_id in set(dataset.splits["train"])]
    sequences = {contrast_group(c, "mr") for c in train}
    rules = fit_contrast_rules(dataset, pipe, "mr", [22.0], seed=0)
    assert set(rules) == sequences and len(rules) >= 2
    signs = {group: rule.sign for group, rule in rules.items()}
    # phantom T1: the core (0.45) is darker than white matter; T2 and FLAIR: brighter
    assert all(sign == (1.0 if group == "T1" else -1.0) for group, sign in signs.items()), signs
    assert "T1" in signs and len(set(signs.values())) == 2
    assert contrast_group(train[0], "ct") == "all"


def test_size_groups_split_each_class_by_organ_voxels() -> None:
    """Equal-count groups in voxel order, the group means over exactly the rows in each."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import size_groups

    rows = [{"case_id": f"c{i}", "class": "spleen", "voxels": v, "real": d, "autoencoder": d - 0.1,
             "synthetic": d - 0.2} for i, (v, d) in enumerate([(300, 0.9), (20, 0.5), (150, 0.8), (40, 0.6),
                                                              (200, 0.85), (90, 0.7), (10, 0.3)])]
    rows.append({"case_id": "c0", "class": "liver", "voxels": 900, "real": 0.95, "autoencoder": 0.9,
                 "synthetic": 0.9})
    groups = size_groups(rows, ["spleen", "liver"], groups=3)
    spleen = groups["spleen"]
    assert [g["voxels"] for g in spleen] == [[10, 40], [90, 150], [200, 300]]
    assert [g["cases"] for g in spleen] == [3, 2, 2]
    assert spleen[0]["real"] == round((0.3 + 0.5 + 0.6) / 3, 3)
    assert spleen[1]["synthetic"] == round((0.5 + 0.6) / 2, 3)
    assert groups["liver"] == [{"voxels": [900, 900], "cases": 1, "real": 0.95, "autoencoder": 0.9, "synthetic": 0.9}]


def test_gate_segmenter_bench_refuses_an_unknown_recipe(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gate_segmenter.py"), "--demo",
                           str(tmp_path), "--recipes", "cosine:none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cosine:none" in proc.stderr and "'poly'" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gate_segmenter.py"), "--demo",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_organ_intensity_reads_the_eroded_organ() -> None:
    """Median and spread inside each large organ, boundary voxels left out (they mix two tissues)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import organ_intensity

    labels = {"background": 0, "liver": 1, "spleen": 2}
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:9, 2:9, 2:9] = 1
    label[10, 10, 10] = 2  # one voxel: erosion leaves nothing, so the whole organ counts
    image = np.where(label == 1, 60.0, -1000.0).astype(np.float32)
    image[2, 2:9, 2:9] = 500.0  # the liver's boundary face: outside the eroded core
    image[5, 5, 5] = 90.0
    image[label == 2] = 45.0
    stats = organ_intensity(image, label, labels, "ct")
    assert set(stats) == {"liver", "spleen"}  # the kidneys are absent from this map
    assert stats["liver"]["median"] == 60.0
    core = np.full(5 ** 3, 60.0)
    core[0] = 90.0
    assert abs(stats["liver"]["std"] - core.std()) < 1e-6  # the 500 HU face is not in it
    assert stats["spleen"] == {"median": 45.0, "std": 0.0}


def test_held_out_cases_leave_out_the_training_split_unless_every_split_is_asked() -> None:
    """The demo's held-out masks are its val + test cases; ``--held-out-data`` takes a dataset no model saw,
    so every labelled case of it counts."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_conditioning import held_out_cases

    case = lambda case_id, label="x.nii.gz": SimpleNamespace(case_id=case_id, label=label)  # noqa: E731
    dataset = SimpleNamespace(cases=[case("a"), case("b"), case("c", None), case("d")],
                              splits={"train": ["a"], "val": ["b"], "test": ["c", "d"]})
    assert [c.case_id for c in held_out_cases(dataset)] == ["b", "d"]  # no training case, no case without a label
    assert [c.case_id for c in held_out_cases(dataset, every_split=True)] == ["a", "b", "d"]
