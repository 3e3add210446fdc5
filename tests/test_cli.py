"""The command line as a user meets it: outputs, and one-line errors on bad input.

Every bad-input case must give exit code 2, a single ``error: ...`` line on stderr naming the
file and the problem, no traceback, and no output folder left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.data.manifest import read_dataset
from medsynth.io import read_volume
from tests.io.dicom_factory import write_series


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, exactly one non-progress line starting with ``error:``, containing ``fragments``."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "|" not in line]  # drop tqdm bars
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="module")
def ct_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "phantoms"
    assert main(["phantoms", "--modality", "ct", "--num", "6", "--size", "16", "--out", str(out),
                 "--seed", "3", "--lesion-rate", "0.5", "--no-progress"]) == 0
    return out


# --- commands that work ---------------------------------------------------------------------


def test_phantoms_command_writes_a_readable_dataset(ct_phantoms: Path) -> None:
    dataset = read_dataset(ct_phantoms)
    assert len(dataset.cases) == 6
    assert dataset.labels["liver"] > 0 and "liver_lesion" in dataset.labels
    assert set(dataset.splits) >= {"train", "val", "test"}
    assert all(dataset.splits[name] for name in ("train", "val", "test"))
    assert (ct_phantoms / "imagesTs").is_dir()  # the held-out split lives apart
    prompts = [json.loads(line) for line in (ct_phantoms / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 6 and all(p["prompt"].startswith("CT abdomen") for p in prompts)
    for case in dataset.cases:
        image = read_volume(case.image)
        label = read_volume(case.label, kind="label")
        assert image.same_grid(label) and image.metadata.synthetic
        assert image.metadata.intensity_unit == "HU"


def test_phantoms_lesion_size_is_used_and_recorded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "big_lesions"
    code, _, _ = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "4", "--size", "32", "--out", str(out),
                         "--lesion-rate", "1", "--lesion-size", "36", "44", "--no-progress")
    assert code == 0
    dataset = read_dataset(out)
    block = json.loads((out / "dataset.json").read_text())["medsynth"]["phantoms"]
    assert block["lesion_size_mm"] == [36.0, 44.0]
    largest = [max(les["diameter_mm"] for les in c.metadata["lesions"]) for c in dataset.cases]
    assert min(largest) > 30, largest  # the default range (5-30 mm) would give 24 mm at this grid
    # the same folder with other lesion sizes is another dataset: refused, nothing overwritten
    code, _, err = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "4", "--size", "32", "--out", str(out),
                           "--lesion-rate", "1", "--no-progress")
    assert code != 0 and "error" in err.lower()


def test_phantoms_scanner_noise_is_used_and_recorded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "quiet"
    code, _, _ = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "3", "--size", "32", "--out", str(out),
                         "--noise", "scanner", "--no-progress")
    assert code == 0
    assert json.loads((out / "dataset.json").read_text())["medsynth"]["phantoms"]["noise"] == "scanner"
    cases = read_dataset(out).cases
    assert all(c.metadata["noise_model"] == "scanner" and c.metadata["noise_sd"] < 1.0 for c in cases)
    # a rerun asking for the default noise is another dataset: refused
    code, _, err = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "3", "--size", "32", "--out", str(out),
                           "--no-progress")
    assert code != 0 and "error" in err.lower()
    with pytest.raises(SystemExit):  # argparse's usage error, naming the valid choices
        run_cli(capsys, "phantoms", "--modality", "ct", "--num", "3", "--out", str(out), "--noise", "loud")
    assert "'loud'" in capsys.readouterr().err


def test_phantoms_rerun_is_a_no_op(ct_phantoms: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in ct_phantoms.rglob("*") if p.is_file()}
    code, out, _ = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "6", "--size", "16",
                           "--out", str(ct_phantoms), "--seed", "3", "--lesion-rate", "0.5", "--no-progress")
    assert code == 0 and "wrote 6 CT phantoms" in out
    assert {p: p.stat().st_mtime_ns for p in ct_phantoms.rglob("*") if p.is_file()} == mtimes


def test_prepare_command_and_info(ct_phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prepared"
    code, stdout, _ = run_cli(capsys, "prepare", "--input", str(ct_phantoms), "--out", str(out),
                              "--spacing", "20", "20", "20", "--no-progress")
    assert code == 0 and "prepared 6 cases" in stdout
    prepared = read_dataset(out)
    assert prepared.splits["test"] == read_dataset(ct_phantoms).splits["test"]  # fixed splits kept
    image_path = prepared.cases_for("train")[0].image
    code, stdout, _ = run_cli(capsys, "info", str(image_path), "--json")
    summary = json.loads(stdout)
    assert code == 0
    assert summary["orientation"] == "RAS"
    assert summary["spacing_mm"] == pytest.approx([20.0, 20.0, 20.0])
    assert all(s % 8 == 0 for s in summary["shape"])
    assert summary["modality"] == "CT" and summary["intensity_unit"] == "HU"
    label_path = prepared.root / "labelsTr" / f"{prepared.cases_for('train')[0].case_id}.nii.gz"
    code, stdout, _ = run_cli(capsys, "info", str(label_path), "--label")
    assert code == 0 and "labels" in stdout
    code, stdout, _ = run_cli(capsys, "info", str(label_path), "--label", "--json")
    counts = json.loads(stdout)
    label = read_volume(label_path, kind="label")
    values, voxels = np.unique(label.array, return_counts=True)
    assert counts["labels"] == {str(int(v)): int(c) for v, c in zip(values, voxels)}


def test_info_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    affine = np.diag([-0.5, 2.0, 3.0, 1.0])
    path = save_nifti(tmp_path / "scan.nii.gz", np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine)
    code, out, _ = run_cli(capsys, "info", str(path))
    assert code == 0
    assert "2 x 3 x 4 voxels" in out and "0.5 x 2 x 3 mm" in out and "LAS" in out
    assert "0 .. 23" in out


def test_demo_data_stages_and_report(tmp_path: Path) -> None:
    from medsynth.cli.demo import STAGES, DemoSettings, report_sections, run_stages
    from medsynth.evaluation.demo_report import write_demo_report

    settings = DemoSettings(out=tmp_path / "demo", num_cases=6, progress=False)
    state = run_stages(settings, STAGES[:2])
    assert set(state.outputs) == {"phantom dataset", "prepared dataset"}
    assert read_dataset(state.outputs["prepared dataset"]).cases
    report = write_demo_report(settings.out, report_sections(settings, state), {"notes": state.notes})
    page = report.read_text()
    assert "phantoms" in page and "prepared" in page and "<a href='prepared'" in page


def test_demo_phantom_noise_reaches_the_phantoms(tmp_path: Path) -> None:
    from medsynth.cli.demo import STAGES, DemoSettings, run_stages

    settings = DemoSettings(out=tmp_path / "demo", num_cases=3, size=32, progress=False, phantom_noise="scanner")
    state = run_stages(settings, STAGES[:1])
    cases = read_dataset(state.outputs["phantom dataset"]).cases
    assert all(c.metadata["noise_model"] == "scanner" and c.metadata["noise_sd"] < 1.0 for c in cases)


def test_demo_train_scale_multiplies_the_model_budgets_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import medsynth.cli.demo as demo

    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def record(argv: list[str]) -> None:
        seen.append(argv)
        raise Stop

    settings = demo.DemoSettings(out=tmp_path / "demo", train_scale=2.5, progress=False)
    state = demo.DemoState(outputs={"prepared dataset": tmp_path, "latent cache": tmp_path, "DiT": tmp_path})
    monkeypatch.setattr(demo, "run_command", record)
    for stage in (demo.stage_autoencoder, demo.stage_dit):
        with pytest.raises(Stop):
            stage(settings, state)
    monkeypatch.undo()
    budgets = [argv[argv.index("--max-steps") + 1] for argv in seen]
    assert budgets == ["1000", "1000"]  # 400 x 2.5 each
    assert demo._train_steps(demo.DemoSettings(out=tmp_path, quick=True, train_scale=3.0), 400, 30) == "30"
    for bad, needle in ((["--train-scale", "0"], "between 0.1 and 100"),
                        (["--train-scale", "2", "--quick"], "--quick")):
        code, _, err = run_cli(capsys, "demo", "--out", str(tmp_path / "never"), *bad)
        assert_user_error(code, err, needle)
    assert not (tmp_path / "never").exists()


def test_demo_latent_factors_pair_each_autoencoder_with_its_dit(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    import medsynth.cli.demo as demo

    seen: list[list[str]] = []
    monkeypatch.setattr(demo, "run_command", lambda argv: seen.append(argv))
    state = demo.DemoState(outputs={"prepared dataset": tmp_path, "latent cache": tmp_path})
    assert demo.DemoSettings(out=tmp_path).latent_factor == 2  # the measured better default
    for factor in (4, 2):
        settings = demo.DemoSettings(out=tmp_path / f"demo{factor}", progress=False, latent_factor=factor)
        try:
            demo.stage_autoencoder(settings, state)
        except FileNotFoundError:  # no metrics.json: run_command is a recorder here
            pass
        demo.stage_dit(settings, state)
    configs = [Path(argv[argv.index("--config") + 1]) for argv in seen if argv[1] == "fit"]
    assert [c.relative_to(demo.CONFIGS).as_posix() for c in configs] == [
        "autoencoder/tiny.yaml", "dit/tiny.yaml", "autoencoder/tiny_f2.yaml", "dit/tiny_f2.yaml"]
    for ae_path, dit_path in (configs[:2], configs[2:]):
        autoencoder = yaml.safe_load(ae_path.read_text())["model"]
        dit = yaml.safe_load(dit_path.read_text())["model"]
        factor = 2 ** (len(autoencoder["channels"]) - 1)
        assert dit["in_channels"] == autoencoder["latent_channels"]
        # 32^3 -> (32 / factor)^3 latents -> 8^3 = 512 tokens with either pair
        assert 32 // factor // dit["patch_size"][0] == 8 and len(set(dit["patch_size"])) == 1
    with pytest.raises(SystemExit):  # argparse's choices: 3 is refused before anything runs
        main(["demo", "--latent-factor", "3", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_demo_lesion_spec_survives_in_the_label_map() -> None:
    from medsynth.cli.demo import lesion_spec
    from medsynth.pipelines.lesions import LesionSpec

    for modality, size in (("ct", 32), ("ct", 64), ("mr", 32)):
        spec = LesionSpec.parse(lesion_spec(modality, size))
        voxel = 380.0 / size if modality == "ct" else 240.0 / size
        assert spec.min_mm >= 2 * voxel  # lesion insertion refuses < 2 voxels


@pytest.mark.parametrize(("modality", "latent_factor"), [("ct", 2), ("mr", 2), ("ct", 4)])
def test_demo_quick_runs_end_to_end(modality: str, latent_factor: int, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main job, both modalities and both autoencoders, as a smoke run (about a minute each on 2 cores)."""
    code, out, _ = run_cli(capsys, "demo", "--quick", "--modality", modality, "--out", str(tmp_path / "demo"),
                           "--latent-factor", str(latent_factor), "--no-progress")
    assert code == 0
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert {"phantom dataset", "autoencoder", "mask refiner", "label generator", "pipeline", "synthetic dataset",
            "cohort audit", "evaluation report", "segmentation benchmark"} <= set(summary["outputs"])
    assert json.loads((tmp_path / "demo" / "pipeline" / "pipeline.json").read_text())["components"]["refiner"]
    assert set(summary["metrics"]) == {"autoencoder", "segmentation benchmark"}
    assert summary["settings"]["latent_factor"] == latent_factor
    assert {"real", "synthetic"} <= set(summary["metrics"]["segmentation benchmark"])
    cohort = read_dataset(tmp_path / "demo" / "cohort")
    assert len(cohort.cases) == 4 and all(c.label is not None for c in cohort.cases)
    assert read_dataset(tmp_path / "demo" / "synthetic_from_label_generator").cases
    page = (tmp_path / "demo" / "report.html").read_text()
    for stage in ("label generator", "cohort", "segmentation benchmark"):
        assert stage in page
    assert "demo finished" in out


