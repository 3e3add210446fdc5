"""Memorisation audit: do synthetic volumes copy training patients?

For each synthetic volume, the distance to its nearest *training* volume in the volume
embedding; the same for held-out real volumes (which the generator never saw) calibrates what
"close" means for genuinely new patients. Reported (docs/EVALUATION.md section 5):

* the ratio median(synthetic NN distance) / median(held-out NN distance) (< 1: closer than new
  patients are);
* the fraction of synthetic volumes closer than the 1st / 5th percentile of held-out distances
  (likely copies) and which training cases they are close to;
* for those flagged pairs, the voxel Pearson correlation on the common evaluation grid
  (``>= 0.95`` marks a confirmed copy) and, for paired data, the Dice of the synthetic mask with
  the training mask;
* the closest pairs (for the report's gallery).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist

from medsynth.errors import ConfigError

COPY_CORRELATION = 0.95
MIN_TRAIN, MIN_HELD_OUT = 1, 2
RELIABLE_HELD_OUT = 20


def nearest_neighbours(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance ``(Q,)`` and index ``(Q,)`` of each query row's nearest reference row."""
    dist = cdist(np.asarray(query, np.float64), np.asarray(reference, np.float64))
    index = dist.argmin(axis=1)
    return dist[np.arange(len(query)), index], index


def voxel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two same-shape arrays (0 when either is constant)."""
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (label > 0) of two same-shape label maps."""
    fa, fb = a > 0, b > 0
    total = fa.sum() + fb.sum()
    return 1.0 if total == 0 else float(2.0 * (fa & fb).sum() / total)


def memorisation_audit(train: np.ndarray, train_ids: Sequence[str], synthetic: np.ndarray,
                       synthetic_ids: Sequence[str], held_out: np.ndarray | None = None,
                       held_out_ids: Sequence[str] = (), *,
                       train_volumes: Sequence[np.ndarray] | None = None,
                       synthetic_volumes: Sequence[np.ndarray] | None = None,
                       train_masks: Sequence[np.ndarray] | None = None,
                       synthetic_masks: Sequence[np.ndarray] | None = None,
                       gallery_size: int = 4) -> dict[str, Any]:
    """Run the audit on ``(N, D)`` volume embeddings.

    Args:
        train, synthetic, held_out: embeddings of training, synthetic and held-out real volumes.
        *_ids: their case ids.
        train_volumes, synthetic_volumes: volumes on one common grid for voxel correlation.
        train_masks, synthetic_masks: label maps on that grid for mask-to-mask Dice.
        gallery_size: number of closest pairs listed for the gallery.

    Raises:
        ConfigError: no training volumes or no synthetic volumes.
    """
    if len(train) < MIN_TRAIN or len(synthetic) < 1:
        raise ConfigError(f"the memorisation audit needs >= {MIN_TRAIN} training and >= 1 synthetic volumes, "
                          f"got {len(train)} and {len(synthetic)}")
    syn_dist, syn_index = nearest_neighbours(synthetic, train)
    out: dict[str, Any] = {
        "embedding_distance": "euclidean",
        "n_train": len(train), "n_synthetic": len(synthetic),
        "synthetic_nn": [{"case_id": synthetic_ids[i], "nearest_train": train_ids[syn_index[i]],
                          "distance": float(syn_dist[i])} for i in range(len(synthetic))],
        "synthetic_median_distance": float(np.median(syn_dist)),
    }
    calibrated = held_out is not None and len(held_out) >= MIN_HELD_OUT
    if calibrated:
        held_dist, held_index = nearest_neighbours(held_out, train)
        p1, p5 = (float(v) for v in np.percentile(held_dist, [1, 5]))
        out.update({
            "n_held_out": len(held_out),
            "held_out_nn": [{"case_id": held_out_ids[i], "nearest_train": train_ids[held_index[i]],
                             "distance": float(held_dist[i])} for i in range(len(held_out))],
            "held_out_median_distance": float(np.median(held_dist)),
            "ratio_of_medians": float(np.median(syn_dist) / max(np.median(held_dist), 1e-12)),
            "held_out_p1": p1, "held_out_p5": p5,
            "fraction_below_p1": float((syn_dist < p1).mean()),
            "fraction_below_p5": float((syn_dist < p5).mean()),
        })
        flagged = np.flatnonzero(syn_dist < p5)
    else:
        out["note"] = (f"no calibration: needs >= {MIN_HELD_OUT} held-out real volumes (the real 'test' split), "
                       f"got {0 if held_out is None else len(held_out)}; only raw distances are reported")
        flagged = np.flatnonzero(syn_dist <= 1e-9 * max(1.0, float(np.median(syn_dist))))
    order = np.argsort(syn_dist)
    wanted = sorted(set(flagged.tolist()) | set(order[:gallery_size].tolist()), key=lambda i: syn_dist[i])
    pairs = []
    for i in wanted:
        j = int(syn_index[i])
        pair: dict[str, Any] = {"synthetic": synthetic_ids[i], "train": train_ids[j], "distance": float(syn_dist[i]),
                                "flagged": bool(i in flagged)}
        if train_volumes is not None and synthetic_volumes is not None:
            pair["voxel_correlation"] = voxel_correlation(synthetic_volumes[i], train_volumes[j])
            pair["confirmed_copy"] = pair["voxel_correlation"] >= COPY_CORRELATION
        if train_masks is not None and synthetic_masks is not None:
            pair["mask_dice"] = mask_dice(synthetic_masks[i], train_masks[j])
        pairs.append(pair)
    out["flagged"] = [p for p in pairs if p["flagged"]]
    out["closest_pairs"] = pairs[:max(gallery_size, 0)] if gallery_size else []
    out["flagged_train_cases"] = sorted({p["train"] for p in out["flagged"]})
    out["confirmed_copies"] = [p for p in out["flagged"] if p.get("confirmed_copy")]
    if calibrated and len(held_out) < RELIABLE_HELD_OUT:
        out["note"] = (f"calibration from only {len(held_out)} held-out volumes: the 1st/5th percentiles are close "
                       f"to the minimum, so flags are crude; trust 'confirmed_copies' (voxel correlation >= "
                       f"{COPY_CORRELATION}) and use >= {RELIABLE_HELD_OUT} held-out volumes")
    return out
