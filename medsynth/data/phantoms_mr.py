"""MR head phantom: scalp, skull, CSF, grey and white matter, ventricles, tumours with oedema.

Like the CT phantom, the anatomy is painted as a tissue map finer than the labels (scalp fat and
scalp soft tissue, skull cortex and diploe, deep grey nuclei, tumour necrosis) and rendered with
one of three MR contrasts (T1, T2, FLAIR), a smooth multiplicative bias field and Rician noise.
RAS: +x patient Right, +y Anterior, +z Superior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medsynth.data.phantom_shapes import (Blob, Grid, SmoothField, equivalent_diameter,
                                          gaussian_texture, place_ball, rotation, tube_mask)

MR_LABELS: dict[str, int] = {
    "background": 0,
    "scalp": 1,  # all extracranial soft tissue: scalp, face, neck
    "skull": 2,
    "csf": 3,  # subarachnoid CSF, sulci, interhemispheric fissure
    "grey_matter": 4,  # cortex, deep grey nuclei, cerebellar cortex
    "white_matter": 5,  # cerebral and cerebellar white matter, brainstem
    "ventricles": 6,
    "tumour_oedema": 7,
    "tumour_core": 8,  # enhancing/solid tumour and its necrotic centre
}

MR_FOV_MM: tuple[float, float, float] = (240.0, 240.0, 240.0)
MR_SEQUENCES: tuple[str, ...] = ("T1", "T2", "FLAIR")
# Tumour core diameters (mm) drawn by default: log-uniform, small tumours commoner.
MR_TUMOUR_SIZE_MM: tuple[float, float] = (8.0, 35.0)

(AIR, SCALP_FAT, SCALP_SOFT, SKULL, DIPLOE, CSF, GM, DEEP_GM, WM, VENTRICLE, OEDEMA, CORE,
 NECROSIS) = range(13)
_TISSUE_LABEL = np.array([0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 7, 8, 8], dtype=np.uint8)

# Relative signal per tissue (T1, T2, FLAIR); white matter on T1 is ~1. Ordering follows
# clinical appearance: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR suppresses CSF, oedema bright.
_SIGNAL = np.array([
    [0.00, 0.00, 0.00],  # air
    [1.05, 0.80, 0.70],  # scalp fat
    [0.45, 0.35, 0.40],  # scalp soft tissue (skin, muscle)
    [0.05, 0.05, 0.05],  # cortical bone
    [0.45, 0.35, 0.30],  # diploe (fatty marrow, thin: partial volume with the tables)
    [0.15, 1.00, 0.08],  # CSF
    [0.60, 0.62, 0.64],  # grey matter
    [0.70, 0.55, 0.58],  # deep grey nuclei
    [0.90, 0.42, 0.48],  # white matter
    [0.13, 1.00, 0.06],  # ventricular CSF
    [0.52, 0.85, 0.92],  # oedema
    [0.45, 0.72, 0.75],  # tumour core
    [0.25, 0.95, 0.55],  # necrosis
], dtype=np.float32)


@dataclass
class MRPhantom:
    """A rendered MR phantom before it is wrapped into Volumes.

    Attributes:
        image: ``(X, Y, Z)`` float32 arbitrary units (white matter on T1 ~ the case's scale).
        label: ``(X, Y, Z)`` uint8 values of :data:`MR_LABELS`.
        info: case facts for the metadata (sex, age, sequence, lesions, ...).
    """

    image: np.ndarray
    label: np.ndarray
    info: dict[str, Any]


def _head(grid: Grid, rng: np.random.Generator, sex: str, age: int) -> np.ndarray:
    """Paint the head: extracranial tissue, skull, CSF, cortex, white matter, deep structures."""
    size = 1.04 if sex == "male" else 0.97
    c = np.array([rng.uniform(-3, 3), rng.uniform(-8, 2), rng.uniform(10, 22)])
    r = np.array([rng.uniform(62, 69), rng.uniform(80, 88), rng.uniform(60, 67)]) * size
    rot = rotation(rng.uniform(-6, 6), rng.uniform(-3, 3), rng.uniform(-4, 4))
    field = SmoothField(rng, (80.0, 200.0), 8)
    amp = rng.uniform(0.02, 0.04)
    t_skull, t_scalp = rng.uniform(5, 8), rng.uniform(5, 8)
    atrophy = max(age - 30, 0) / 55.0  # 0 at 30 years, 1 at 85
    w_csf = rng.uniform(1.5, 2.5) + atrophy * rng.uniform(1.0, 2.5)
    t_gm = rng.uniform(2.5, 3.5)
    gyri = SmoothField(rng, (16.0, 28.0), 24)
    fold_mm, sulc_mm = rng.uniform(5.0, 8.0), rng.uniform(8.0, 12.0) + atrophy * 3.0
    fissure_w = rng.uniform(2.0, 3.5) + atrophy * 2.0
    # Corpus callosum: an arch in the sagittal plane (half length, half height, thickness, centre).
    cc = (rng.uniform(34, 40), rng.uniform(20, 26), rng.uniform(6, 9), rng.uniform(-6, 2), rng.uniform(-2, 4))
    face = Blob(center=c + np.array([0, rng.uniform(10, 25), -rng.uniform(55, 70)]),
                radii=np.array([rng.uniform(52, 60), rng.uniform(70, 80), rng.uniform(50, 60)]) * size,
                rot=rotation(rng.uniform(-10, 5), 0, 0), field=SmoothField(rng, (60.0, 150.0), 6), amp=0.05)
    neck_r = rng.uniform(48, 58) * size, rng.uniform(52, 62) * size
    neck_top = c[2] - rng.uniform(50, 65)

    x, y, z = grid.points()
    dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
    rt = rot.astype(np.float32)
    q = [((rt[0, i] * dx + rt[1, i] * dy) + rt[2, i] * dz) / np.float32(r[i]) for i in range(3)]
    rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) + np.float32(amp) * field(x, y, z)
    rho = np.maximum(rho, 1e-3)
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    # Signed distance from the inner table of the skull along the ray from the centre:
    # positive inside (depth into the brain), negative outside (into skull and scalp).
    depth = np.where(rho < 1.0, dist * (1.0 / rho - 1.0), -dist * (1.0 - 1.0 / rho))

    tissue = np.full(grid.shape, AIR, dtype=np.uint8)
    tissue[face.mask(grid)] = SCALP_SOFT
    tissue[tube_mask(grid, c[0], c[1] - 12, neck_r[0], neck_r[1]) & (z < neck_top)] = SCALP_SOFT
    tissue[depth > -(t_skull + t_scalp)] = SCALP_FAT
    tissue[(depth > -(t_skull + t_scalp)) & (depth < -(t_skull + t_scalp) + 1.5)] = SCALP_SOFT
    tissue[depth > -t_skull] = SKULL
    tissue[(depth > -0.7 * t_skull) & (depth < -0.3 * t_skull)] = DIPLOE
    inside = depth > 0
    tissue[inside] = CSF

    # Cortex and sulci share one folding field: along its zero lines a sulcus cuts in and the
    # grey/white boundary lies deep; away from them a gyrus carries white matter outward.
    idx = np.nonzero(inside & (depth < w_csf + t_gm + max(sulc_mm, fold_mm * 1.5)))
    g = gyri(x[idx[0], 0, 0], y[0, idx[1], 0], z[0, 0, idx[2]])
    d = depth[idx]
    h = np.abs(g)  # 0 on the field's zero lines: a labyrinth, like the sulcal pattern
    shell = np.where(d < w_csf + sulc_mm * np.clip(1.0 - h / 0.5, 0, None), CSF,
                     np.where(d < w_csf + t_gm + fold_mm * np.clip(1.5 - h, 0, None), GM, WM))
    tissue[inside] = WM
    tissue[idx] = shell.astype(np.uint8)

    # Interhemispheric fissure: midline CSF lined by medial cortex, everywhere except under the
    # corpus callosum, which bridges the hemispheres as an arch of white matter.
    half_len, half_h, thick, cc_y, cc_z = cc
    arch = (((dy - np.float32(cc_y)) / np.float32(half_len)) ** 2
            + ((dz - np.float32(cc_z)) / np.float32(half_h)) ** 2)
    below_arch = (arch < 1.0) | ((dz < cc_z) & (np.abs(dy - cc_y) < half_len))
    mx = np.abs(dx)
    deep = inside & (depth > w_csf)
    tissue[deep & (mx < fissure_w / 2) & ~below_arch] = CSF
    tissue[deep & (mx >= fissure_w / 2) & (mx < fissure_w / 2 + t_gm) & ~below_arch & (tissue == WM)] = GM
    inner = (1.0 - thick / half_h) ** 2
    tissue[deep & (mx < 20.0) & (arch < 1.0) & (arch >= inner) & (dz > cc_z - 4)] = WM

    # Cerebellum in the posterior fossa (cortex around a white core), cut off by the tentorium.
    cb = Blob(center=c + np.array([0, -r[1] * 0.5, -r[2] * 0.62]),
              radii=np.array([r[0] * 0.75, r[1] * 0.38, r[2] * 0.36]), rot=np.eye(3))
    cb_box = cb.box(grid)
    cb_rho = np.full(grid.shape, 9.0, dtype=np.float32)
    cb_rho[cb_box] = cb.rho(grid, cb_box)
    tissue[deep & (cb_rho < 1.12) & (cb_rho >= 1.0) & (dz > -r[2] * 0.62)] = CSF
    tissue[deep & (cb_rho < 1.0)] = GM
    tissue[deep & (cb_rho < 0.5)] = WM
    brainstem_r = rng.uniform(10, 13)
    stem = tube_mask(grid, c[0], c[1] - r[1] * 0.12, brainstem_r, brainstem_r * 0.9) & (dz < -r[2] * 0.2)
    tissue[deep & stem] = WM

    # Deep grey nuclei, then the lateral ventricles (larger with age) and the third ventricle.
    v_scale = 1.0 + atrophy * rng.uniform(0.3, 0.8)
    for side in (-1.0, 1.0):
        nuc = Blob(center=c + np.array([side * rng.uniform(15, 20), -rng.uniform(0, 8), rng.uniform(-8, 0)]),
                   radii=np.array([rng.uniform(10, 13), rng.uniform(16, 20), rng.uniform(10, 13)]),
                   rot=rotation(0, 0, side * rng.uniform(5, 15)))
        tissue[nuc.mask(grid) & deep] = DEEP_GM
    for side in (-1.0, 1.0):
        vw = rng.uniform(4, 6.5) * v_scale
        vent = Blob(center=c + np.array([side * (vw + 1.5), rng.uniform(-4, 4), rng.uniform(6, 12)]),
                    radii=np.array([vw, rng.uniform(24, 32) * v_scale, rng.uniform(7, 10) * v_scale]),
                    rot=rotation(rng.uniform(-8, 8), side * rng.uniform(5, 15), side * rng.uniform(4, 10)),
                    field=SmoothField(rng, (30.0, 80.0), 6), amp=0.06)
        tissue[vent.mask(grid) & deep] = VENTRICLE
    third = Blob(center=c + np.array([0, -4, -6]), radii=np.array([1.5 + v_scale, 12, 8]), rot=np.eye(3))
    tissue[third.mask(grid) & deep] = VENTRICLE
    return tissue


def _place_tumours(grid: Grid, rng: np.random.Generator, tissue: np.ndarray, with_lesions: bool,
                   size_mm: tuple[float, float] = MR_TUMOUR_SIZE_MM) -> list[dict[str, Any]]:
    """Place 1-3 tumours (core + oedema rim; if ``with_lesions``) fully inside grey/white matter.

    Core diameters are drawn log-uniformly from ``size_mm``, then raised to two voxels across.
    """
    if not with_lesions:
        return []
    count = int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07]))
    min_d = 2.0 * max(grid.spacing)
    out = []
    for _ in range(count):
        wanted = float(np.exp(rng.uniform(np.log(size_mm[0]), np.log(size_mm[1]))))
        oedema_factor = rng.uniform(1.4, 2.2)
        field = SmoothField(rng, (max(wanted, min_d), 3 * max(wanted, min_d)), 6)
        oedema_field = SmoothField(rng, (15.0, 40.0), 8)
        host = (tissue == GM) | (tissue == DEEP_GM) | (tissue == WM)
        placed = None
        # Shrink to two voxels across when it won't fit, and to one voxel on very coarse grids.
        for diameter in (max(wanted, min_d), min_d, min(grid.spacing)):
            placed = place_ball(host, grid, diameter / 2.0, rng, field, amp=0.15)
            if placed is not None:
                break
        if placed is None:
            break
        core, center = placed
        radius = diameter / 2.0
        # Vasogenic oedema spreads along white matter; the immediate rim is always oedematous.
        center_mm = grid.affine[:3, :3] @ center + grid.affine[:3, 3]
        box = grid.box(center_mm, radius * oedema_factor * 1.5)
        x, y, z = grid.points(box)
        dist = np.sqrt((x - center_mm[0]) ** 2 + (y - center_mm[1]) ** 2 + (z - center_mm[2]) ** 2)
        spread = dist / np.float32(radius * oedema_factor) + 0.25 * oedema_field(x, y, z) < 1.0
        oedema = np.zeros(grid.shape, dtype=bool)
        oedema[box] = spread & (tissue[box] == WM)
        oedema |= ndimage.binary_dilation(core) & host
        oedema &= ~core
        tissue[oedema] = OEDEMA
        tissue[core] = CORE
        core_d = equivalent_diameter(int(core.sum()), grid)
        if core_d > 20.0:  # large tumours outgrow their blood supply: a necrotic centre
            sub = tissue[box]  # a view: writing into it paints the tissue map
            sub[core[box] & (dist < np.float32(core_d * 0.22))] = NECROSIS
        out.append({"class": "tumour_core", "diameter_mm": round(core_d, 1),
                    "center_vox": [int(v) for v in center],
                    "oedema_volume_ml": round(float(oedema.sum()) * grid.voxel_volume() / 1000.0, 2)})
    return out


def generate_mr(grid: Grid, rngs: tuple[np.random.Generator, ...], with_lesions: bool,
                lesion_size_mm: tuple[float, float] = MR_TUMOUR_SIZE_MM,
                noise_scale: float = 1.0) -> MRPhantom:
    """Generate one MR head phantom.

    Args:
        grid: voxel grid (the anatomy is fixed in mm; the grid samples it).
        rngs: three generators: anatomy (grid-independent draws), lesions, rendering.
        with_lesions: whether the case carries tumours (drawn by the caller).
        lesion_size_mm: ``(min, max)`` tumour core diameter in mm.
        noise_scale: factor on the drawn Rician noise SD; 1 keeps it per voxel.

    Returns:
        :class:`MRPhantom` with ``(X, Y, Z)`` float32 a.u. image and uint8 labels.
    """
    rng_anat, rng_lesion, rng_render = rngs
    sex = "female" if rng_anat.random() < 0.5 else "male"
    age = int(rng_anat.integers(18, 86))
    sequence = MR_SEQUENCES[int(rng_anat.integers(len(MR_SEQUENCES)))]
    tissue = _head(grid, rng_anat, sex, age)
    lesions = _place_tumours(grid, rng_lesion, tissue, with_lesions, lesion_size_mm)
    label = _TISSUE_LABEL[tissue]
    image, render = _render_mr(grid, rng_render, tissue, sequence, noise_scale)
    info = {"sex": sex, "age": age, "sequence": sequence, "lesions": lesions, **render}
    return MRPhantom(image=image, label=label, info=info)


def _render_mr(grid: Grid, rng: np.random.Generator, tissue: np.ndarray,
               sequence: str, noise_scale: float = 1.0) -> tuple[np.ndarray, dict[str, float]]:
    """Tissue map -> MR image: contrast, texture, partial volume, bias field, Rician noise.

    ``noise_scale`` multiplies the drawn noise SD (1.5-4 % of the signal scale).
    """
    col = MR_SEQUENCES.index(sequence)
    scale = rng.uniform(600.0, 1000.0)
    lut = _SIGNAL[:, col] * rng.uniform(0.95, 1.05, size=len(_SIGNAL)).astype(np.float32)
    lut[AIR] = 0.0
    image = lut[tissue] * np.float32(scale)
    # Scalp is a mix of fat and fibrous tissue; brain tissue has a faint texture.
    image *= 1.0 + np.float32(0.04) * gaussian_texture(grid.shape, 1.0, rng)
    blur = rng.uniform(0.5, 0.8)
    image = ndimage.gaussian_filter(image, blur, mode="nearest")
    # Receive-coil inhomogeneity: a smooth multiplicative field with a few per cent to ~25 % swing.
    bias_strength = rng.uniform(0.05, 0.2)
    bias = SmoothField(rng, (200.0, 500.0), 4)
    image *= np.exp(np.float32(bias_strength) * bias(*grid.points()))
    # Magnitude images of complex Gaussian noise are Rician: biased upwards in the background.
    noise_sd = rng.uniform(0.015, 0.04) * scale * noise_scale
    re = image + rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(noise_sd)
    im = rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(noise_sd)
    image = np.sqrt(re * re + im * im)
    return image.astype(np.float32, copy=False), {"bias_strength": round(bias_strength, 3),
                                                   "noise_sd": round(noise_sd, 2),
                                                   "blur_vox": round(blur, 2)}
