"""Shape primitives for the procedural phantoms.

Anatomy is described in RAS millimetres on a voxel grid centred at the origin (+x = patient
Right, +y = Anterior, +z = Superior). Shapes are randomly deformed superquadrics and tubes whose
deformation comes from smooth random fields built from a few random Fourier modes: such a field
is defined everywhere in space, so a phantom drawn with the same shape parameters looks the same
at any grid size, only sampled more or less finely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Slices = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A voxel grid centred at the RAS origin with axis-aligned (diagonal) orientation.

    Attributes:
        shape: ``(X, Y, Z)`` voxel counts.
        spacing: ``(sx, sy, sz)`` voxel size in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel -> RAS mm matrix; the grid centre sits at (0, 0, 0)."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing)]
        return aff

    def axis(self, dim: int) -> np.ndarray:
        """``(shape[dim],)`` float32 mm coordinates of the voxel centres along one axis."""
        n, s = self.shape[dim], self.spacing[dim]
        return ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).astype(np.float32)

    def box(self, center: np.ndarray, half: np.ndarray | float) -> Slices:
        """Index slices covering ``center +/- half`` mm (clipped to the grid; may be empty)."""
        half = np.broadcast_to(np.asarray(half, dtype=float), (3,))
        out = []
        for d in range(3):
            n, s = self.shape[d], self.spacing[d]
            lo = int(np.floor((center[d] - half[d]) / s + (n - 1) / 2.0))
            hi = int(np.ceil((center[d] + half[d]) / s + (n - 1) / 2.0)) + 1
            out.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
        return tuple(out)  # type: ignore[return-value]

    def points(self, box: Slices | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable mm coordinates ``x (nx,1,1)``, ``y (1,ny,1)``, ``z (1,1,nz)`` of a box."""
        box = box or (slice(None),) * 3
        x = self.axis(0)[box[0]][:, None, None]
        y = self.axis(1)[box[1]][None, :, None]
        z = self.axis(2)[box[2]][None, None, :]
        return x, y, z

    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(np.prod(self.spacing))


