"""Edge-energy maps of a whole aligned stack, slab by slab: :func:`edge_energy_map`.

The stack (an array, an HDF5 dataset or a list of volumes, energies in any
order) is read a slab of z-planes at a time and analysed by
:func:`gpureg.xanes.edge_energy` on the chosen device; the fit ranges and
the jump threshold are chosen once for the whole volume, so slabs agree.
With ``sigma``, slabs are read with a halo of ``4 psf`` planes for the
resolution term of the uncertainty (:mod:`gpureg.xanes.uncertainty`), whose
map-space parts are finished on the whole volume.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.backend import resolve_device, to_device, to_host, xp_of
from ..core.errors import InputError, ParameterError
from .edge import edge_energy, edge_ranges
from ..core.energies import check_energies
from .denoise import basis_from_moments, parse_denoise, project, residual_noise_factor, restore_residual
from .spectra import MIN_ENERGIES, auto_min_jump, crude_jump
from .uncertainty import PSF_VOXELS, half_crossing, local_mean, model_terms

__all__ = ["RESIDUAL_SMOOTHING", "edge_energy_map", "stack_basis", "stack_ranges"]

RESIDUAL_SMOOTHING = 1.5
"""Default Gaussian sigma (voxels) of :func:`edge_energy_map`'s residual restoration (see :mod:`gpureg.xanes.denoise`)."""

_log = logging.getLogger("gpureg")


