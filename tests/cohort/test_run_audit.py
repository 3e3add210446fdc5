"""Cohort run (dataset layout, planned lesions, resume after a kill, refusals, disk full) and audit."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsynth.cohort.audit import audit_cohort
from medsynth.cohort.run import CohortRunner, read_statuses, run_cohort
from medsynth.cohort.spec import load_spec
from medsynth.data.manifest import read_dataset
from medsynth.errors import ConfigError
from medsynth.io import read_volume
from tests.cohort.conftest import write_spec
from tests.test_cli import assert_user_error, run_cli

TOUCH = ndimage.generate_binary_structure(3, 3)


def digests(out: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every finished case file (images, labels, status)."""
    files = [*out.glob("imagesTr/*"), *out.glob("labelsTr/*"), *out.glob(".cohort/cases/*")]
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in files}


@pytest.fixture(scope="module")
def finished(cohort_parts, cohort_pipe, tmp_path_factory):
    """``(spec, out)`` of one complete 6-case run."""
    root = tmp_path_factory.mktemp("run")
    spec = load_spec(write_spec(root, cohort_parts))
    result = run_cohort(spec, root / "out", pipeline=cohort_pipe, progress=False)
    assert result["statuses"] == {"done": 6, "flagged": 0, "skipped": 0, "failed": 0, "pending": 0}
    return spec, root / "out"


def test_run_writes_a_dataset_with_the_planned_lesions(finished):
    spec, out = finished
    dataset = read_dataset(out)
    plan = json.loads((out / "plan.json").read_text())
    assert dataset.case_ids == [c["case_id"] for c in plan["cases"]] and dataset.splits["train"] == dataset.case_ids
    assert dataset.description["medsynth"]["labels"] == "conditioning_mask"
    assert dataset.description["medsynth"]["cohort"]["cohort"] == "tiny"
    value = dataset.labels["liver_lesion"]
    for case, planned in zip(dataset.cases, plan["cases"]):
        label = read_volume(case.label, kind="label")
        image = read_volume(case.image)
        assert image.metadata.synthetic and image.shape == label.shape == (16, 16, 16)
        _, n = ndimage.label(label.array == value, structure=TOUCH)
        assert n == (1 if planned["class"] == "liver_lesion" else 0), case.case_id  # real lesions cleared
        assert case.metadata["cohort_class"] == planned["class"] and case.prompt == planned["prompt"]
        assert case.metadata["sex"] == planned["metadata"]["sex"]
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["case_id"] for p in provenance] == dataset.case_ids
    assert all(p["synthetic"] and p["planned_lesions"] == c["lesions"] for p, c in zip(provenance, plan["cases"]))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["status"] for m in manifest] == ["done"] * 6 and manifest[0]["image"].startswith("imagesTr/")


def test_killed_run_resumes_without_rewriting_finished_cases(finished, cohort_parts, cohort_pipe, tmp_path,
                                                           monkeypatch):
    spec = load_spec(write_spec(tmp_path, cohort_parts))
    out = tmp_path / "out"
    original = CohortRunner.run_case
    calls = {"n": 0}

    def dying(self, case):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed in the middle of the 4th case
        return original(self, case)

    monkeypatch.setattr(CohortRunner, "run_case", dying)
    with pytest.raises(KeyboardInterrupt):
        run_cohort(spec, out, pipeline=cohort_pipe, progress=False)
    before = digests(out)
    assert len(read_statuses(out)) == 3 and len(list(out.glob("imagesTr/*"))) == 3
    monkeypatch.setattr(CohortRunner, "run_case", original)
    result = run_cohort(spec, out, pipeline=cohort_pipe, progress=False)
    assert result["counts"] == {"already_finished": 3, "done": 3}
    after = digests(out)
    assert {k: after[k] for k in before} == before  # finished cases untouched (bytes and mtimes)
    # Same volumes as the uninterrupted run: resuming is exact.
    reference = finished[1]
    for image in sorted(out.glob("imagesTr/*")):
        np.testing.assert_array_equal(read_volume(image).array, read_volume(reference / "imagesTr" / image.name).array)
    # A rerun of a finished cohort touches nothing at all.
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run_cohort(spec, out, pipeline=cohort_pipe, progress=False)["counts"] == {"already_finished": 6}
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_output_folder_holding_something_else_is_refused(finished, cohort_parts, cohort_pipe, tmp_path):
    _, out = finished
    other = load_spec(write_spec(tmp_path / "b", cohort_parts, seed=9))
    with pytest.raises(ConfigError, match="holds cohort 'tiny' made from another spec"):
        run_cohort(other, out, pipeline=cohort_pipe, progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no cohort"):
        run_cohort(other, stranger, pipeline=cohort_pipe, progress=False)


def test_audit_reports_shares_and_flags_a_mismatch(finished, tmp_path):
    spec, out = finished
    report = audit_cohort(spec, out, progress=False)
    rows = report["shares"]["classes"]
    assert rows["liver_lesion"]["produced"] == 3 and rows["liver_lesion"]["produced_share"] == 0.5
    assert not rows["healthy"]["mismatch"] and report["lesions"]["classes"]["liver_lesion"]["count_match"] == 3
    assert report["lesions"]["healthy_with_lesions"] == []
    assert report["memorisation"]["n_train"] == 2 and report["memorisation"]["n_synthetic"] == 6
    for name in ("report.json", "report.md", "shares.png"):
        assert (out / "audit" / name).is_file()
    # Lose two lesion cases: the produced shares drift from the spec and the audit says so.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    lesion_ids = [c["case_id"] for c in json.loads((copy / "plan.json").read_text())["cases"]
                  if c["class"] == "liver_lesion"][:2]
    for case_id in lesion_ids:
        (copy / ".cohort" / "cases" / f"{case_id}.json").unlink()
    bad = audit_cohort(spec, copy, memorisation=False, progress=False)
    assert not bad["ok"] and bad["shares"]["classes"]["liver_lesion"]["mismatch"]
    assert bad["statuses"]["pending"] == 2 and any("liver_lesion: produced share 0.250" in m for m in bad["mismatches"])
    assert "MISMATCH" in (copy / "audit" / "report.md").read_text()


