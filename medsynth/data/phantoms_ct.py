"""CT abdomen phantom: anatomy, Hounsfield units and liver lesions.

The anatomy is painted as a *tissue* map that is finer than the label map (fat, bowel and gas
all carry the ``body`` label; cancellous and cortical bone both carry ``spine``), so the image
shows structure that the labels deliberately leave out, as real CT does. Positions follow RAS:
+x is the patient's Right (liver), -x the Left (spleen, aorta), +y Anterior, +z Superior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, special

from medsynth.data.phantom_shapes import (Blob, Grid, SmoothField, equivalent_diameter,
                                          gaussian_texture, place_ball, rotation, tube_mask)

CT_LABELS: dict[str, int] = {
    "background": 0,
    "body": 1,  # skin, subcutaneous and visceral fat, bowel, vessels other than the aorta
    "muscle": 2,
    "liver": 3,
    "spleen": 4,
    "kidney_left": 5,
    "kidney_right": 6,
    "spine": 7,  # vertebral bodies and posterior elements; discs and canal are "body"
    "aorta": 8,
    "liver_lesion": 9,
}

# Field of view (mm) along x, y, z: an abdomen scan from the liver dome to the iliac crests.
CT_FOV_MM: tuple[float, float, float] = (380.0, 380.0, 280.0)

# Tissue classes: index -> label value. CAVITY is resolved into fat/bowel/gas when rendering.
(AIR, FAT, CAVITY, FLUID, GAS, MUSCLE, LIVER, SPLEEN, KIDNEY_L, KIDNEY_R, BONE, CORTEX, DISC,
 CANAL, AORTA, IVC, LESION, BOWEL) = range(18)
_TISSUE_LABEL = np.array([0, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 7, 1, 1, 8, 1, 9, 1], dtype=np.uint8)

CONTRAST_PHASES: tuple[str, ...] = ("none", "portal_venous")

# (low, high) HU drawn per case; chosen from published CT attenuation ranges.
_HU_RANGES: dict[str, dict[int, tuple[float, float]]] = {
    "none": {FAT: (-115, -90), MUSCLE: (40, 55), LIVER: (52, 68), SPLEEN: (42, 52),
             KIDNEY_L: (28, 38), AORTA: (35, 48), IVC: (35, 48), BOWEL: (15, 40),
             FLUID: (0, 20), GAS: (-950, -850), BONE: (150, 280), CORTEX: (600, 900),
             DISC: (70, 100), CANAL: (10, 25)},
    "portal_venous": {FAT: (-115, -90), MUSCLE: (50, 65), LIVER: (95, 125), SPLEEN: (100, 130),
                      KIDNEY_L: (150, 200), AORTA: (140, 190), IVC: (120, 160), BOWEL: (40, 80),
                      FLUID: (0, 20), GAS: (-950, -850), BONE: (150, 280), CORTEX: (600, 900),
                      DISC: (70, 100), CANAL: (10, 25)},
}
# Lesion diameters (mm) drawn by default: log-uniform, small lesions commoner.
CT_LESION_SIZE_MM: tuple[float, float] = (5.0, 30.0)
# How much darker than the liver a lesion is, per phase (hypodense lesions).
_LESION_DROP_HU: dict[str, tuple[float, float]] = {"none": (18, 40), "portal_venous": (30, 65)}
# Parenchymal texture standard deviation (HU) per tissue; the rest get 3 HU.
_TEXTURE_HU = {FAT: 12.0, BONE: 40.0, CORTEX: 60.0, LIVER: 5.0, SPLEEN: 5.0, BOWEL: 12.0,
               MUSCLE: 6.0, LESION: 6.0}


@dataclass
class CTPhantom:
    """A rendered CT phantom before it is wrapped into Volumes.

    Attributes:
        image: ``(X, Y, Z)`` float32 HU.
        label: ``(X, Y, Z)`` uint8 values of :data:`CT_LABELS`.
        info: case facts for the metadata (sex, age, contrast, lesions, ...).
    """

    image: np.ndarray
    label: np.ndarray
    info: dict[str, Any]


def _body_layers(grid: Grid, rng: np.random.Generator, sex: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Paint skin/fat, the muscular wall and the abdominal cavity; returns tissues and geometry."""
    a = rng.normal(160.0 if sex == "male" else 150.0, 10.0)
    a = float(np.clip(a, 125.0, 180.0))  # half width (LR)
    b = a * rng.uniform(0.68, 0.8)  # half depth anterior (AP)
    b_post = b * rng.uniform(0.85, 0.95)  # supine patients are flatter at the back
    x0, y0 = rng.uniform(-8, 8), rng.uniform(-12, 4)
    expo = rng.uniform(2.0, 2.4)
    t_fat = rng.uniform(15, 38) if sex == "female" else rng.uniform(8, 28)
    t_mus = rng.uniform(9, 15) if sex == "male" else rng.uniform(7, 12)
    field = SmoothField(rng, (120.0, 320.0), 6)
    amp = rng.uniform(0.02, 0.05)
    waist = rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)

    x, y, z = grid.points()
    zscale = 1.0 + np.float32(waist[0]) * np.sin(z / np.float32(90.0) + np.float32(waist[1]))
    dx, dy = x - np.float32(x0), y - np.float32(y0)
    by = np.where(dy >= 0, np.float32(b), np.float32(b_post))
    ux = np.abs(dx) / (np.float32(a) * zscale)
    uy = np.abs(dy) / (by * zscale)
    rho = (ux ** np.float32(expo) + uy ** np.float32(expo)) ** np.float32(1 / expo)
    rho += np.float32(amp) * field(x, y, z)
    # Depth below the skin along the ray from the body axis: exact for an undeformed ellipse
    # along its axes and close elsewhere, which is all the layering needs.
    r = np.sqrt(dx * dx + dy * dy)
    depth = r * (1.0 / np.maximum(rho, 1e-3) - 1.0)
    tissue = np.full(grid.shape, AIR, dtype=np.uint8)
    tissue[rho < 1.0] = FAT
    tissue[(rho < 1.0) & (depth >= t_fat)] = MUSCLE
    tissue[(rho < 1.0) & (depth >= t_fat + t_mus)] = CAVITY
    geo = dict(a=a, b=b, b_post=b_post, x0=x0, y0=y0, t_fat=t_fat, t_mus=t_mus)
    geo["a_cav"], geo["b_cav"] = a - t_fat - t_mus, b - t_fat - t_mus
    geo["b_cav_post"] = b_post - t_fat - t_mus
    return tissue, {**geo, "depth": depth}