def edge_energy_map(stack, energies, *, slab: int = 16, device: str = "auto", mask=None,
                    min_jump: float | None = None, pre=None, post=None, info: dict | None = None,
                    denoise=None, sigma: bool = True, psf: float = PSF_VOXELS, model: bool = True,
                    residual_smoothing: float = RESIDUAL_SMOOTHING, **kw) -> dict:
    """Edge-energy maps of a whole energy stack, processed in z-slabs (bounded memory).

    Parameters
    ----------
    stack : (n_energy, Z, Y, X) array-like, or sequence of n_energy (Z, Y, X) volumes
        NumPy/CuPy array, ``numpy.memmap``, h5py dataset, or a list whose
        items support ``item[z0:z1]``. Only one z-slab of every energy is
        read at a time.
    energies : (n_energy,) array_like
        eV, distinct. When not increasing, the stack is read in increasing
        energy order (results are the same).
    slab : int
        z-planes per slab: a slab holds ``n_energy * slab * Y * X`` float32
        values plus about the same again in temporaries.
    device : {"auto", "cpu", "gpu"}
        Where the maps are computed (slabs are moved there).
    mask : (Z, Y, X) array_like of bool, optional
        Extra mask ANDed into the result (e.g. the binarized reference).
    min_jump : float, optional
        Jump threshold; by default chosen once for the whole volume (same
        rule as :func:`edge_energy`), so slabs agree.
    pre, post : (float, float), optional
        Fit ranges (eV). By default chosen once from the grid, or from the
        mean spectrum of a few z-planes (see :func:`edge_ranges`).
    info : dict, optional
        Filled with what was used: ``pre``, ``post``, ``e0``, ``rule`` (see
        :func:`edge_ranges`), ``min_jump`` (the threshold applied), ``device``,
        ``basis`` (the :class:`~gpureg.xanes.denoise.SpectralBasis`), ``denoise``.
    denoise : {"auto", None} or int
        Spectral denoising before the maps (:mod:`gpureg.xanes.denoise`):
        components chosen from the data, a given number, or none.
    sigma : bool
        Also map ``edge_energy_sigma``: the noise (from the residual of the
        spectral basis) propagated to the crossing, and the model error
        (:mod:`gpureg.xanes.uncertainty`) added in quadrature.
    psf : float
        Gaussian standard deviation (voxels) of the spatial mixing whose
        effect on the crossing is the model error's resolution term (default
        :data:`~gpureg.xanes.uncertainty.PSF_VOXELS`, measured on simulated
        scans); 0 leaves that term out. Set it to the imaging's resolution
        in voxels for other data.
    model : bool
        Add the model error (interpolation and resolution) to the noise in
        ``edge_energy_sigma``; False maps the noise alone.
    residual_smoothing : float
        With ``denoise``: Gaussian sigma (voxels) of the neighbourhood from
        which the spatially coherent part of the residual to the components is
        restored (:func:`gpureg.xanes.denoise.restore_residual`); 0: the
        plain projection. Slabs are read with that many planes more on
        each side (4 sigma), so the result does not depend on ``slab``.
    **kw
        ``method``, ``smooth``, ``e0``: passed to :func:`edge_energy`.

    Returns
    -------
    dict of (Z, Y, X) NumPy arrays
        As :func:`edge_energy`, on the host.
    """
    if not isinstance(slab, (int, np.integer)) or slab < 1:
        raise ParameterError(f"edge_energy_map: slab must be a positive integer, got {slab!r}")
    unknown = set(kw) - {"method", "smooth", "e0"}
    if unknown:
        raise TypeError(f"edge_energy_map: unexpected keyword(s) {sorted(unknown)}")
    E_in = check_energies(energies, min_count=MIN_ENERGIES)  # any order: the slabs are read sorted
    order = np.argsort(E_in, kind="stable")
    E = E_in[order]
    read, shape = _slab_reader(stack, E.size, order)
    dev = resolve_device(device)
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"edge_energy_map: mask must have the volume shape {shape}, got {tuple(mask.shape)}")
    rng = stack_ranges(read, shape, E, pre, post, kw.get("e0"))
    kw["e0"] = rng["e0"]
    denoise = parse_denoise(denoise)
    if not residual_smoothing >= 0:
        raise ParameterError(f"edge_energy_map: residual_smoothing must be >= 0 voxels, got {residual_smoothing!r}")
    if not psf >= 0:
        raise ParameterError(f"edge_energy_map: psf must be >= 0 voxels, got {psf!r}")
    basis, thr_crude = None, None
    if denoise is not None or (sigma and kw.get("method", "half") != "derivative"):
        thr_crude = crude_jump_threshold(read, shape, E)
        basis = stack_basis(read, shape, E, "auto" if denoise is None else denoise, threshold=thr_crude)
    restore = denoise is not None and residual_smoothing > 0
    # planes read beyond the slab on each side (scipy's Gaussian radius): the restoration's neighbourhood, and
    # the model error's PSF around the restored spectra
    halo = int(4.0 * psf + 0.5) if (sigma and model and basis is not None) else 0
    halo += int(4.0 * float(residual_smoothing) + 0.5) if restore else 0
    components = None
    if denoise is not None:
        components = basis.components
        if restore:   # the restored residual's noise: a fraction of the residual's (interior, independent voxels)
            q = np.linalg.svd(np.eye(E.size) - components @ components.T)[0][:, :E.size - basis.k]
            components = np.hstack([components, residual_noise_factor(residual_smoothing) * q])
    out = None
    raw_edge = np.full((2, *shape), np.nan, np.float32) if denoise is not None else None
    model_maps = {k: np.zeros(shape, np.float32) for k in ("grid", "mixing")}
    for z0 in range(0, shape[0], int(slab)):
        z1 = min(shape[0], z0 + int(slab))
        h0, h1 = max(0, z0 - halo), min(shape[0], z1 + halo)
        sub = to_device(read(h0, h1), dev, dtype=np.float32)
        sub_mask = None if mask is None else to_device(np.asarray(to_host(mask[z0:z1]), dtype=bool), dev)
        extra, mix = {}, None
        if basis is not None:
            xp = xp_of(sub)
            mu = sub.reshape(E.size, -1)
            ok = xp.isfinite(mu).all(axis=0)
            mu = xp.where(ok[None, :], mu, xp.float32(0))
            if restore:
                weight = ok & (crude_jump(mu) > thr_crude)
                y, noise = restore_residual(xp, mu, basis, sub.shape[1:], residual_smoothing, weight=weight)
            else:
                y, noise = project(xp, mu, basis)
            y = xp.where(ok[None, :], y, xp.float32(np.nan)).reshape(sub.shape)
            if denoise is not None:
                if sigma and model and psf > 0:   # the raw crossing and its noise, for the denoising's own error
                    raw = edge_energy(xp.nan_to_num(sub[:, z0 - h0:z1 - h0]), E, pre=rng["pre"], post=rng["post"],
                                      min_jump=0.0, e0=rng["e0"], noise=noise.reshape(sub.shape[1:])[z0 - h0:z1 - h0],
                                      noise_profile=basis.noise_profile, model=False)
                    raw_edge[0][z0:z1] = to_host(raw["edge_energy"])
                    raw_edge[1][z0:z1] = to_host(raw["edge_energy_sigma"])
                    del raw
                sub = y
            if sigma:
                extra = {"noise": noise.reshape(sub.shape[1:])[z0 - h0:z1 - h0],
                         "noise_components": components,
                         "noise_profile": basis.noise_profile, "model": False}
                if model:   # model error: read from the signal (the projection), on the voxels of this slab
                    inner = (slice(None), slice(z0 - h0, z1 - h0))
                    mix = local_mean(y, psf)[inner] if psf > 0 else None
                    if denoise is not None:   # the map's spectra are the signal: the map brings the grid term
                        extra["model"] = True
                    else:
                        terms = model_terms(xp, xp.nan_to_num(y[inner].reshape(E.size, -1)),
                                            None if mix is None else xp.nan_to_num(mix.reshape(E.size, -1)), E, rng)
                        for k, v in terms.items():
                            model_maps[k][z0:z1] = to_host(v).reshape(z1 - z0, *shape[1:])
                        mix = None
            del y
        sub = sub[:, z0 - h0:z1 - h0]
        try:
            res = edge_energy(sub, E, pre=rng["pre"], post=rng["post"], min_jump=0.0, mask=sub_mask, **kw, **extra)
        except ValueError as exc:
            if "none of the" not in str(exc):
                raise
            res = None   # an all-NaN slab: leave it masked
        if out is None:
            keys = ("edge_energy", "edge_jump", "white_line", "mask")
            keys += ("edge_ambiguous",) if kw.get("method", "half") != "derivative" else ()
            keys += ("e0_derivative",) if kw.get("method") == "both" else ()
            keys += ("edge_energy_sigma",) if extra else ()
            out = {k: (np.zeros(shape, bool) if k in ("mask", "edge_ambiguous") else np.full(shape, np.nan, np.float32))
                   for k in keys}
        if res is not None:
            for k, v in res.items():
                out[k][z0:z1] = to_host(v)
            if mix is not None:    # denoised: the crossing's change under one more mixing, from the map's crossing
                e_mix = half_crossing(xp, xp.nan_to_num(mix.reshape(E.size, -1)), E, rng).reshape(mix.shape[1:])
                model_maps["mixing"][z0:z1] = to_host(xp.nan_to_num(res["edge_energy"] - e_mix))
        del sub, res
    if "edge_energy_sigma" in out and model:
        out["edge_energy_sigma"] = _with_model_error(out["edge_energy_sigma"], out["edge_energy"], model_maps,
                                                     raw_edge, psf)
    valid = out["mask"]
    finite = np.isfinite(out["edge_jump"])
    if not finite.any():
        raise InputError("edge_energy_map: no voxel has a finite spectrum at every energy (all NaN/inf)")
    thr = auto_min_jump(np, out["edge_jump"][finite]) if min_jump is None else float(min_jump)
    valid &= out["edge_jump"] > thr
    if "edge_ambiguous" in out:
        out["edge_ambiguous"] &= out["edge_jump"] > thr
    for k in ("edge_energy", "white_line", "e0_derivative", "edge_energy_sigma"):
        if k in out:
            out[k][~valid] = np.nan
    if info is not None:
        info.update(pre=rng["pre"], post=rng["post"], e0=float(kw["e0"]), rule=rng["rule"], min_jump=float(thr),
                    device=dev, basis=basis, denoise=denoise,
                    residual_smoothing=float(residual_smoothing) if restore else 0.0, psf=float(psf))
    _log.info("edge_energy_map: %d of %d voxels valid (min_jump %.4g, ranges pre %s post %s, %s)",
              int(valid.sum()), valid.size, thr, rng["pre"], rng["post"], rng["rule"])
    return out