def test_console_script_entry_point() -> None:
    exe = Path(sys.executable).parent / "medsynth"
    if not exe.exists():
        pytest.skip("the medsynth console script is not installed in this environment")
    result = subprocess.run([str(exe), "info", "/no/such/file.nii.gz"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: /no/such/file.nii.gz: does not exist"


@pytest.mark.parametrize("module", ["medsynth", "medsynth.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "info", "/no/such/file.nii.gz"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: /no/such/file.nii.gz: does not exist"


def test_demo_command_lines_can_be_pasted_into_a_shell(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import shlex

    from medsynth.cli.demo import run_command

    out = tmp_path / "with space"
    run_command(["phantoms", "--modality", "ct", "--num", "3", "--size", "16", "--out", str(out), "--no-progress"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("$ medsynth"))
    assert shlex.split(line.strip()[2:])[-2] == str(out)  # the path with a space stays one argument


def stderr_of_fresh_python(script: str) -> str:
    """Run ``script`` in a new interpreter (logging set-up and warning filters are process-wide and
    depend on import order) and return its stderr; it must exit 0."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_lightning_console_handler_shows_warnings_only() -> None:
    """Lightning adds a console handler at INFO when imported; after the CLI's set-up it prints
    warnings, not the device banner (run in a fresh interpreter: import order matters)."""
    script = ("import logging\n"
              "from medsynth.cli import _quiet_library_chatter\n"
              "logging.basicConfig(level=logging.WARNING)\n"
              "_quiet_library_chatter()\n"
              "import lightning.pytorch\n"
              "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('BANNER-LINE')\n"
              "logging.getLogger('lightning.pytorch').warning('A-WARNING')\n")
    stderr = stderr_of_fresh_python(script)
    assert "BANNER-LINE" not in stderr and "A-WARNING" in stderr


def test_known_library_warnings_are_silenced_and_others_kept() -> None:
    """Lightning's notices about checkpoints under manual optimisation (every VQ-GAN fit) and about
    epochs shorter than the logging interval (small datasets) are muted by the CLI's set-up; any
    other warning still reaches the user (fresh interpreter: filters are global)."""
    script = ("import warnings\n"
              "from medsynth.cli import _quiet_library_chatter\n"
              "_quiet_library_chatter()\n"
              "from lightning.pytorch.utilities import rank_zero_warn\n"
              "rank_zero_warn('Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
              "pre-optimization state was saved.')\n"
              "rank_zero_warn('The number of training batches (28) is smaller than the logging interval "
              "Trainer(log_every_n_steps=50).')\n"
              "warnings.warn('SOMETHING-ELSE')\n")
    stderr = stderr_of_fresh_python(script)
    assert "manual optimization" not in stderr and "logging interval" not in stderr
    assert "SOMETHING-ELSE" in stderr


# --- bad input ------------------------------------------------------------------------------


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "info", str(tmp_path / "nope.nii.gz"))
    assert_user_error(code, err, "nope.nii.gz", "does not exist")


def test_corrupt_and_truncated_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all")
    code, _, err = run_cli(capsys, "info", str(garbage))
    assert_user_error(code, err, "garbage.nii.gz")
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run_cli(capsys, "info", str(truncated))
    assert_user_error(code, err, "truncated.nii.gz")


def test_unknown_format(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, _, err = run_cli(capsys, "info", str(path))
    assert_user_error(code, err, "notes.txt", "NIfTI")


def test_2d_and_4d_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    flat = save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    code, _, err = run_cli(capsys, "info", str(flat))
    assert_user_error(code, err, "flat.nii.gz", "3D")
    series = save_nifti(tmp_path / "series4d.nii.gz", np.zeros((4, 4, 4, 3), np.float32))
    code, _, err = run_cli(capsys, "info", str(series))
    assert_user_error(code, err, "series4d.nii.gz", "3D")


def test_nan_voxels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    array = np.zeros((6, 6, 6), np.float32)
    array[1, 2, 3] = np.inf
    path = save_nifti(tmp_path / "nan.nii.gz", array)
    code, _, err = run_cli(capsys, "info", str(path))
    assert_user_error(code, err, "nan.nii.gz", "NaN/Inf")


def test_empty_dicom_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "empty_dicom"
    folder.mkdir()
    code, _, err = run_cli(capsys, "info", str(folder))
    assert_user_error(code, err, "empty_dicom")


def _stored(shape: tuple[int, int, int]) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 300).astype(np.int16)


def test_mixed_series_missing_slices_uneven_spacing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    write_series(mixed / "a", _stored((8, 8, 5)), series_uid="1.2.3.4.1", series_number=1)
    write_series(mixed / "b", _stored((8, 8, 4)), series_uid="1.2.3.4.2", series_number=2)
    code, _, err = run_cli(capsys, "info", str(mixed))
    assert_user_error(code, err, "mixed", "1.2.3.4.1", "1.2.3.4.2")
    code, out, _ = run_cli(capsys, "info", str(mixed), "--series", "2", "--json")
    assert code == 0 and json.loads(out)["shape"] == [8, 8, 4]

    gap = tmp_path / "gap"
    paths = write_series(gap, _stored((8, 8, 6)))
    paths[3].unlink()
    code, _, err = run_cli(capsys, "info", str(gap))
    assert_user_error(code, err, "gap")
    assert "missing" in err.lower() or "gap" in err.lower()

    uneven = tmp_path / "uneven"
    positions = np.array([[0, 0, 2.5 * k + (0.6 if k == 4 else 0.0)] for k in range(7)])
    write_series(uneven, _stored((8, 8, 7)), positions=positions)
    code, _, err = run_cli(capsys, "info", str(uneven))
    assert_user_error(code, err, "uneven")
    assert "spacing" in err.lower()


def test_prepare_refuses_grids_that_differ_and_leaves_nothing(ct_phantoms: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ct_phantoms, broken)
    dataset = read_dataset(broken)
    case = dataset.cases_for("train")[-1]
    label_file = broken / "labelsTr" / f"{case.case_id}.nii.gz"
    label = nib.load(str(label_file))
    shifted = label.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(label_file))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", "--input", str(broken), "--out", str(out), "--no-progress")
    assert_user_error(code, err, case.case_id, "grid")
    assert not out.exists()


def test_dataset_json_that_does_not_match_its_folder(ct_phantoms: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "mismatch"
    shutil.copytree(ct_phantoms, broken)
    meta = json.loads((broken / "dataset.json").read_text())
    meta["numTraining"] += 3
    (broken / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", "--input", str(broken), "--out", str(out), "--no-progress")
    assert_user_error(code, err, "dataset.json", "numTraining")
    assert not out.exists()


def test_bad_arguments_write_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "5", "--size", "8",
                           "--out", str(out))
    assert_user_error(code, err, "8")
    code, _, err = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "5", "--lesion-rate", "1.5",
                           "--out", str(out))
    assert_user_error(code, err, "1.5")
    code, _, err = run_cli(capsys, "phantoms", "--modality", "ct", "--num", "5", "--lesion-size", "40", "20",
                           "--out", str(out))
    assert_user_error(code, err, "MIN <= MAX")
    code, _, err = run_cli(capsys, "prepare", "--input", str(tmp_path / "absent"), "--out", str(out))
    assert_user_error(code, err, "absent")
    code, _, err = run_cli(capsys, "prepare", "--input", str(tmp_path), "--out", str(out),
                           "--label-map", "liver")
    assert_user_error(code, err, "liver", "SRC=DST")
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from medsynth.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", "info", str(tmp_path / "missing.nii.gz")])


def test_lightning_banner_is_muted_but_its_warnings_are_kept() -> None:
    """Lightning logs its device banner at INFO to its own logger *and* the root handler (so it
    printed twice); the CLI drops those info lines, never Lightning's warnings or medsynth's own."""
    import logging

    from medsynth.cli import _drop_lightning_info

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    assert not _drop_lightning_info(record("lightning.pytorch.utilities.rank_zero", logging.INFO))
    assert not _drop_lightning_info(record("lightning.fabric", logging.DEBUG))
    assert _drop_lightning_info(record("lightning.pytorch.trainer", logging.WARNING))
    assert _drop_lightning_info(record("medsynth.pipelines.generate", logging.INFO))