def _spine_and_vessels(grid: Grid, rng: np.random.Generator, geo: dict[str, Any]) -> dict[str, np.ndarray]:
    """Draw spine, paraspinal muscles, psoas, aorta and IVC geometry; returns their masks."""
    z = grid.axis(2)
    x0, y0 = geo["x0"], geo["y0"]
    y_back = y0 - geo["b_post"]
    lordosis = rng.uniform(0, 10) * (1.0 - (z / 150.0) ** 2)  # lumbar spine bows anteriorly
    y_vb = y_back + 0.38 * (geo["b"] + geo["b_post"]) + rng.uniform(-5, 5) + lordosis
    rx_vb, ry_vb = rng.uniform(20, 26), rng.uniform(15, 19)
    period, disc_h, phase_z = rng.uniform(33, 38), rng.uniform(8, 11), rng.uniform(0, 40)
    frac = np.mod(z - phase_z, period)
    is_disc = frac < disc_h
    has_arch = (frac > disc_h * 0.7) & (frac < period - 2)  # laminae overlap the disc level
    rx_c, ry_c, t_arch = rng.uniform(9, 11), rng.uniform(7, 9), rng.uniform(6, 8)
    y_c = y_vb - ry_vb - ry_c - rng.uniform(1, 3)
    spin_len, spin_w = rng.uniform(25, 35), rng.uniform(3.5, 5)
    trans_w, trans_h = rng.uniform(35, 45), rng.uniform(4, 6)
    para_dx, para_dy = rng.uniform(28, 34), rng.uniform(12, 20)
    para_rx, para_ry = rng.uniform(18, 24), rng.uniform(18, 25)
    psoas_r, psoas_top = rng.uniform(16, 24), rng.uniform(-10, 30)
    ao_dx, ao_gap, ao_r = rng.uniform(10, 20), rng.uniform(3, 8), rng.uniform(9, 12.5)
    ao_wiggle = rng.uniform(0, 4), rng.uniform(0, 2 * np.pi)
    ivc_dx, ivc_gap = rng.uniform(20, 30), rng.uniform(4, 12)
    ivc_rx, ivc_ry = rng.uniform(10, 14), rng.uniform(7, 10)

    vb_any = tube_mask(grid, x0, y_vb, rx_vb, ry_vb, 2.3)
    vb = vb_any & ~is_disc[None, None, :]
    disc = vb_any & is_disc[None, None, :]
    canal = tube_mask(grid, x0, y_c, rx_c, ry_c)
    ring = tube_mask(grid, x0, y_c, rx_c + t_arch, ry_c + t_arch) & ~canal
    ring &= has_arch[None, None, :]
    spinous = tube_mask(grid, x0, y_c - ry_c - t_arch - spin_len / 2 + 2, np.where(has_arch, spin_w, 0),
                        spin_len / 2)
    transverse = tube_mask(grid, x0, y_c + 2, np.where(has_arch, trans_w, 0), trans_h)
    masks: dict[str, np.ndarray] = {"bone": vb | ring | spinous | transverse, "disc": disc, "canal": canal}

    inside_fat = geo["depth"] >= geo["t_fat"]
    para = np.zeros(grid.shape, dtype=bool)
    psoas = np.zeros(grid.shape, dtype=bool)
    r_ps = psoas_r * np.clip((psoas_top - z) / 120.0, 0.25, 1.0) * (z < psoas_top)
    for side in (-1.0, 1.0):
        para |= tube_mask(grid, x0 + side * para_dx, y_c - para_dy, para_rx, para_ry, 2.5)
        psoas |= tube_mask(grid, x0 + side * (rx_vb + r_ps * 0.9 + 2), y_vb, r_ps, r_ps * 0.85)
    masks["muscle"] = (para | psoas) & inside_fat

    ao_x = x0 - ao_dx + ao_wiggle[0] * np.sin(z / 80.0 + ao_wiggle[1])
    masks["aorta"] = tube_mask(grid, ao_x, y_vb + ry_vb + ao_r + ao_gap, ao_r, ao_r)
    masks["ivc"] = tube_mask(grid, x0 + ivc_dx, y_vb + ry_vb + ivc_ry + ivc_gap, ivc_rx, ivc_ry)
    geo["y_vb"], geo["rx_vb"] = float(np.mean(y_vb)), rx_vb
    return masks