def _with_model_error(noise, edge, terms, raw_edge, psf):
    """``sqrt(noise^2 + grid^2 + resolution^2 + denoising^2)`` (:mod:`gpureg.xanes.uncertainty`), host maps.

    Resolution: the crossing's change under one more mixing with the PSF, ``m = (K - 1) K e`` to first order
    (K the PSF's convolution, e the voxels' true edge energies), while the error is ``(K - 1) e``:
    ``K^-1 = sum (1 - K)^n``, two terms, gives ``(2 - K) m``. Denoising (when ``raw_edge`` is given): the change
    it made to the crossing (``raw_edge[0]``), averaged over the PSF neighbourhood, less the noise of that
    average (the change's noise is ``raw_edge[1]^2 - noise^2``, the part of the raw noise outside the basis;
    averaged as if independent from voxel to voxel; ``noise`` of a denoised map also holds its grid term, so
    slightly less is subtracted; the weights' sum of squares is 0.069 at 0.7 voxel)."""
    total = noise ** 2 + terms["grid"] ** 2
    if psf > 0:
        m = terms["mixing"]
        total += (2 * m - np.nan_to_num(local_mean(np.where(np.isfinite(edge), m, np.nan), psf))) ** 2
        if raw_edge is not None:
            d = local_mean(raw_edge[0] - edge, psf)
            var = local_mean(np.where(np.isfinite(edge), raw_edge[1] ** 2 - noise ** 2, np.nan), psf)
            total += np.nan_to_num(np.maximum(d * d - residual_noise_factor(psf) ** 2 * var, 0))
    return np.sqrt(total).astype(np.float32)


