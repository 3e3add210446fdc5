"""scripts/bench_modality.py: the quick run trains both models, samples every condition, writes JSON + md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_scores_every_condition_against_both_modalities(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_modality.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "modality_cpu.json").read_text())
    conditions = {(r["condition"], r["asked"]) for r in result["rows"]}
    assert {("text+meta", "CT"), ("text+meta", "MR"), ("text only", "CT"), ("meta only", "MR")} <= conditions
    assert len(result["rows"]) == 8
    for row in result["rows"]:
        assert row["w1_to_real_ct"] > 0 and row["w1_to_real_mr"] > 0
        assert 0 <= row["closer_to_ct"] <= row["samples"] == 2
        if row["asked"] != "?":
            expected = row["closer_to_ct"] if row["asked"] == "CT" else row["samples"] - row["closer_to_ct"]
            assert row["right_profile"] == expected
    # real CT and real MR phantoms differ far more than two volumes of one modality do
    assert result["real_ct_vs_real_mr_w1"] > 2 * max(result["real_floor_w1"].values())
    assert "| text only | CT |" in (tmp_path / "modality_cpu.md").read_text()