def _organs(grid: Grid, rng: np.random.Generator, geo: dict[str, Any], sex: str) -> dict[str, np.ndarray]:
    """Draw liver, spleen, kidneys (+ renal sinus) and stomach; returns their masks."""
    x0, y0 = geo["x0"], geo["y0"]
    a_cav, b_cav = geo["a_cav"], geo["b_cav"]
    size = 1.05 if sex == "male" else 0.97

    def jitter_rot(max_deg: float) -> np.ndarray:
        return rotation(*rng.uniform(-max_deg, max_deg, size=3))

    # Liver: a wedge filling the right upper quadrant, thin left lobe crossing the midline.
    # Turning its long axis makes the left lobe anterior and the right lobe posterior.
    lrx = rng.uniform(85, 100) * size
    liver = Blob(center=np.array([x0 + a_cav - lrx * rng.uniform(0.75, 0.9), y0 + rng.uniform(-8, 8),
                                  rng.uniform(40, 55)]),
                 radii=np.array([lrx, rng.uniform(50, 60) * size, rng.uniform(55, 65) * size]),
                 rot=rotation(rng.uniform(-8, 8), rng.uniform(-8, 8), -rng.uniform(10, 25)),
                 exponent=rng.uniform(2.0, 2.4), field=SmoothField(rng, (60.0, 160.0), 8),
                 amp=rng.uniform(0.05, 0.1), taper=rng.uniform(0.4, 0.55))
    # Spleen: a flattened ellipsoid against the left posterolateral wall.
    theta = np.deg2rad(rng.uniform(210, 235))
    s_scale = size * float(np.exp(rng.normal(0, 0.12)))
    s_r = np.array([rng.uniform(20, 27), rng.uniform(38, 50), rng.uniform(45, 58)]) * s_scale
    wall = np.array([x0 + a_cav * np.cos(theta), y0 + geo["b_cav_post"] * np.sin(theta)])
    normal = np.array([np.cos(theta), np.sin(theta)])
    spleen = Blob(center=np.array([*(wall - normal * s_r[0] * 1.1), liver.center[2] + rng.uniform(-15, 10)]),
                  radii=s_r, rot=rotation(rng.uniform(-10, 10), rng.uniform(-10, 10), np.rad2deg(theta)),
                  field=SmoothField(rng, (40.0, 120.0), 8), amp=rng.uniform(0.06, 0.12))
    # Stomach: left upper quadrant, anterior to the spleen; gas rises anteriorly when supine.
    stomach = Blob(center=np.array([x0 - a_cav * rng.uniform(0.3, 0.45), y0 + b_cav * rng.uniform(0.1, 0.35),
                                    liver.center[2] + rng.uniform(-20, 0)]),
                   radii=np.array([rng.uniform(35, 50), rng.uniform(25, 35), rng.uniform(40, 55)]),
                   rot=jitter_rot(20), field=SmoothField(rng, (50.0, 120.0), 6), amp=0.08)
    gas_level = rng.uniform(0.3, 0.7)
    masks = {"liver": liver.mask(grid), "spleen": spleen.mask(grid), "stomach": stomach.mask(grid)}
    _, y, _ = grid.points()
    masks["gas"] = masks["stomach"] & (y > stomach.center[1] + gas_level * stomach.radii[1])

    # Kidneys: beside the spine, the right one lower (pushed down by the liver); upper poles
    # tilt medially and the hilum faces anteromedially.
    z_left = rng.uniform(-5, 20)
    for name, side in (("kidney_left", -1.0), ("kidney_right", 1.0)):
        kr = np.array([rng.uniform(21, 26), rng.uniform(24, 30), rng.uniform(48, 60)]) * size
        cz = z_left if side < 0 else z_left - rng.uniform(10, 25)
        center = np.array([x0 + side * (geo["rx_vb"] + rng.uniform(35, 48)),
                           geo["y_vb"] - rng.uniform(0, 10), cz])
        rot = rotation(rng.uniform(-5, 5), side * -rng.uniform(8, 15), side * -rng.uniform(20, 35))
        kidney = Blob(center=center, radii=kr, rot=rot, field=SmoothField(rng, (30.0, 90.0), 6),
                      amp=rng.uniform(0.04, 0.08))
        # The renal sinus (hilum fat) bites into the medial-anterior side: the bean shape.
        medial = rot @ np.array([-side, 0.0, 0.0])
        sinus = Blob(center=center + medial * kr[0] * 0.75, radii=kr * np.array([0.45, 0.35, 0.4]), rot=rot)
        masks[name] = kidney.mask(grid)
        masks[name + "_sinus"] = sinus.mask(grid) & masks[name]
    return masks


