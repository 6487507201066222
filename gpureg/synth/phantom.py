"""Analytic two-particle phantom with known motion (ground truth for tests and benchmarks).

The phantom is a continuous function of position, so a moved copy is sampled
exactly (no interpolation error): for a transform ``moving_from_reference``
``M``, the moving volume is ``moving(q) = f(M^-1 q)`` and therefore
``apply_affine(moving, M) ~= f(p) = fixed``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["particle_fields", "PARTICLES", "two_particle_phantom"]

# Particle centres and radii in units of the half-size R = min(shape) / 2,
# offsets from the grid centre in (z, y, x).
PARTICLES = (
    {"center": (0.05, -0.24, -0.2), "radius": 0.32, "level": 1.0},
    {"center": (-0.06, 0.27, 0.25), "radius": 0.26, "level": 0.75},
)


_CHUNK = 1 << 21


def two_particle_phantom(shape=(64, 64, 64), moving_from_reference=None, *, per_particle=None,
                         seed: int = 0, texture: bool = True, edge_width: float = 0.7,
                         return_labels: bool = False):
    """Two irregular, porous, textured particles, optionally moved.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid ``(Z, Y, X)``.
    moving_from_reference : (4, 4) array_like or SmoothWarp, optional
        Motion of the whole sample: the result is the *moving* volume whose
        alignment with this matrix gives the unmoved phantom. A
        :class:`gpureg.synth.deform.SmoothWarp` (anything with
        ``reference_from_moving(points)``) moves it non-rigidly.
    per_particle : dict {label: (4, 4) array_like}, optional
        Motion of single particles (labels 1 and 2), replacing
        ``moving_from_reference`` for those particles (relative motion).
    seed : int
        Shape, pores and texture are deterministic per seed.
    texture : bool
        Smooth internal grey-level texture (False: flat per-particle levels).
    edge_width : float
        Width of the soft particle edge in voxels (avoids aliasing).
    return_labels : bool
        Also return the particle labels (0 background, 1, 2) on the same grid.

    Returns
    -------
    volume : (Z, Y, X) ndarray of float32
        Values in [0, 1]; background 0.
    labels : (Z, Y, X) ndarray of uint8
        Only when ``return_labels``.
    """
    shape, params, center, half, inverses = _setup(shape, moving_from_reference, per_particle, seed)
    out = np.zeros(int(np.prod(shape)), dtype=np.float32)
    labels = np.zeros(out.shape, dtype=np.uint8) if return_labels else None
    grid = np.stack(np.meshgrid(np.arange(shape[1], dtype=np.float64), np.arange(shape[2], dtype=np.float64),
                                indexing="ij"), -1).reshape(-1, 2)
    plane = grid.shape[0]
    zstep = max(1, _CHUNK // plane)
    for z0 in range(0, shape[0], zstep):
        z1 = min(shape[0], z0 + zstep)
        q = np.concatenate([np.repeat(np.arange(z0, z1, dtype=np.float64), plane)[:, None],
                            np.tile(grid, (z1 - z0, 1))], axis=1)
        acc = np.zeros(q.shape[0])
        lab = np.zeros(q.shape[0], dtype=np.uint8)
        for k, (par, inv) in enumerate(zip(params, inverses)):
            u = (to_reference(inv, q) - center) / half
            occ = _occupancy(u, par, half, edge_width)
            val = par["level"] * (_texture(u, par) if texture else 1.0)
            acc += occ * val
            lab[occ > 0.5] = k + 1
        out[z0 * plane: z1 * plane] = acc
        if labels is not None:
            labels[z0 * plane: z1 * plane] = lab
    vol = np.clip(out, 0.0, 1.0).reshape(shape)
    if return_labels:
        return vol, labels.reshape(shape)
    return vol


def particle_fields(shape=(64, 64, 64), moving_from_reference=None, *, per_particle=None, seed: int = 0,
                    edge_width: float = 0.7) -> dict:
    """Per-particle fields of the (optionally moved) two-particle phantom.

    The same geometry as :func:`two_particle_phantom` (same ``seed``, same
    motion arguments), split by particle so that callers can attach their own
    composition to each particle: ``two_particle_phantom(shape, M, seed=s)``
    equals ``clip(sum(level[k] * occupancy[k] * texture[k]), 0, 1)``.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid ``(Z, Y, X)``.
    moving_from_reference : (4, 4) array_like or SmoothWarp, optional
        Motion of the whole sample (``moving_from_reference``, voxel indices; or a non-rigid warp).
    per_particle : dict {label: (4, 4) array_like}, optional
        Motion of single particles (labels 1 and 2), as in :func:`two_particle_phantom`.
    seed : int
        Shape, pores and texture seed.
    edge_width : float
        Width of the soft particle edge in voxels.

    Returns
    -------
    dict
        ``occupancy`` : (P, Z, Y, X) float32 in [0, 1], soft inside indicator of each particle;
        ``texture`` : (P, Z, Y, X) float32 in [0.5, 1], grey-level texture (moves with the particle);
        ``coords`` : (P, Z, Y, X, 3) float32, the **reference-frame** position of each voxel
        relative to the particle centre, ``(z, y, x)``, in units of the particle radius
        (about 1 at the surface), so a composition defined on ``coords`` moves with the particle.
        Texture and coords are only evaluated near each particle (0 far from it, where
        the occupancy is below 1e-7);
        ``level`` : (P,) float64, mean grey level of each particle.
    """
    shape, params, center, half, inverses = _setup(shape, moving_from_reference, per_particle, seed)
    p = len(params)
    occupancy = np.zeros((p, *shape), dtype=np.float32)
    texture = np.zeros((p, *shape), dtype=np.float32)
    coords = np.zeros((p, *shape, 3), dtype=np.float32)
    for k, (par, inv) in enumerate(zip(params, inverses)):
        # Evaluate only in the moved particle's bounding box: beyond its largest radius
        # (shape modulation <= sum |amps|) plus 8 edge widths, the occupancy is below 1e-7.
        if callable(inv):  # a non-rigid warp: evaluate everywhere
            lo, hi = np.zeros(3, dtype=int), np.asarray(shape)
        else:
            fwd = np.linalg.inv(inv)
            c_ref = center + par["center"] * half
            r_vox = par["radius"] * half * (1.0 + np.abs(par["amps"]).sum()) + 8.0 * edge_width
            c_mov = fwd[:3, :3] @ c_ref + fwd[:3, 3]
            ext = r_vox * np.sqrt((fwd[:3, :3] ** 2).sum(axis=1))
            lo = np.maximum(np.floor(c_mov - ext).astype(int), 0)
            hi = np.minimum(np.ceil(c_mov + ext).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)]
        q = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        sub = tuple(int(b - a) for a, b in zip(lo, hi))
        for s0 in range(0, q.shape[0], _CHUNK):
            u = (to_reference(inv, q[s0:s0 + _CHUNK]) - center) / half
            flat_occ = _occupancy(u, par, half, edge_width)
            flat_tex = _texture(u, par)
            flat_uvw = (u - par["center"]) / par["radius"]
            idx = np.unravel_index(np.arange(s0, s0 + u.shape[0]), sub)
            gidx = tuple(i + a for i, a in zip(idx, lo))
            occupancy[k][gidx] = flat_occ
            texture[k][gidx] = flat_tex
            coords[k][gidx] = flat_uvw
    return {"occupancy": occupancy, "texture": texture, "coords": coords,
            "level": np.array([par["level"] for par in params])}


def _setup(shape, moving_from_reference, per_particle, seed):
    """Checked shape, seeded particle parameters, grid centre, half-size and per-particle inverse motions."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 axes of at least 8 voxels, got {shape}")
    rng = np.random.default_rng(seed)
    params = [_particle_params(rng, spec) for spec in PARTICLES]
    center = (np.asarray(shape, dtype=np.float64) - 1) / 2
    per_particle = per_particle or {}
    if hasattr(moving_from_reference, "reference_from_moving"):  # a warp (gpureg.synth.deform.SmoothWarp)
        if per_particle:
            raise ValueError("per_particle motion cannot be combined with a non-rigid warp")
        return shape, params, center, min(shape) / 2.0, [moving_from_reference.reference_from_moving] * len(params)
    default = np.eye(4) if moving_from_reference is None else np.asarray(moving_from_reference, dtype=np.float64)
    inverses = [np.linalg.inv(np.asarray(per_particle.get(k + 1, default), dtype=np.float64)) for k in range(len(params))]
    return shape, params, center, min(shape) / 2.0, inverses


