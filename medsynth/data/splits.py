"""Fixed train / val / test splits with a held-out real test split.

``splits.json`` is written once per dataset and never re-drawn: every stage (autoencoder, DiT,
ControlNet, label generator) trains on ``train`` (+ ``val`` for model selection), and the
``test`` split is held out from *every* generative stage so that evaluation (FID, privacy /
memorisation checks, the downstream segmentation benchmark) compares against real scans no
model has seen. Format::

    {"train": [...], "val": [...], "test": [...], "seed": 0, "held_out": "test",
     "fractions": [0.7, 0.15, 0.15], "stratify_by": null}
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError, InputError
from medsynth.io.atomic import write_json_atomic

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
HELD_OUT = "test"
"""The split no generative stage may read."""
GENERATIVE_SPLITS: tuple[str, str] = ("train", "val")
SPLITS_FILE = "splits.json"


def make_splits(case_ids: Iterable[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                strata: Mapping[str, Hashable] | None = None) -> dict[str, list[str]]:
    """Deterministic train/val/test assignment of case ids.

    Ids are sorted first, so the result depends only on the *set* of ids, ``fractions`` and
    ``seed`` (not on input order). With ``strata`` (case id -> class, e.g. ``has_lesion``),
    each class is split on its own so that a rare class lands in every split whenever it has at
    least one case per split. Every split with a non-zero fraction gets at least one case when
    there are enough cases overall.

    Args:
        case_ids: unique case ids.
        fractions: ``(train, val, test)`` proportions, non-negative, summing to 1 (a zero
            fraction leaves that split empty, e.g. ``(0.85, 0.15, 0)`` when the test split is
            given by the source).
        seed: shuffling seed; the same seed always gives the same splits.
        strata: optional class of each case id; ids missing from it form their own class.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.

    Raises:
        ConfigError: duplicate ids or invalid fractions.
    """
    ids = [str(c) for c in case_ids]
    duplicates = sorted(c for c, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ConfigError(f"case ids must be unique, got duplicates {duplicates[:10]}")
    weights = _check_fractions(fractions)
    ids.sort()
    groups: dict[str, list[str]] = {}
    for case_id in ids:
        key = "" if strata is None else repr(strata.get(case_id))
        groups.setdefault(key, []).append(case_id)
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for key in sorted(groups):
        members = groups[key]
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
        # and Python versions (unlike hash()).
        random.Random(f"{seed}:{key}").shuffle(members)
        start = 0
        for name, count in zip(SPLIT_NAMES, _allocate(len(members), weights)):
            out[name].extend(members[start:start + count])
            start += count
    _fill_empty_splits(out, weights)
    return {name: sorted(out[name]) for name in SPLIT_NAMES}


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions]
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1) > 1e-6 or values[0] == 0:
        raise ConfigError(f"fractions must be three non-negative numbers (train, val, test) summing to 1 "
                          f"with train > 0, got {list(fractions)}")
    return values


def _allocate(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into counts proportional to ``weights`` (largest remainder), at least one per
    non-zero weight when ``n`` allows it."""
    ideal = [n * w for w in weights]
    counts = [int(x) for x in ideal]
    order = sorted(range(3), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    active = [i for i in range(3) if weights[i] > 0]
    if n >= len(active):
        for i in active:
            if counts[i] == 0:
                donor = max(active, key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _fill_empty_splits(out: dict[str, list[str]], weights: list[float]) -> None:
    # Many tiny strata can each round a split down to zero; move one case from the largest split
    # (deterministically, its last id in shuffled order) so every requested split is non-empty.
    active = [name for name, w in zip(SPLIT_NAMES, weights) if w > 0]
    for name in active:
        if not out[name]:
            donor = max(active, key=lambda s: (len(out[s]), -SPLIT_NAMES.index(s)))
            if len(out[donor]) > 1:
                out[name].append(out[donor].pop())


def splits_record(splits: Mapping[str, Sequence[str]], seed: int | None,
                  **extra: Any) -> dict[str, Any]:
    """The JSON object stored in ``splits.json``: the three lists, the seed, ``held_out``, extras."""
    record: dict[str, Any] = {name: sorted(str(c) for c in splits.get(name, [])) for name in SPLIT_NAMES}
    record.update({"seed": seed, "held_out": HELD_OUT})
    record.update(extra)
    return record


def write_splits(path: str | Path, splits: Mapping[str, Sequence[str]], seed: int | None, **extra: Any) -> None:
    """Write ``splits.json`` atomically (see :func:`splits_record`)."""
    write_json_atomic(path, splits_record(splits, seed, **extra))


def read_splits(path: str | Path, case_ids: Iterable[str] | None = None) -> dict[str, Any]:
    """Read and check ``splits.json``.

    Args:
        path: the file.
        case_ids: when given, every listed id must be one of these.

    Returns:
        The stored record (the three lists, ``seed``, ``held_out`` and any extras).

    Raises:
        InputError: not JSON, missing keys, an id in two splits, an unknown id, or a
            ``held_out`` other than "test".
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read splits: {err}", path) from err
    if not isinstance(record, dict):
        raise InputError(f"splits.json must hold an object, got {type(record).__name__}", path)
    missing = [key for key in SPLIT_NAMES if not isinstance(record.get(key), list)]
    if missing:
        raise InputError(f"splits.json needs lists {list(SPLIT_NAMES)} (plus seed, held_out); missing {missing}", path)
    if record.get("held_out", HELD_OUT) != HELD_OUT:
        raise InputError(f"held_out must be {HELD_OUT!r}, got {record.get('held_out')!r}", path)
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for case_id in record[name]:
            if case_id in seen:
                raise InputError(f"case {case_id!r} is in both {seen[case_id]!r} and {name!r}", path)
            seen[case_id] = name
    if case_ids is not None:
        known = set(case_ids)
        unknown = sorted(set(seen) - known)
        if unknown:
            raise InputError(f"lists cases that are not in the dataset: {unknown[:10]}", path)
    record.setdefault("held_out", HELD_OUT)
    return record
