"""Chemical maps of a whole energy stack in z-slabs: reference fractions (LCF) and k-means clusters.

Like :func:`gpureg.xanes.stack.edge_energy_map`, only one z-slab of every
energy is in (device) memory at a time. Per slab the voxel spectra are
normalised with Larch's ``pre_edge`` (:mod:`gpureg.xanes.preedge`) and fitted
to the references (:class:`gpureg.xanes.lcf.LinearCombination`, built once).
Clustering needs every voxel's class to agree across slabs, so k-means is
trained on a seeded random sample of the voxels (at most ``sample``, drawn
slab by slab in the first pass) and every voxel is then assigned to the nearest
centroid in a second pass; centroid spectra are the means of all members.

Unless a ``mask`` is given, voxels whose edge step is at or below ``min_step``
(default: 0.1 x the 99.5th percentile of the steps, chosen once for the
volume after the first pass) are left out.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.backend import get_xp, resolve_device, to_device, to_host
from ..core.energies import check_energies
from ..core.errors import InputError, ParameterError
from .cluster import Components, assign_clusters, kmeans, order_clusters, pca_columns
from .lcf import LinearCombination, normalisation_noise_map, prepare_references
from .preedge import normalisation_functionals
from .preedge import pre_edge
from .spectra import MIN_ENERGIES, auto_min_jump
from .denoise import SpectralBasis, parse_denoise, project
from .stack import stack_basis, stack_ranges

__all__ = ["chemistry_map"]

_log = logging.getLogger("gpureg")


def chemistry_map(stack, energies, *, references=None, names=None, k: int | None = None,
                  n_components: int | None = None, offset: bool = True, sum_to_one: bool = False,
                  nonneg: bool = True, use: str = "norm", fit_range=None, mask=None, min_step: float | None = None,
                  slab: int = 16, device: str = "auto", sample: int = 100_000, seed: int = 0,
                  info: dict | None = None, e0=None, column=None, denoise=None) -> dict:
    """Reference fractions and/or k-means clusters of every voxel of an energy stack.

    Parameters
    ----------
    stack : (n_energy, Z, Y, X) array-like, or sequence of n_energy (Z, Y, X) volumes
        NumPy/CuPy array, memmap, h5py dataset or list; read one z-slab at a time.
    energies : (n_energy,) array_like
        eV, distinct (the stack is read in increasing energy order).
    references : sequence, optional
        Reference spectra (see :func:`gpureg.xanes.lcf.fit_references`); no LCF without.
    names : sequence of str, optional
        Reference names.
    k : int, optional
        Number of k-means clusters (>= 2); no clustering without.
    n_components : int, optional
        Cluster PCA scores (fitted on the sample) instead of spectra.
    offset, sum_to_one, nonneg, use, fit_range
        As :func:`gpureg.xanes.lcf.fit_references`.
    mask : (Z, Y, X) array_like of bool, optional
        Voxels to analyse (e.g. ``/xanes/mask``); default: edge step above ``min_step``.
    min_step : float, optional
        Edge-step threshold when no mask is given.
    slab : int
        z-planes per slab.
    device : {"auto", "cpu", "gpu"}
    sample : int
        Voxels k-means is trained on.
    seed : int
        Sampling and k-means++ seed.
    info : dict, optional
        Filled with ``min_step``, ``device``, ``n_voxels``, ``e0``.
    e0 : float, optional
        The common E0 (eV) of data and references; default Larch's
        ``find_e0`` of the mean spectrum of up to 5 z-planes (as the edge maps).
    column : str, optional
        ``mu`` column of reference files.
    denoise : SpectralBasis, "auto" or int, optional
        Spectral denoising of every slab before the fits
        (:mod:`gpureg.xanes.denoise`): a basis (e.g. the edge map's), or
        estimated here from up to 16 z-planes.

    Returns
    -------
    dict of host arrays
        Always ``e0``, ``edge_step`` (Z, Y, X) float32 and ``mask`` (bool).
        With references: ``fractions`` (n_refs, Z, Y, X), ``residual``,
        ``r_factor`` (and ``offset``) float32, NaN outside the mask,
        ``reference_names`` (list), ``references`` (n_energy, n_refs) normalised,
        ``fractions_stderr`` (n_refs, Z, Y, X) standard errors.
        With ``k``: ``clusters`` (Z, Y, X) int32 (1..k, 0 outside),
        ``centroids`` (k, n_energy), ``cluster_counts`` (k,), and with
        ``n_components`` the PCA ``loadings``/``explained_variance_ratio``.
    """
    if references is None and k is None:
        raise ParameterError("chemistry_map: give references= (LCF) and/or k= (clusters)")
    if k is not None and (not isinstance(k, (int, np.integer)) or k < 2):
        raise ParameterError(f"clusters: k must be an integer >= 2, got {k!r}")
    if not isinstance(slab, (int, np.integer)) or slab < 1:
        raise ParameterError(f"chemistry_map: slab must be a positive integer, got {slab!r}")
    E_in = check_energies(energies, min_count=MIN_ENERGIES)
    order = np.argsort(E_in, kind="stable")
    E = E_in[order]
    read, shape = _reader(stack, E.size, order)
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"chemistry_map: mask must have the volume shape {shape}, got {tuple(mask.shape)}")
    dev = resolve_device(device)
    xp = get_xp(dev)
    flat = use == "flat"
    if e0 is None:
        e0 = stack_ranges(read, shape, E)["e0"]
    basis = denoise
    if denoise is not None and not isinstance(denoise, SpectralBasis):
        basis = stack_basis(read, shape, E, parse_denoise(denoise) or "auto")
    out = {"e0": np.full(shape, np.nan, np.float32), "edge_step": np.full(shape, np.nan, np.float32)}
    solver = None
    if references is not None:
        rnames, A = prepare_references(references, E, use=use, names=names, e0=e0, column=column)
        solver = LinearCombination(A, E, offset=offset, sum_to_one=sum_to_one, nonneg=nonneg, fit_range=fit_range,
                                   noise_map=normalisation_noise_map(E, e0, A), whiten=True,
                                   step_noise=(A.mean(axis=1), normalisation_functionals(E, e0)[2]))
        out.update(fractions=np.full((len(rnames), *shape), np.nan, np.float32),
                   fractions_stderr=np.full((len(rnames), *shape), np.nan, np.float32),
                   residual=np.full(shape, np.nan, np.float32), r_factor=np.full(shape, np.nan, np.float32),
                   reference_names=list(rnames), references=A)
        if offset:
            out["offset"] = np.full(shape, np.nan, np.float32)
    n_total = int(np.prod(shape))
    rng = np.random.default_rng([int(seed), 4242])
    keep = min(1.0, int(sample) / max(n_total, 1))
    samples, sample_steps = [], []
    slabs = [(z0, min(shape[0], z0 + int(slab))) for z0 in range(0, shape[0], int(slab))]
    for z0, z1 in slabs:
        y, valid, _ = _normalised_slab(xp, read, z0, z1, E, dev, mask, flat, out, e0, basis)
        if solver is not None and bool(valid.any()):
            x, res, rf, se = solver.solve(xp, y[:, valid], stderr=True)
            idx = np.flatnonzero(to_host(valid))
            n_r = len(out["reference_names"])
            plane = (z1 - z0,) + shape[1:]
            for key, val in (("residual", res), ("r_factor", rf)) + ((("offset", x[len(out["reference_names"])]),) if offset else ()):
                buf = np.full(int(np.prod(plane)), np.nan, np.float32)
                buf[idx] = to_host(val)
                out[key][z0:z1] = buf.reshape(plane)
            fr = np.full((n_r, int(np.prod(plane))), np.nan, np.float32)
            fr[:, idx] = to_host(x[:n_r])
            out["fractions"][:, z0:z1] = fr.reshape((n_r,) + plane)
            fr[:, idx] = to_host(se[:n_r])
            out["fractions_stderr"][:, z0:z1] = fr.reshape((n_r,) + plane)
        if k is not None and bool(valid.any()):
            idx = np.flatnonzero(to_host(valid))
            pick = idx[rng.random(idx.size) < keep]
            if pick.size:
                samples.append(to_host(y[:, xp.asarray(pick)]))
                sample_steps.append(out["edge_step"][z0:z1].reshape(-1)[pick])
        del y, valid
    step = out["edge_step"]
    finite = np.isfinite(step)
    if mask is None:
        thr = auto_min_jump(np, step[finite]) if min_step is None else float(min_step)
        use_mask = finite & (np.where(finite, step, 0) > thr)
    else:
        thr = None
        use_mask = finite & np.asarray(to_host(mask), dtype=bool)
    if not use_mask.any():
        raise InputError("chemistry_map: no voxel left to analyse (all masked, non-finite or below the edge-step "
                         "threshold)")
    out["mask"] = use_mask
    if solver is not None:
        for key in ("fractions", "fractions_stderr", "residual", "r_factor", "offset"):
            if key in out:
                out[key][..., ~use_mask] = np.nan
    if k is not None:
        _clusters(xp, read, slabs, E, dev, mask, flat, out, samples, sample_steps, thr, int(k), n_components, seed,
                  e0, basis)
    if info is not None:
        info.update(min_step=thr, device=dev, n_voxels=int(use_mask.sum()), e0=float(e0))
    _log.info("chemistry_map: %d of %d voxels analysed (%s)", int(use_mask.sum()), n_total, dev)
    return out


# --------------------------------------------------------------------------- helpers

def _normalised_slab(xp, read, z0, z1, E, dev, mask, flat, out, e0, basis):
    """Normalised spectra of a slab (n, M) on the device, voxels normalised (M,), the slab mask; fills e0/step."""
    sub = to_device(read(z0, z1), dev, dtype=np.float32)
    mu = sub.reshape(E.size, -1)
    if basis is not None:
        ok = xp.isfinite(mu).all(axis=0)
        y, _ = project(xp, xp.where(ok[None, :], mu, xp.float32(0)), basis)
        mu = xp.where(ok[None, :], y, xp.float32(np.nan))
    sub_mask = None
    if mask is not None:
        sub_mask = to_device(np.asarray(to_host(mask[z0:z1]), dtype=bool), dev).reshape(-1)
    pe = pre_edge(mu, E, flatten=flat, mask=sub_mask, e0=e0)
    y = pe["flat" if flat else "norm"]
    out["e0"][z0:z1] = to_host(pe["e0"]).reshape(out["e0"][z0:z1].shape)
    out["edge_step"][z0:z1] = to_host(pe["edge_step"]).reshape(out["e0"][z0:z1].shape)
    valid = xp.isfinite(y).all(axis=0)
    return y, valid, sub_mask


def _clusters(xp, read, slabs, E, dev, mask, flat, out, samples, sample_steps, thr, k, n_components, seed, e0,
              basis):
    if not samples:
        raise InputError("clusters: no voxel to cluster")
    S = np.concatenate(samples, axis=1)
    st = np.concatenate(sample_steps)
    if thr is not None:
        S = S[:, st > thr]
    if k > S.shape[1]:
        raise ParameterError(f"clusters: k={k} exceeds the {S.shape[1]} voxels sampled to cluster")
    X = xp.asarray(S.astype(np.float32))
    comp = None
    L = mean = None
    if n_components is not None:
        c, X = pca_columns(xp, X, int(n_components))
        comp = Components(scores=None, **c)
        L, mean = xp.asarray(c["loadings"].astype(np.float32)), xp.asarray(c["mean"].astype(np.float32))
    centers, _, inertia = kmeans(X, k, seed=seed)
    shape = out["e0"].shape
    labels = np.zeros(shape, np.int32)
    sums = np.zeros((k, E.size))
    counts = np.zeros(k, np.int64)
    for z0, z1 in slabs:
        scratch = {"e0": np.empty(shape, np.float32), "edge_step": np.empty(shape, np.float32)}
        y, _, _ = _normalised_slab(xp, read, z0, z1, E, dev, mask, flat, scratch, e0, basis)
        m = out["mask"][z0:z1].reshape(-1)
        idx = np.flatnonzero(m)
        if idx.size == 0:
            continue
        Y = y[:, xp.asarray(idx)]
        Xs = Y if L is None else L @ (Y - mean[:, None])
        lab, _ = assign_clusters(Xs, centers)
        lab_h = np.asarray(to_host(lab))
        buf = np.zeros(m.size, np.int32)
        buf[idx] = lab_h + 1
        labels[z0:z1] = buf.reshape(labels[z0:z1].shape)
        onehot = (lab[None, :] == xp.arange(k)[:, None]).astype(xp.float32)
        sums += np.asarray(to_host(onehot @ Y.T), dtype=np.float64)
        counts += np.asarray(to_host(onehot.sum(axis=1))).astype(np.int64)
    centroids = sums / np.maximum(counts, 1)[:, None]
    perm = order_clusters(centroids, E)
    rank = np.zeros(k + 1, np.int32)
    rank[perm + 1] = np.arange(1, k + 1, dtype=np.int32)
    out["clusters"] = rank[labels]
    out["centroids"] = centroids[perm]
    out["cluster_counts"] = counts[perm]
    out["cluster_inertia_sample"] = float(inertia)
    if comp is not None:
        out["loadings"] = comp.loadings
        out["explained_variance_ratio"] = comp.explained_variance_ratio


def _reader(stack, n_e, order):
    """``read(z0, z1) -> (n_e, z1 - z0, Y, X)`` in increasing energy, and the volume shape."""
    if hasattr(stack, "shape") and hasattr(stack, "ndim") and not isinstance(stack, (list, tuple)):
        if stack.ndim != 4 or stack.shape[0] != n_e:
            raise ValueError(f"stack must have shape (n_energy={n_e}, Z, Y, X), got {tuple(stack.shape)}")
        ident = bool((order == np.arange(n_e)).all())

        def read(z0, z1):
            sub = stack[:, z0:z1]
            return sub if ident else sub[order]
        return read, tuple(int(s) for s in stack.shape[1:])
    if len(stack) != n_e:
        raise ValueError(f"stack holds {len(stack)} volumes but {n_e} energies were given")
    shape = tuple(int(s) for s in stack[0].shape)
    if len(shape) != 3:
        raise ValueError(f"stack volumes must be 3D (Z, Y, X), got shape {shape}")

    def read(z0, z1):
        return np.stack([np.asarray(to_host(stack[int(i)][z0:z1])) for i in order])
    return read, shape