def to_reference(inverse, q):
    """Reference-frame points of moving-grid points ``q`` (N, 3): ``inverse`` is a 4x4 matrix or a callable."""
    if callable(inverse):
        return inverse(q)
    return q @ inverse[:3, :3].T + inverse[:3, 3]


def _particle_params(rng, spec):
    dirs = rng.normal(size=(4, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pores = []
    for _ in range(5):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        pores.append((np.asarray(spec["center"]) + d * spec["radius"] * rng.uniform(0.2, 0.6),
                      spec["radius"] * rng.uniform(0.15, 0.3)))
    return {
        "center": np.asarray(spec["center"], dtype=np.float64),
        "radius": spec["radius"],
        "level": spec["level"],
        "dirs": dirs,
        "amps": rng.uniform(-0.18, 0.18, size=4),
        "pores": pores,
        "waves": rng.normal(size=(3, 3)) * 9.0,
        "phases": rng.uniform(0, 2 * np.pi, size=3),
    }


def _occupancy(u, par, half, width):
    d = u - par["center"]
    dist = np.sqrt((d * d).sum(axis=1))
    unit = d / np.maximum(dist, 1e-9)[:, None]
    cos = unit @ par["dirs"].T
    radius = par["radius"] * (1 + (par["amps"][:2] * cos[:, :2] ** 2).sum(1) + (par["amps"][2:] * cos[:, 2:] ** 3).sum(1))
    occ = _soft_step((radius - dist) * half / width)
    for pc, pr in par["pores"]:
        pd = np.sqrt(((u - pc) ** 2).sum(axis=1))
        occ *= 1.0 - _soft_step((pr - pd) * half / width)
    return occ


def _texture(u, par):
    arg = u @ par["waves"].T + par["phases"]
    return 0.75 + 0.25 * np.sin(arg).mean(axis=1)


def _soft_step(x):
    return 0.5 * (1.0 + np.tanh(x))