def volume_getter(stack, n_e):
    if hasattr(stack, "ndim") and not isinstance(stack, (list, tuple)):
        if stack.ndim != 4 or stack.shape[0] != n_e:
            raise ValueError(f"stack must have shape (n_energy={n_e}, Z, Y, X), got {tuple(stack.shape)}")
        return (lambda i: stack[i]), tuple(int(s) for s in stack.shape[1:])
    if len(stack) != n_e:
        raise ValueError(f"stack holds {len(stack)} volumes but {n_e} energies were given")
    return (lambda i: stack[i]), tuple(int(s) for s in stack[0].shape)


class Reordered:
    """Read-only view of a 4D stack with its first axis permuted (for unsorted energies)."""

    def __init__(self, ds, order):
        self.ds, self.order = ds, np.asarray(order)
        self.shape, self.ndim = tuple(ds.shape), 4

    def __getitem__(self, i):
        return self.ds[int(self.order[i])]


def crude_jump_threshold(read, shape, E, *, planes: int = 16) -> float:
    """``0.1 x`` the 99.5th percentile of the :func:`crude_jump` of up to ``planes`` evenly spaced z-planes."""
    zs = sorted({round(z) for z in np.linspace(0, shape[0] - 1, min(shape[0], planes))})
    cols = []
    for z in zs:
        sub = np.asarray(to_host(read(z, z + 1)), dtype=np.float32).reshape(E.size, -1)
        cols.append(crude_jump(sub[:, np.isfinite(sub).all(axis=0)]))
    return float(auto_min_jump(np, np.concatenate(cols)))


