"""read_provenance_file: a dataset's provenance.jsonl by case id."""

from __future__ import annotations

import json
from pathlib import Path

from medsynth.io.provenance import iter_provenance_records, read_provenance_file


def test_reads_records_by_case_id_and_drops_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "provenance.jsonl"
    path.write_text(json.dumps({"case_id": "a", "seed": 1}) + "\n" + "{not json\n" + json.dumps({"seed": 2}) + "\n"
                    + json.dumps({"case_id": "b", "prompt": "CT"}) + "\n" + json.dumps([1, 2]) + "\n")
    records = read_provenance_file(path)
    assert records == {"a": {"case_id": "a", "seed": 1}, "b": {"case_id": "b", "prompt": "CT"}}
    assert read_provenance_file(tmp_path / "absent.jsonl") == {}
    # the leak check scans every record, with or without a case id
    assert [r.get("case_id") for r in iter_provenance_records(path)] == ["a", None, "b"]
    assert list(iter_provenance_records(tmp_path / "absent.jsonl")) == []