def _place_lesions(grid: Grid, rng: np.random.Generator, tissue: np.ndarray, with_lesions: bool,
                   liver_hu: float, phase: str,
                   size_mm: tuple[float, float] = CT_LESION_SIZE_MM) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Place 1-3 hypodense lesions (if ``with_lesions``) fully inside the liver; paints LESION.

    Diameters are drawn log-uniformly from ``size_mm`` (small lesions commoner), then raised to
    two voxels across.

    Returns:
        per-lesion metadata and the matching ``(X, Y, Z)`` bool masks.
    """
    if not with_lesions:
        return [], []
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    min_d = 2.0 * max(grid.spacing)  # smaller would be sub-voxel and vanish from the label map
    lesions, masks = [], []
    for _ in range(count):
        wanted = float(np.exp(rng.uniform(np.log(size_mm[0]), np.log(size_mm[1]))))
        drop = rng.uniform(*_LESION_DROP_HU[phase])
        field = SmoothField(rng, (max(wanted, min_d), 3 * max(wanted, min_d)), 6)
        placed = None
        # Shrink to two voxels across when it won't fit, and to one voxel on very coarse grids.
        for diameter in (max(wanted, min_d), min_d, min(grid.spacing)):
            placed = place_ball(tissue == LIVER, grid, diameter / 2.0, rng, field, amp=0.12)
            if placed is not None:
                break
        if placed is None:
            break
        mask, center = placed
        tissue[mask] = LESION
        masks.append(mask)
        lesions.append({"class": "liver_lesion",
                        "diameter_mm": round(equivalent_diameter(int(mask.sum()), grid), 1),
                        "center_vox": [int(c) for c in center],
                        "hu": round(float(liver_hu - drop), 1)})
    return lesions, masks


def generate_ct(grid: Grid, rngs: tuple[np.random.Generator, ...], with_lesions: bool,
                lesion_size_mm: tuple[float, float] = CT_LESION_SIZE_MM,
                noise_scale: float = 1.0) -> CTPhantom:
    """Generate one CT abdomen phantom.

    Args:
        grid: voxel grid (the anatomy is fixed in mm; the grid samples it).
        rngs: three generators: anatomy (grid-independent draws), lesions, rendering.
        with_lesions: whether the case carries liver lesions (drawn by the caller).
        lesion_size_mm: ``(min, max)`` lesion diameter in mm.
        noise_scale: factor on the drawn quantum-noise SD (8-20 HU); 1 keeps it per voxel.

    Returns:
        :class:`CTPhantom` with ``(X, Y, Z)`` float32 HU image and uint8 labels.
    """
    rng_anat, rng_lesion, rng_render = rngs
    sex = "female" if rng_anat.random() < 0.5 else "male"
    age = int(rng_anat.integers(25, 86))
    phase = CONTRAST_PHASES[int(rng_anat.random() < 0.6)]
    hu = {t: rng_anat.uniform(*r) for t, r in _HU_RANGES[phase].items()}
    hu[KIDNEY_R] = hu[KIDNEY_L] + rng_anat.uniform(-4, 4)
    hu[BONE] -= max(age - 40, 0) * 1.5  # trabecular bone thins with age

    tissue, geo = _body_layers(grid, rng_anat, sex)
    spine = _spine_and_vessels(grid, rng_anat, geo)
    organs = _organs(grid, rng_anat, geo, sex)
    cavity = geo["depth"] >= geo["t_fat"] + geo["t_mus"]
    body = tissue != AIR
    # Paint order settles overlaps: later structures win, so muscles and vessels carve the organs.
    tissue[organs["stomach"] & cavity] = FLUID
    tissue[organs["gas"] & cavity] = GAS
    tissue[organs["liver"] & cavity] = LIVER
    tissue[organs["spleen"] & cavity] = SPLEEN
    retro = body & (geo["depth"] >= geo["t_fat"] + 3.0)  # kidneys sit behind the cavity
    tissue[organs["kidney_left"] & retro] = KIDNEY_L
    tissue[organs["kidney_right"] & retro] = KIDNEY_R
    tissue[(organs["kidney_left_sinus"] | organs["kidney_right_sinus"]) & retro] = FAT
    tissue[spine["muscle"]] = MUSCLE
    tissue[spine["ivc"] & body] = IVC
    tissue[spine["aorta"] & body] = AORTA
    tissue[spine["disc"] & body] = DISC
    tissue[spine["canal"] & body] = CANAL
    bone = spine["bone"] & body
    tissue[bone] = CORTEX
    tissue[ndimage.binary_erosion(bone)] = BONE

    lesions, lesion_masks = _place_lesions(grid, rng_lesion, tissue, with_lesions, hu[LIVER], phase,
                                                 lesion_size_mm)
    label = _TISSUE_LABEL[tissue]
    image, render = _render_ct(grid, rng_render, tissue, hu, sex,
                               [(m, les["hu"]) for les, m in zip(lesions, lesion_masks)], noise_scale)
    info = {"sex": sex, "age": age, "contrast": phase, "lesions": lesions,
            "hu_nominal": {"liver": round(hu[LIVER], 1), "spleen": round(hu[SPLEEN], 1),
                           "aorta": round(hu[AORTA], 1), "muscle": round(hu[MUSCLE], 1)}, **render}
    return CTPhantom(image=image, label=label, info=info)


def _render_ct(grid: Grid, rng: np.random.Generator, tissue: np.ndarray, hu: dict[int, float],
               sex: str, lesions: list[tuple[np.ndarray, float]],
               noise_scale: float = 1.0) -> tuple[np.ndarray, dict[str, float]]:
    """Tissue map -> HU image: bowel texture, parenchymal texture, partial volume, noise.

    Args:
        lesions: ``(mask, HU)`` per lesion; each keeps its own attenuation.
        noise_scale: factor on the drawn noise SD (drawn either way, so the stream is unchanged).

    Returns:
        ``(X, Y, Z)`` float32 HU image and the rendering parameters drawn.
    """
    # Visceral cavity: mesenteric fat, bowel loops and gas pockets from one smooth random field.
    cav = tissue == CAVITY
    bowel_tex = gaussian_texture(grid.shape, tuple(7.0 / s for s in grid.spacing), rng)
    fat_frac = rng.uniform(0.35, 0.6) if sex == "male" else rng.uniform(0.25, 0.5)
    gas_frac = rng.uniform(0.01, 0.04)
    t_fat, t_gas = special.ndtri(fat_frac), special.ndtri(1.0 - gas_frac)
    tissue = tissue.copy()
    tissue[cav] = BOWEL
    tissue[cav & (bowel_tex < t_fat)] = FAT
    tissue[cav & (bowel_tex > t_gas)] = GAS

    lut = np.full(len(_TISSUE_LABEL), 30.0, dtype=np.float32)
    lut[AIR] = -1000.0
    for t, v in hu.items():
        lut[t] = v
    tex_lut = np.full(len(_TISSUE_LABEL), 3.0, dtype=np.float32)
    tex_lut[AIR] = 0.0
    for t, v in _TEXTURE_HU.items():
        tex_lut[t] = v
    image = lut[tissue]
    for mask, value in lesions:
        image[mask] = value
    image += tex_lut[tissue] * gaussian_texture(grid.shape, 0.8, rng)
    blur = rng.uniform(0.5, 0.9)  # partial volume: the scanner's point spread, in voxels
    image = ndimage.gaussian_filter(image, blur, mode="nearest")
    noise_sd = rng.uniform(8.0, 20.0) * noise_scale
    image += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(noise_sd)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image.astype(np.float32, copy=False), {"noise_sd": round(noise_sd, 2), "blur_vox": round(blur, 2)}