def stack_basis(read, shape, E, components, *, planes: int = 16, slab: int = 16, threshold: float | None = None):
    """:class:`~gpureg.xanes.denoise.SpectralBasis` of a whole stack: mean and covariance summed slab by slab
    over every voxel with an edge (crude jump, last 3 minus first 3 energies, above 0.1 x its 99.5th
    percentile, the percentile from up to ``planes`` evenly spaced z-planes). All voxels, not a sample: the
    weak components' directions are estimated from noisy spectra, and from a third of a 48^3 scan the third
    one was off by 10 degrees, which moved a particle's median edge energy by 0.03-0.07 eV (bench/denoise.py,
    seed 1, 1000 photons)."""
    thr = crude_jump_threshold(read, shape, E, planes=planes) if threshold is None else float(threshold)
    s1, s2, m = _moments(read, shape, E, slab, thr)
    if m < 2 * E.size:   # too few voxels with an edge: every finite spectrum (a second pass, rarely needed)
        s1, s2, m = _moments(read, shape, E, slab, None)
    if m < 2:
        raise InputError(f"stack_basis: need at least 2 finite voxel spectra, got {m}")
    mean = s1 / m
    return basis_from_moments(mean, s2 / m - np.outer(mean, mean), m, components,
                              max_components=min(20, E.size - 1))


def _moments(read, shape, E, slab, threshold):
    """Sum, sum of outer products and count of the finite voxel spectra whose crude jump exceeds ``threshold``
    (all of them for None), read slab by slab (float64)."""
    s1, s2, m = np.zeros(E.size), np.zeros((E.size, E.size)), 0
    for z0 in range(0, shape[0], slab):
        X = np.asarray(to_host(read(z0, min(shape[0], z0 + slab))), dtype=np.float64).reshape(E.size, -1)
        X = X[:, np.isfinite(X).all(axis=0)]
        if threshold is not None:
            X = X[:, crude_jump(X) > threshold]
        s1, s2, m = s1 + X.sum(axis=1), s2 + X @ X.T, m + X.shape[1]
    return s1, s2, m


def stack_ranges(read, shape, E, pre=None, post=None, e0=None):
    """Common E0 and fit ranges for a whole stack (:func:`edge_ranges`), E0 from the mean spectrum of <= 5
    z-planes unless given."""
    if e0 is not None:
        return edge_ranges(E, pre=pre, post=post, e0=e0)
    planes = sorted({int(round(z)) for z in np.linspace(0, shape[0] - 1, min(shape[0], 5))})
    acc, count = np.zeros(E.size), 0
    for z in planes:
        sub = np.asarray(to_host(read(z, z + 1)), dtype=np.float64).reshape(E.size, -1)
        ok = np.isfinite(sub).all(axis=0)
        acc += sub[:, ok].sum(axis=1)
        count += int(ok.sum())
    return edge_ranges(E, acc / count if count else None, pre=pre, post=post)


def _slab_reader(stack, n_e, order):
    """``read(z0, z1) -> (n_e, z1 - z0, Y, X)`` in ``order`` of energies, and the volume shape."""
    if hasattr(stack, "shape") and hasattr(stack, "ndim") and not isinstance(stack, (list, tuple)):
        if stack.ndim != 4 or stack.shape[0] != n_e:
            raise ValueError(f"stack must have shape (n_energy={n_e}, Z, Y, X), got {tuple(stack.shape)}")
        shape = tuple(int(s) for s in stack.shape[1:])
        identity = bool((order == np.arange(n_e)).all())

        def read(z0, z1):
            sub = stack[:, z0:z1]
            return sub if identity else sub[order]
        return read, shape
    try:
        n = len(stack)
    except TypeError:
        raise ValueError(f"stack must be an (n_energy, Z, Y, X) array or a sequence of volumes, "
                         f"got {type(stack)!r}") from None
    if n != n_e:
        raise ValueError(f"stack holds {n} volumes but {n_e} energies were given")
    first = stack[0]
    if len(first.shape) != 3:
        raise ValueError(f"stack volumes must be 3D (Z, Y, X), got shape {tuple(first.shape)}")
    shape = tuple(int(s) for s in first.shape)

    def read(z0, z1):
        parts = [stack[int(i)] for i in order]
        for p in parts:
            if tuple(p.shape) != shape:
                raise ValueError(f"stack volumes differ in shape: {tuple(p.shape)} vs {shape}")
        xp = xp_of(parts[0])
        return xp.stack([xp.asarray(p[z0:z1]) for p in parts])
    return read, shape