def test_cli_plan_run_audit_and_one_line_errors(cohort_parts, tmp_path, capsys, monkeypatch):
    spec_path = write_spec(tmp_path, cohort_parts)
    out = tmp_path / "cli_out"
    code, stdout, err = run_cli(capsys, "cohort", "plan", "--spec", str(spec_path), "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "liver_lesion: 3 of 6 cases" in stdout and (out / "plan.json").is_file()

    # Disk full after two cases: one-line error, exit 2, the finished cases stay; a rerun completes.
    import medsynth.data.writer as writer_module

    real_write, calls = writer_module.write_volume, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # label + image per case: the third case's label
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_volume", full_disk)
    run = ["cohort", "run", "--spec", str(spec_path), "--out", str(out), "--no-progress", "--accelerator", "cpu",
           "--no-verify"]
    code, _, err = run_cli(capsys, *run)
    assert_user_error(code, err, "disk full", "2 finished case(s) are kept", "rerun")
    assert len(list(out.glob("imagesTr/*"))) == 2 and not list(out.rglob(".*.nii.gz"))  # no temp files left
    monkeypatch.setattr(writer_module, "write_volume", real_write)
    code, stdout, err = run_cli(capsys, *run)
    assert code == 0, err
    assert "6 done" in stdout
    code, stdout, err = run_cli(capsys, "cohort", "audit", "--spec", str(spec_path), "--out", str(out),
                                "--no-progress", "--no-memorisation")
    assert code == 0, err
    assert "OK" in stdout

    bad = write_spec(tmp_path / "bad", cohort_parts, classes={"lung_nodule": {"share": 1.0, "size_bins": "real"}})
    code, _, err = run_cli(capsys, "cohort", "plan", "--spec", str(bad), "--out", str(tmp_path / "o1"))
    assert_user_error(code, err, "classes.lung_nodule", "not a label")
    assert not (tmp_path / "o1").exists()
    code, _, err = run_cli(capsys, "cohort", "run", "--spec", str(bad), "--out", str(tmp_path / "o2"))
    assert_user_error(code, err, "classes.lung_nodule")
    assert not (tmp_path / "o2").exists()
    other = write_spec(tmp_path / "other", cohort_parts, total=4)
    code, _, err = run_cli(capsys, "cohort", "run", "--spec", str(other), "--out", str(out), "--accelerator", "cpu")
    assert_user_error(code, err, "holds cohort 'tiny'")
    code, _, err = run_cli(capsys, "cohort", "audit", "--spec", str(other), "--out", str(tmp_path / "o3"))
    assert_user_error(code, err, "no cohort here")
    code, _, err = run_cli(capsys, "cohort", "plan", "--spec", str(tmp_path / "missing.yaml"), "--out", str(out))
    assert_user_error(code, err, "missing.yaml", "does not exist")


def test_quality_gate_failures_are_skipped_and_audited(cohort_parts, cohort_pipe, tmp_path):
    from tests.pipelines.test_masked_generation import FailCalls

    spec = load_spec(write_spec(tmp_path, cohort_parts, total=2, classes={"healthy": 1.0},
                                quality={"gate": True, "max_retries": 0}))
    out = tmp_path / "out"
    result = run_cohort(spec, out, pipeline=cohort_pipe, progress=False, check=FailCalls(1))
    assert result["statuses"]["skipped"] == 1 and result["statuses"]["done"] == 1
    skipped = [s for s in read_statuses(out).values() if s["status"] == "skipped"]
    assert skipped[0]["reason"] == "failed the quality gate: dice:liver" and len(read_dataset(out).cases) == 1
    report = audit_cohort(spec, out, memorisation=False, progress=False)
    assert report["statuses"]["skipped"] == 1 and report["reasons"] == {skipped[0]["case_id"]: skipped[0]["reason"]}
    assert not report["ok"] and any("not written" in m for m in report["mismatches"])
    # Deterministic failures are final: a rerun does not retry them.
    assert run_cohort(spec, out, pipeline=cohort_pipe, progress=False)["counts"] == {"already_finished": 2}
