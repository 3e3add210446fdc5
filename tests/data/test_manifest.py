"""Dataset folders: nnU-Net v2 write/read round trip, resume, MSD and CSV inputs, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.data.manifest import read_dataset
from medsynth.data.writer import DatasetWriter
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io import Volume, write_volume

LABELS = {"background": 0, "liver": 1, "tumour": 2}
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _pair(seed: int = 0, shape: tuple[int, int, int] = (8, 8, 6)) -> tuple[Volume, Volume]:
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:5, 2:5, 1:4] = 1
    label[3, 3, 2] = 2
    return Volume(image, AFFINE), Volume(label, AFFINE, kind="label")


def _write(root: Path, n_train: int = 3, test: tuple[str, ...] = ("t0",)) -> DatasetWriter:
    writer = DatasetWriter(root, "toy", LABELS, {"0": "CT"})
    for i in range(n_train):
        writer.add_case(f"c{i}", *_pair(i), prompt=f"abdomen ct {i}", metadata={"age": 50 + i})
    for case_id in test:
        writer.add_case(case_id, *_pair(9), prompt="held out", test=True)
    return writer


def test_nnunet_round_trip_keeps_files_prompts_and_held_out_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    dataset = _write(root).finalize({"train": ["c0", "c1"], "val": ["c2"], "test": ["t0"], "seed": 5})
    assert (root / "imagesTr" / "c0_0000.nii.gz").is_file() and (root / "labelsTr" / "c0.nii.gz").is_file()
    assert (root / "imagesTs" / "t0_0000.nii.gz").is_file() and (root / "labelsTs" / "t0.nii.gz").is_file()
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == LABELS and meta["channel_names"] == {"0": "CT"}

    again = read_dataset(root)
    assert again.layout == "nnunetv2" and again.case_ids == dataset.case_ids == ["c0", "c1", "c2", "t0"]
    c1 = again.case("c1")
    assert c1.prompt == "abdomen ct 1" and c1.metadata == {"age": 51} and c1.split == "train"
    assert [c.case_id for c in again.cases_for("test")] == ["t0"]
    assert [c.case_id for c in again.generative_cases()] == ["c0", "c1", "c2"]
    assert json.loads((root / "splits.json").read_text())["seed"] == 5
    with pytest.raises(ConfigError, match="split must be one of"):
        again.cases_for("holdout")


def test_writer_refuses_mismatched_grids_and_undeclared_labels(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "toy", LABELS, {"0": "CT"})
    image, label = _pair()
    shifted = label.with_array(label.array, affine=AFFINE + np.array([[0, 0, 0, 0.5]] + [[0] * 4] * 3))
    with pytest.raises(GeometryError, match="'bad'.*grids differ"):
        writer.add_case("bad", image, shifted)
    with pytest.raises(InputError, match=r"label values \[7, 14\]"):
        writer.add_case("bad", image, label.with_array(label.array * 7))
    with pytest.raises(ConfigError, match="need a label"):
        writer.add_case("bad", image, None)
    writer.add_case("ok", image, label)
    with pytest.raises(ConfigError, match="already written"):
        writer.add_case("ok", image, label)
    with pytest.raises(ConfigError, match="case id"):
        writer.add_case("no/slash", image, label)


def test_interrupted_writer_resumes_and_keeps_earlier_prompts(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write(root, n_train=2, test=())  # "killed" before finalize
    with pytest.raises(InputError, match="incomplete"):
        read_dataset(root)
    writer = DatasetWriter(root, "toy", LABELS, {"0": "CT"})
    assert writer.has_case("c0") and writer.has_case("c1") and not writer.has_case("c2")
    writer.add_case("c2", *_pair(2), prompt="third")
    dataset = writer.finalize()
    assert [c.prompt for c in dataset.cases] == ["abdomen ct 0", "abdomen ct 1", "third"]
    with pytest.raises(ConfigError, match="different settings"):
        DatasetWriter(root, "toy", {"background": 0, "liver": 1}, {"0": "CT"})


def test_has_case_is_false_when_the_image_is_missing(tmp_path: Path) -> None:
    writer = _write(tmp_path / "ds", n_train=1, test=())
    (tmp_path / "ds" / "imagesTr" / "c0_0000.nii.gz").unlink()
    assert not writer.has_case("c0")


def _finalised(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _write(root).finalize()
    return root


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_wrong_num_training_is_refused(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    _edit_json(root / "dataset.json", numTraining=7)
    with pytest.raises(InputError, match="numTraining is 7 but imagesTr/ has 3") as err:
        read_dataset(root)
    assert "dataset.json" in str(err.value)


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    _edit_json(root / "dataset.json", file_ending=None)
    with pytest.raises(InputError, match=r"misses keys \['file_ending'\]"):
        read_dataset(root)


def test_image_without_label_is_refused(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    (root / "labelsTr" / "c1.nii.gz").unlink()
    with pytest.raises(InputError, match=r"without a label.*\['c1'\]"):
        read_dataset(root)


def test_held_out_case_listed_in_train_is_refused(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    _edit_json(root / "splits.json", train=["c0", "c1", "c2", "t0"], test=[])
    with pytest.raises(InputError, match="held-out"):
        read_dataset(root)


def test_prompts_for_unknown_cases_are_refused_with_line_number(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    with (root / "prompts.jsonl").open("a") as handle:
        handle.write(json.dumps({"case_id": "ghost", "prompt": "x", "metadata": {}}) + "\n")
    with pytest.raises(InputError, match="line 5: case 'ghost'"):
        read_dataset(root)


def test_validate_check_labels_finds_undeclared_values(tmp_path: Path) -> None:
    root = _finalised(tmp_path)
    _edit_json(root / "dataset.json", labels={"background": 0, "liver": 1})
    dataset = read_dataset(root)
    dataset.validate()  # the cheap check only looks at files
    with pytest.raises(InputError, match=r"label values \[2\]"):
        dataset.validate(check_labels=True)


def test_msd_folder_is_read(tmp_path: Path) -> None:
    root = tmp_path / "Task03_Liver"
    for i in range(2):
        image, label = _pair(i)
        write_volume(image, root / "imagesTr" / f"liver_{i}.nii.gz")
        write_volume(label, root / "labelsTr" / f"liver_{i}.nii.gz")
    write_volume(_pair(5)[0], root / "imagesTs" / "liver_7.nii.gz")
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS resource fork")
    meta = {"name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": 2, "numTest": 1,
            "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                         for i in range(2)],
            "test": ["./imagesTs/liver_7.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = read_dataset(root)
    assert dataset.layout == "msd" and dataset.labels == {"background": 0, "liver": 1, "cancer": 2}
    assert dataset.case_ids == ["liver_0", "liver_1", "liver_7"]
    assert dataset.case("liver_7").split == "test" and dataset.case("liver_7").label is None
    assert dataset.channel_names == {"0": "CT"} and dataset.file_ending == ".nii.gz"

    meta["training"][1]["label"] = "./labelsTr/liver_9.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"training\[1\].label lists './labelsTr/liver_9.nii.gz'"):
        read_dataset(root)


def test_csv_manifest_with_relative_paths_and_metadata(tmp_path: Path) -> None:
    for i in range(2):
        image, label = _pair(i)
        write_volume(image, tmp_path / "scans" / f"p{i}.nii.gz")
        write_volume(label, tmp_path / "masks" / f"p{i}.nii.gz")
    csv_path = tmp_path / "cohort.csv"
    csv_path.write_text("image,label,prompt,age,sex,modality\n"
                        "scans/p0.nii.gz,masks/p0.nii.gz,liver ct,63,F,CT\n"
                        "scans/p1.nii.gz,,,71.5,M,CT\n")
    dataset = read_dataset(csv_path)
    assert dataset.layout == "csv" and dataset.case_ids == ["p0", "p1"]
    p0, p1 = dataset.cases
    assert p0.label == (tmp_path / "masks" / "p0.nii.gz").resolve() and p0.prompt == "liver ct"
    assert p0.metadata == {"age": 63, "sex": "F", "modality": "CT"} and p1.metadata["age"] == 71.5
    assert p1.label is None and p1.prompt is None and dataset.channel_names == {"0": "CT"}

    csv_path.write_text("image,label\nscans/p0.nii.gz,masks/nope.nii.gz\n")
    with pytest.raises(InputError, match="line 2: label 'masks/nope.nii.gz' does not exist"):
        read_dataset(csv_path)
    csv_path.write_text("scan,label\nscans/p0.nii.gz,masks/p0.nii.gz\n")
    with pytest.raises(InputError, match="needs an 'image' column"):
        read_dataset(csv_path)


def test_unknown_folder_is_refused_with_the_expected_keys(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="channel_names"):
        read_dataset(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_dataset(tmp_path / "absent")
