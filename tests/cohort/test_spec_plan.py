"""Cohort spec validation (errors name the key) and planning (exact shares, stated rounding rule)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from medsynth.cohort.plan import allocate, build_plan
from medsynth.cohort.run import shard
from medsynth.cohort.spec import load_spec, parse_spec
from medsynth.cohort.statistics import RealCase, RealStatistics
from medsynth.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LABELS = {"background": 0, "body": 1, "liver": 3, "spleen": 4, "liver_lesion": 9}
RECORD = {"labels": LABELS, "modality": "CT", "components": {"controlnet": {}, "bank": {}},
          "defaults": {"size": [16, 16, 16], "spacing": [2.0, 2.0, 2.0], "metadata": {"region": "abdomen"}}}


def base(**over) -> dict:
    raw = {"total": 10, "classes": {"liver_lesion": {"share": 0.3, "count": [1, 3],
                                                     "size_bins": [{"range_mm": [5, 10], "share": 2 / 3},
                                                                   {"range_mm": [10, 20], "share": 1 / 3}]},
                                    "healthy": {"share": 0.7}},
           "demographics": {"sex": "real", "age": "real"}}
    raw.update(over)
    return raw


def stats(with_lesions: bool = True) -> RealStatistics:
    cases = []
    for i in range(8):
        lesions = {"liver_lesion": [8.0, 12.0][: 1 + i // 4]} if with_lesions and i % 4 == 0 else {}
        cases.append(RealCase(f"r{i}", f"CT abdomen, {'liver lesion' if lesions else 'no lesion'}, "
                                       f"{'female' if i % 2 else 'male'}, {40 + i}", [2.0, 2.0, 2.0], lesions,
                              {"liver": 60.0}, "female" if i % 2 else "male", 40.0 + i, "abdomen"))
    return RealStatistics("real", "/real", LABELS, cases)


def test_example_config_parses():
    spec = load_spec(REPO / "configs" / "cohort" / "example.yaml")
    assert spec.total == 300 and set(spec.classes) == {"liver_lesion", "healthy"} and spec.spacing == "real"
    assert spec.pipeline is not None and spec.pipeline.is_absolute()


@pytest.mark.parametrize("change, key", [
    ({"total": 0}, "total: 0 is outside"),
    ({"totl": 3}, "unknown key 'totl' (did you mean 'total'?)"),
    ({"classes": {"liver_lesion": {"share": 1.5, "size_bins": "real"}}}, "classes.liver_lesion.share"),
    ({"classes": {"liver_lesion": {"shar": 1.0}}}, "classes.liver_lesion.shar: unknown key 'shar' (did you mean"),
    ({"classes": {"healthy": 0.7, "liver_lesion": {"share": 0.5, "size_bins": "real"}}}, "classes: shares sum to 1.2"),
    ({"classes": {"liver_lesion": {"share": 1.0, "size_bins": [{"range_mm": [9, 3]}]}}},
     "classes.liver_lesion.size_bins[0].range_mm"),
    ({"classes": {"liver_lesion": {"share": 1.0, "count": [3, 1], "size_bins": "real"}}}, "classes.liver_lesion.count"),
    ({"classes": {"healthy": {"share": 1.0, "count": 2}}}, "classes.healthy.count"),
    ({"demographics": {"sex": {"female": 0.7, "male": 0.7}}}, "demographics.sex: shares sum to 1.4"),
    ({"masks": {"source": "magic"}}, "masks.source: 'magic' is not valid"),
    ({"spacing": "fine"}, "spacing: expects"),
    ({"prompt_template": "{modality} {colour}"}, "prompt_template: unknown field 'colour'"),
])
def test_spec_errors_name_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        parse_spec(base(**change))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_load_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(classes={"liver_lesion": {"share": -1, "size_bins": "real"}})))
    with pytest.raises(ConfigError, match=r"bad.yaml: classes.liver_lesion.share: -1 is outside the valid range"):
        load_spec(bad)


def test_allocate_largest_remainder():
    assert allocate(7, [0.5, 0.3, 0.2]) == [4, 2, 1]  # 3.5, 2.1, 1.4 -> floors 3, 2, 1; one left: largest .5
    assert allocate(3, [1 / 3] * 3) == [1, 1, 1]
    assert allocate(2, [1 / 3] * 3) == [1, 1, 0]  # ties go to the first listed
    for n in (1, 7, 10, 101):
        counts = allocate(n, [0.15, 0.35, 0.5])
        assert sum(counts) == n and all(abs(c - n * s) < 1 for c, s in zip(counts, [0.15, 0.35, 0.5]))


def test_plan_hits_shares_exactly():
    plan = build_plan(parse_spec(base()), stats(), RECORD, "hash")
    cases = plan["cases"]
    assert len(cases) == 10 and plan["counts"] == {"liver_lesion": 3, "healthy": 7}
    assert Counter(c["class"] for c in cases) == {"liver_lesion": 3, "healthy": 7}
    lesion = [c for c in cases if c["class"] == "liver_lesion"]
    assert Counter(c["size_bin"] for c in lesion) == {"5-10mm": 2, "10-20mm": 1}
    assert sorted(int(c["lesions"][0].split(":")[1]) for c in lesion) == [1, 2, 3]  # [1, 3] spread evenly
    assert all(c["lesions"][0].endswith(":liver") for c in lesion)
    assert all(not c["lesions"] for c in cases if c["class"] == "healthy")
    assert Counter(c["metadata"]["sex"] for c in cases) == {"female": 5, "male": 5}  # real: 4 + 4
    assert [c["seed"] for c in cases] == list(range(10)) and len({c["case_id"] for c in cases}) == 10
    assert {c["metadata"]["region"] for c in cases} == {"abdomen"}
    assert all(c["prompt"] for c in cases) and "largest remainder" in plan["rounding"]
    assert build_plan(parse_spec(base()), stats(), RECORD, "hash") == plan  # deterministic


def test_plan_matches_real_counts_and_sizes():
    raw = base(classes={"liver_lesion": {"share": 0.5, "count": "real", "size_bins": "real"}, "healthy": 0.5},
               spacing="real")
    plan = build_plan(parse_spec(raw), stats(), RECORD)
    lesion = [c for c in plan["cases"] if c["class"] == "liver_lesion"]
    assert Counter(int(c["lesions"][0].split(":")[1]) for c in lesion) == {1: 3, 2: 2}  # real: one 1, one 2
    assert all(c["spacing"] == [2.0, 2.0, 2.0] for c in plan["cases"])


@pytest.mark.parametrize("raw, record, key", [
    (base(classes={"lung_nodule": {"share": 1.0, "size_bins": "real"}}), RECORD, "classes.lung_nodule: 'lung_nodule' "
                                                                                 "is not a label"),
    (base(classes={"liver_lesion": {"share": 0.01, "size_bins": "real"}, "healthy": 0.99}), RECORD,
     "classes.liver_lesion.share: 0.01 of 10 cases rounds to 0"),
    (base(classes={"liver_lesion": {"share": 1.0, "size_bins": [{"range_mm": [90, 100]}]}}), RECORD,
     "classes.liver_lesion.size_bins[0].range_mm: 90-100mm does not fit inside 'liver'"),
    (base(classes={"liver_lesion": {"share": 1.0, "size_bins": [{"range_mm": [1, 3]}]}}), RECORD,
     "below two voxels"),
    (base(classes={"liver_lesion": {"share": 1.0, "host": "brain", "size_bins": "real"}}), RECORD,
     "classes.liver_lesion.host"),
    (base(modality="MR"), RECORD, "modality: the spec asks for MR"),
    (base(demographics={"sex": {"female": 0.5, "other": 0.5}}), RECORD, "demographics.sex.other"),
    (base(), {**RECORD, "components": {}}, "masks.source: 'bank' needs a ControlNet"),
    (base(masks={"source": "generator"}), RECORD, "masks.source: 'generator' needs a label generator"),
])
def test_plan_refuses_what_the_data_cannot_give(raw, record, key):
    with pytest.raises(ConfigError) as err:
        build_plan(parse_spec(raw), stats(), record)
    assert key in str(err.value)


def test_plan_refuses_real_distributions_the_data_lacks():
    no_lesions = stats(with_lesions=False)
    raw = base(classes={"liver_lesion": {"share": 1.0, "count": "real", "size_bins": [{"range_mm": [5, 9]}]}})
    with pytest.raises(ConfigError, match=r"classes.liver_lesion.count: 'real' needs real cases"):
        build_plan(parse_spec(raw), no_lesions, RECORD)
    bare = RealStatistics("real", "/real", LABELS, [RealCase("r0", None, [2.0] * 3)])
    with pytest.raises(ConfigError, match=r"demographics.sex: the real dataset records no 'sex'"):
        build_plan(parse_spec(base()), bare, RECORD)


def test_shards_cover_every_case_once():
    cases = list(range(11))
    for world in (1, 2, 3):
        parts = [shard(cases, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == cases
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(cases, 1, 2) == [1, 3, 5, 7, 9]
    with pytest.raises(ConfigError, match="rank"):
        shard(cases, 2, 2)