class SmoothField:
    """A smooth random scalar field: a sum of random Fourier modes, zero mean, unit variance.

    Args:
        rng: source of the random wave vectors and phases.
        wavelength_mm: ``(min, max)`` wavelength range; larger means smoother.
        n_modes: number of plane waves; more modes look less periodic.
    """

    def __init__(self, rng: np.random.Generator, wavelength_mm: tuple[float, float],
                 n_modes: int = 8) -> None:
        directions = rng.standard_normal((n_modes, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_modes)
        self.k = (2 * np.pi / wavelengths)[:, None] * directions  # (M, 3) rad/mm
        self.phase = rng.uniform(0, 2 * np.pi, size=n_modes)
        self.norm = np.sqrt(2.0 / n_modes)  # unit variance for independent random phases

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field values at broadcastable mm coordinates; float32 of the broadcast shape."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = np.zeros(shape, dtype=np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            # Adding the separable terms first keeps the intermediate arrays small.
            arg = (np.float32(kx) * x + np.float32(ky) * y) + (np.float32(kz) * z + np.float32(ph))
            out += np.cos(arg)
        out *= np.float32(self.norm)
        return out


def rotation(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """``(3, 3)`` rotation matrix (about x, then y, then z; degrees); columns are body axes."""
    a, b, c = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Blob:
    """A randomly deformed, optionally tapered superquadric in mm.

    A point is inside when ``rho < 1``, where ``rho`` is the superquadric norm of the point in
    the blob's own axes divided by ``radii``, plus ``amp`` times a smooth random field.

    Attributes:
        center: ``(3,)`` RAS mm.
        radii: ``(3,)`` semi-axes in mm along the blob's axes.
        rot: ``(3, 3)`` blob axes as columns in RAS.
        exponent: 2 gives an ellipsoid; larger is boxier.
        field: deformation field (unit variance), or None for an exact superquadric.
        amp: deformation strength in units of the normalised radius.
        taper: growth of the 2nd and 3rd radii per unit of the normalised 1st coordinate
            (a wedge: the liver is thick on the patient's right and thin on the left).
    """

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    exponent: float = 2.0
    field: SmoothField | None = None
    amp: float = 0.0
    taper: float = 0.0

    def box(self, grid: Grid) -> Slices:
        """Index slices that surely contain the blob."""
        # |q_i| <= rho_raw for exponent >= 1, and the field rarely exceeds 3 sd.
        reach = float(np.max(self.radii)) * (1.0 + 3.0 * self.amp) * (1.0 + abs(self.taper))
        return grid.box(self.center, reach)

    def rho(self, grid: Grid, box: Slices) -> np.ndarray:
        """Normalised radius (``< 1`` inside) over ``box``; float32 of the box shape."""
        x, y, z = grid.points(box)
        cx, cy, cz = (np.float32(v) for v in self.center)
        dx, dy, dz = x - cx, y - cy, z - cz
        rot = self.rot.astype(np.float32)
        q = [(rot[0, i] * dx + rot[1, i] * dy) + rot[2, i] * dz for i in range(3)]
        q[0] = q[0] / np.float32(self.radii[0])
        scale = np.float32(1.0)
        if self.taper:
            scale = np.clip(1.0 + np.float32(self.taper) * q[0], 0.2, None)
        q[1] = q[1] / (np.float32(self.radii[1]) * scale)
        q[2] = q[2] / (np.float32(self.radii[2]) * scale)
        e = np.float32(self.exponent)
        if self.exponent == 2.0:
            rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        else:
            rho = (np.abs(q[0]) ** e + np.abs(q[1]) ** e + np.abs(q[2]) ** e) ** (1 / e)
        if self.field is not None and self.amp:
            rho += np.float32(self.amp) * self.field(x, y, z)
        return rho

    def mask(self, grid: Grid) -> np.ndarray:
        """``(X, Y, Z)`` bool mask of the voxels inside."""
        out = np.zeros(grid.shape, dtype=bool)
        box = self.box(grid)
        if all(s.stop > s.start for s in box):
            out[box] = self.rho(grid, box) < 1.0
        return out


def tube_mask(grid: Grid, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray | float,
              ry: np.ndarray | float, exponent: float = 2.0) -> np.ndarray:
    """``(X, Y, Z)`` bool mask of a tube running along z with a superelliptic cross-section.

    Args:
        cx, cy: ``(Z,)`` centre-line position in mm per axial slice (or scalars).
        rx, ry: ``(Z,)`` or scalar semi-axes in mm per slice; a zero radius leaves a slice empty.
    """
    x, y, _ = grid.points()
    nz = grid.shape[2]
    cx, cy = (np.broadcast_to(np.asarray(v, dtype=np.float32), (nz,)) for v in (cx, cy))
    rx, ry = (np.broadcast_to(np.asarray(v, dtype=np.float32), (nz,)) for v in (rx, ry))
    safe_rx, safe_ry = np.maximum(rx, 1e-3), np.maximum(ry, 1e-3)
    ux = np.abs(x - cx[None, None, :]) / safe_rx[None, None, :]
    uy = np.abs(y - cy[None, None, :]) / safe_ry[None, None, :]
    inside = (ux ** exponent + uy ** exponent) < 1.0
    inside &= ((rx > 0) & (ry > 0))[None, None, :]
    return inside


def equivalent_diameter(n_voxels: int, grid: Grid) -> float:
    """Diameter in mm of the sphere with the volume of ``n_voxels`` voxels."""
    return float((6.0 * n_voxels * grid.voxel_volume() / np.pi) ** (1.0 / 3.0))


def _crop_to(mask: np.ndarray, pad: int = 1) -> Slices:
    """Bounding-box slices of the True voxels, grown by ``pad`` voxels (clipped)."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n))  # type: ignore[return-value]
                 for i, n in zip(idx, mask.shape))


def ball_offsets(radius_mm: float, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel offsets of a ball centred on a voxel: ``(N, 3)`` ints and their ``(N,)`` mm distances."""
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    axes = [np.arange(-h, h + 1) for h in half]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    dist = np.sqrt(((offsets * np.asarray(spacing)) ** 2).sum(axis=1))
    keep = dist <= radius_mm * (1 + 1e-9)
    return offsets[keep], dist[keep]


def _deep_enough(sub: np.ndarray, offsets: np.ndarray, radius_mm: float,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels of ``sub`` where the ball and its face neighbours fit inside ``sub``."""
    half = np.abs(offsets).max(axis=0) + 1
    if np.prod(2 * half + 1) <= 9 ** 3:
        # Small balls: exact lattice test (erosion by the ball grown by one voxel). The distance
        # test below is conservative by up to a voxel, which is what matters at 16^3.
        footprint = np.zeros(tuple(2 * half + 1), dtype=bool)
        footprint[tuple((offsets + half).T)] = True
        footprint = ndimage.binary_dilation(footprint, ndimage.generate_binary_structure(3, 1))
        return ndimage.binary_erosion(sub, structure=footprint, border_value=0)
    depth = ndimage.distance_transform_edt(sub, sampling=spacing)
    return depth > radius_mm + max(spacing)


def place_ball(host: np.ndarray, grid: Grid, radius_mm: float, rng: np.random.Generator,
               field: SmoothField | None = None, amp: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Place a slightly deformed ball fully inside ``host``, with a one-voxel margin.

    The centre is a voxel drawn uniformly among those where the voxelised ball, grown by its
    face neighbours, lies inside the host; so the ball never touches the host's border.

    Args:
        host: ``(X, Y, Z)`` bool mask of where the ball may go.
        radius_mm: outer radius; the deformation only ever shrinks the ball inside it.
        field, amp: optional boundary deformation (in units of the radius).

    Returns:
        ``(mask, center_vox)``: ``(X, Y, Z)`` bool mask (never empty) and ``(3,)`` int centre,
        or None when no host voxel is deep enough.
    """
    if not host.any():
        return None
    offsets, dist = ball_offsets(radius_mm, grid.spacing)
    box = _crop_to(host, pad=1)
    sub = np.pad(host[box], 1)  # outside the crop is outside the host
    cand = np.argwhere(_deep_enough(sub, offsets, radius_mm, grid.spacing))
    if len(cand) == 0:
        return None
    center = cand[rng.integers(len(cand))] - 1 + np.array([s.start for s in box])
    rho = dist / radius_mm
    # Balls only a few voxels across stay round: deforming them would erase them.
    amp *= float(np.clip((radius_mm / max(grid.spacing) - 1.0) / 2.0, 0.0, 1.0))
    if field is not None and amp:
        pos = (center + offsets) * np.asarray(grid.spacing) + grid.affine[:3, 3]  # (N, 3) mm
        # Only shrink (never grow) so the placement guarantee above still holds.
        rho = rho + amp * np.abs(field(pos[:, 0], pos[:, 1], pos[:, 2]))
    inside = (rho <= 1.0 + 1e-9) | (dist == 0)  # a deformed small ball keeps at least its centre
    mask = np.zeros(grid.shape, dtype=bool)
    mask[tuple((center + offsets[inside]).T)] = True
    return mask, center.astype(int)


def gaussian_texture(shape: tuple[int, int, int], sigma_vox: float | tuple[float, float, float],
                     rng: np.random.Generator) -> np.ndarray:
    """``shape`` float32 correlated noise with unit standard deviation (blurred white noise)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    tex = ndimage.gaussian_filter(noise, sigma_vox, mode="wrap")
    sd = float(tex.std())
    return tex / np.float32(sd if sd > 0 else 1.0)
