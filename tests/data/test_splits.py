"""Fixed splits: deterministic, order-independent, non-empty, stratified, held-out checked."""

from __future__ import annotations

import json
import random

import pytest

from medsynth.data.splits import make_splits, read_splits, write_splits
from medsynth.errors import ConfigError, InputError

IDS = [f"case{i:02d}" for i in range(20)]


def test_same_splits_for_any_input_order_and_seed_dependent() -> None:
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    first = make_splits(IDS, seed=3)
    assert make_splits(shuffled, seed=3) == first
    assert make_splits(IDS, seed=4) != first
    assert sorted(sum(first.values(), [])) == IDS  # a partition: each id exactly once


def test_fractions_are_respected() -> None:
    splits = make_splits(IDS, fractions=(0.7, 0.15, 0.15), seed=0)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [14, 3, 3]
    no_test = make_splits(IDS, fractions=(0.8, 0.2, 0.0), seed=0)
    assert no_test["test"] == [] and len(no_test["val"]) == 4


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_every_split_non_empty_with_few_cases(n: int) -> None:
    splits = make_splits(IDS[:n], seed=0)
    assert all(splits[name] for name in ("train", "val", "test")), splits


def test_two_cases_still_split_without_losing_any() -> None:
    splits = make_splits(["a", "b"], seed=0)
    assert sorted(sum(splits.values(), [])) == ["a", "b"] and splits["train"]


def test_stratification_puts_a_rare_class_in_every_split() -> None:
    rare = {"case03", "case11", "case17"}
    strata = {i: i in rare for i in IDS}
    for seed in range(5):
        splits = make_splits(IDS, seed=seed, strata=strata)
        assert [len(rare & set(splits[n])) for n in ("train", "val", "test")] == [1, 1, 1]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_invalid_fractions_are_refused(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        make_splits(IDS, fractions=fractions)


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="case01"):
        make_splits(["case01", "case02", "case01"])


def test_splits_json_round_trip_records_seed_and_held_out(tmp_path) -> None:
    path = tmp_path / "splits.json"
    splits = make_splits(IDS, seed=7)
    write_splits(path, splits, seed=7, fractions=[0.7, 0.15, 0.15])
    record = read_splits(path, IDS)
    assert record["held_out"] == "test" and record["seed"] == 7
    assert {n: record[n] for n in ("train", "val", "test")} == splits


@pytest.mark.parametrize("record, message", [
    ({"train": ["a"], "val": ["a"], "test": []}, "both"),
    ({"train": ["a"], "val": [], "test": ["zzz"]}, "zzz"),
    ({"train": ["a"], "val": []}, "missing"),
    ({"train": ["a"], "val": [], "test": [], "held_out": "val"}, "held_out"),
])
def test_bad_splits_json_is_refused_naming_the_problem(tmp_path, record, message) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=message) as err:
        read_splits(path, ["a", "b"])
    assert "splits.json" in str(err.value)
