"""Per-voxel XANES analysis: normalisation, edge energy, edge jump and white line.

Every voxel of an aligned energy stack carries an absorption spectrum
``mu(E)``. This module normalises it the usual way (Athena/Larch): a line is
fitted to the pre-edge and another to the post-edge region, the pre-edge line
is subtracted and the result divided by the edge jump (post-line minus
pre-line at the edge). From the normalised spectrum it measures

* the **edge energy**: where the normalised spectrum first crosses 0.5
  (linear interpolation between samples, ``method="half"``), or where
  ``dmu/dE`` is largest after light Gaussian smoothing (the Larch ``E0``
  definition, ``method="derivative"``; parabolic refinement of the peak);
* the **edge jump** (in the units of the input);
* the **white-line** energy: peak of the normalised spectrum above the edge.

Voxels whose jump is too small (background) or whose spectrum has a non-finite
value are masked out.

Convention
----------
Spectra are ``(n_energy, ...)`` with the energy axis first; maps have shape
``spectra.shape[1:]``. Energies are in eV and strictly increasing. All array
code is written once against ``xp`` (NumPy or CuPy): results come back on the
input's device. The line fits are the same linear map for every voxel, so they
are one small matrix product ``(4, n_energy) @ (n_energy, n_voxel)``; the
edge search runs only over the energies between the two fit ranges.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..core.backend import to_host
from ..io.base import check_energies
from .spectra import (MIN_ENERGIES, POST_GAP_EV, PRE_GAP_EV, auto_min_jump, fine_region, line_weights, snap_range,
                      spectra_matrix)

__all__ = ["edge_energy", "edge_ranges", "METHODS", "normalize"]

METHODS = ("half", "derivative", "both")


_log = logging.getLogger("gpureg")


def edge_ranges(energies, spectrum=None, *, pre=None, post=None) -> dict:
    """Pre-edge and post-edge fit ranges (eV) chosen from the energy grid.

    Rules, in order:

    1. ``pre`` / ``post`` given: used as they are (each must hold >= 2 energies).
    2. The grid has a distinct fine-step region (steps <= 0.6 x the largest
       step, >= 4 steps long, with >= 2 coarse energies on each side), as
       beamline scans put fine steps across the edge: the pre-edge range is
       every energy up to the region's start, the post-edge range every energy
       from its end.
    3. Otherwise the edge ``e0`` is estimated from ``spectrum`` (maximum of its
       derivative) and the ranges are ``E <= e0 - 20 eV`` and ``E >= e0 + 40 eV``.
    4. Failing that (no spectrum, or a range would hold < 2 energies): the
       first sixth and the last quarter of the grid (at least 2 energies each),
       with a warning.

    Parameters
    ----------
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    spectrum : (n_energy,) array_like, optional
        A representative spectrum (e.g. the mean over voxels), for rule 3.
    pre, post : (float, float), optional
        Inclusive energy ranges (eV) that override the automatic choice.

    Returns
    -------
    dict
        ``pre`` and ``post``: ``(lo, hi)`` in eV (inclusive, snapped to grid
        energies); ``e0``: a reference edge energy (eV) used to start the
        jump estimate; ``rule``: which rule chose the ranges.
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    n = E.size
    rule = "given"
    e0 = None
    if pre is None or post is None:
        auto = fine_region(E)
        rule = "fine-step region of the grid"
        if auto is None and spectrum is not None:
            spec = np.asarray(to_host(spectrum), dtype=np.float64)
            if spec.shape != E.shape:
                raise ValueError(f"edge_ranges: spectrum must have shape {E.shape}, got {spec.shape}")
            if np.isfinite(spec).all():
                e0 = _derivative_peak_1d(E, spec)
                lo_idx = np.flatnonzero(E <= e0 - PRE_GAP_EV)
                hi_idx = np.flatnonzero(E >= e0 + POST_GAP_EV)
                if lo_idx.size >= 2 and hi_idx.size >= 2:
                    auto = (E[0], E[lo_idx[-1]], E[hi_idx[0]], E[-1])
                    rule = "edge of the mean spectrum +- gaps"
        if auto is None:
            k_pre, k_post = max(2, n // 6), max(2, n // 4)
            if k_pre + k_post + 1 > n:
                raise ValueError(f"edge_ranges: {n} energies are too few to fit pre-edge and post-edge lines "
                                 f"(need at least 5)")
            auto = (E[0], E[k_pre - 1], E[n - k_post], E[-1])
            rule = "grid fractions (fallback)"
            warnings.warn(f"edge_ranges: no fine-step region in the energy grid and no usable spectrum; using the "
                          f"first {k_pre} energies as pre-edge and the last {k_post} as post-edge "
                          f"(pass pre=/post= to choose)", stacklevel=2)
        pre = (auto[0], auto[1]) if pre is None else pre
        post = (auto[2], auto[3]) if post is None else post
    pre = snap_range(E, pre, "pre")
    post = snap_range(E, post, "post")
    if pre[1] >= post[0]:
        raise ValueError(f"edge_ranges: pre-edge range {pre} must end below the post-edge range {post}")
    i_lo, i_hi = int(np.searchsorted(E, pre[1])), int(np.searchsorted(E, post[0]))
    if i_hi - i_lo < 2:
        raise ValueError(f"edge_ranges: no energy lies between the pre-edge range {pre} and the post-edge range "
                         f"{post}; the edge cannot be located")
    if e0 is None or not (pre[1] < e0 < post[0]):
        e0 = 0.5 * (pre[1] + post[0])
    return {"pre": pre, "post": post, "e0": float(e0), "rule": rule}


def edge_energy(spectra, energies, *, method: str = "half", pre=None, post=None, min_jump: float | None = None,
                smooth: float = 1.0, mask=None, e0: float | None = None) -> dict:
    """Per-spectrum edge energy, edge jump and white-line energy.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy; absorption ``mu`` per energy (any units, e.g. the
        reconstructed attenuation). Converted to float32.
    energies : (n_energy,) array_like
        Strictly increasing, eV; at least 5.
    method : {"half", "derivative", "both"}
        Edge energy as the first 0.5 crossing of the normalised spectrum, or
        as the maximum of the smoothed ``dmu/dE``; ``"both"`` returns the
        crossing as ``edge_energy`` and the derivative peak as ``e0_derivative``.
    pre, post : (float, float), optional
        Inclusive fit ranges in eV; chosen by :func:`edge_ranges` when None.
    min_jump : float, optional
        Voxels with an edge jump at or below this value are masked out.
        Default: ``0.1 x`` the 99.5th percentile of the positive jumps. A
        jump <= 0 is always masked.
    smooth : float
        Gaussian sigma (eV) applied to ``dmu/dE`` before its maximum is taken
        (``method="derivative"``/``"both"``); 0 disables smoothing.
    mask : (...) ndarray of bool, optional
        Extra mask (e.g. the binarized reference); voxels outside it are masked.
    e0 : float, optional
        Energy (eV) at which the jump is first evaluated (refined per voxel at
        its own edge afterwards); default from :func:`edge_ranges`.

    Returns
    -------
    dict of ndarray, each of shape ``spectra.shape[1:]``, on the input's device
        ``edge_energy`` (float32, eV, NaN where masked), ``edge_jump``
        (float32, input units; NaN for non-finite spectra), ``white_line``
        (float32, eV, NaN where masked or no peak lies above the edge),
        ``mask`` (bool, True for valid voxels) and, for ``method="both"``,
        ``e0_derivative`` (float32, eV).

    Raises
    ------
    ValueError
        Fewer than 5 energies, energies not strictly increasing, spectra whose
        first axis does not match, no spectrum with all values finite, bad
        method or ranges.
    """
    if method not in METHODS:
        raise ValueError(f"edge_energy: method must be one of {METHODS}, got {method!r}")
    if smooth is None or not smooth >= 0:
        raise ValueError(f"edge_energy: smooth must be >= 0 eV, got {smooth!r}")
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    xp, mu, out_shape = spectra_matrix(spectra, E, "edge_energy")
    if mask is not None:
        mask = xp.asarray(mask)
        if tuple(mask.shape) != out_shape:
            raise ValueError(f"edge_energy: mask must have shape {out_shape} (spectra.shape[1:]), "
                             f"got {tuple(mask.shape)}")
        mask = mask.reshape(-1).astype(bool)
    finite = xp.isfinite(mu.sum(axis=0))
    n_finite = int(finite.sum())
    if n_finite == 0:
        raise ValueError(f"edge_energy: none of the {mu.shape[1]} spectra is finite at every energy "
                         f"(all voxels NaN/inf)")
    if n_finite < mu.shape[1]:
        mu = xp.where(finite[None, :], mu, xp.float32(0))
    if pre is None or post is None:
        mean = to_host(mu.sum(axis=1)) / n_finite
        rng = edge_ranges(E, mean, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post)
    res = _edge_core(xp, mu, E, rng, method, smooth, e0 if e0 is not None else rng["e0"])
    jump = res["edge_jump"]
    thr = auto_min_jump(xp, jump[finite]) if min_jump is None else float(min_jump)
    valid = finite & (jump > max(thr, 0.0)) & xp.isfinite(res["edge_energy"])
    if mask is not None:
        valid &= mask
    nan = xp.float32(np.nan)
    out = {"edge_energy": xp.where(valid, res["edge_energy"], nan),
           "edge_jump": xp.where(finite, jump, nan),
           "white_line": xp.where(valid, res["white_line"], nan),
           "mask": valid}
    if method == "both":
        out["e0_derivative"] = xp.where(valid, res["e0_derivative"], nan)
    return {k: v.astype(xp.float32 if k != "mask" else bool, copy=False).reshape(out_shape) for k, v in out.items()}


def normalize(spectra, energies, *, pre=None, post=None, e0=None):
    """Normalised spectra: pre-edge line subtracted, divided by the edge jump at the 0.5 crossing.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy.
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    pre, post : (float, float), optional
        Fit ranges (eV), see :func:`edge_ranges`.
    e0 : float, optional
        Energy where the jump is first evaluated.

    Returns
    -------
    (n_energy, ...) ndarray of float32
        0 on the pre-edge line, 1 at the post-edge line at the edge; NaN where
        the jump is not positive or a value is non-finite.
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    xp, mu, voxels = spectra_matrix(spectra, E, "normalize")
    finite = xp.isfinite(mu.sum(axis=0))
    mu0 = xp.where(finite[None, :], mu, xp.float32(0))
    if pre is None or post is None:
        n_finite = max(int(finite.sum()), 1)
        rng = edge_ranges(E, to_host(mu0.sum(axis=1)) / n_finite, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post)
    ec = rng["e0"] if e0 is None else float(e0)
    res = _edge_core(xp, mu0, E, rng, "half", 0.0, ec)
    x = xp.asarray((E - ec).astype(np.float32))[:, None]
    pre_line = res["coef"][0][None, :] + x * res["coef"][1][None, :]
    jump = res["edge_jump"]
    ok = finite & (jump > 0)
    norm = (mu - pre_line) / xp.where(ok, jump, xp.float32(1))[None, :]
    norm = xp.where(ok[None, :], norm, xp.float32(np.nan))
    return norm.astype(xp.float32, copy=False).reshape(E.size, *voxels)


# --------------------------------------------------------------------------- helpers

def _edge_core(xp, mu, E, rng, method, smooth, ec):
    """Edge energy, jump and white line of finite spectra ``mu`` (n_energy, N) float32."""
    n = E.size
    pre_idx = np.flatnonzero((E >= rng["pre"][0]) & (E <= rng["pre"][1]))
    post_idx = np.flatnonzero((E >= rng["post"][0]) & (E <= rng["post"][1]))
    x = E - ec
    C = np.zeros((4, n))
    C[0:2] = line_weights(x, pre_idx)
    C[2:4] = line_weights(x, post_idx)
    coef = xp.asarray(C.astype(np.float32)) @ mu          # (4, N): b_pre, a_pre, b_post, a_post
    dj0 = coef[2] - coef[0]
    dj1 = coef[3] - coef[1]
    i_lo, i_hi = int(pre_idx[-1]), int(post_idx[0])
    w = slice(i_lo, i_hi + 1)
    Ew = E[w]
    xw = xp.asarray(x[w].astype(np.float32))[:, None]
    d = mu[w] - coef[0][None, :]
    d -= xw * coef[1][None, :]                            # mu minus pre-edge line, edge window only
    Ew_x = xp.asarray(Ew.astype(np.float32))
    out = {"coef": coef}

    def jump_at(e):
        return dj0 + dj1 * (e - xp.float32(ec))

    if method in ("half", "both"):
        e_half = _first_crossing(xp, d, 0.5 * jump_at(xp.float32(ec)), Ew_x)
        j1 = jump_at(xp.where(xp.isfinite(e_half), e_half, xp.float32(ec)))
        e_half = _first_crossing(xp, d, 0.5 * j1, Ew_x)
        edge = e_half
    if method in ("derivative", "both"):
        K = _derivative_operator(E, smooth)[w]             # (W, n): smoothed d/dE
        der = xp.asarray(K.astype(np.float32)) @ mu
        e_der = _peak(xp, der, Ew_x, Ew, interior=True)
        del der
        if method == "derivative":
            edge = e_der
        else:
            out["e0_derivative"] = e_der
    jump = jump_at(xp.where(xp.isfinite(edge), edge, xp.float32(ec)))
    # White line: highest point of the pre-subtracted spectrum above the edge (window only).
    out["white_line"] = _peak(xp, d, Ew_x, Ew, interior=False,
                              lower=xp.where(xp.isfinite(edge), edge, xp.float32(np.inf)))
    out["edge_energy"] = edge
    out["edge_jump"] = jump
    return out


def _first_crossing(xp, d, level, Ew):
    """Energy where ``d`` (W, N) first rises through ``level`` (N,), linear interpolation; NaN if never.

    A loop over the W energies of the window with whole-row operations: rows
    are contiguous, so this is cache-friendly on the CPU and a handful of
    small kernels per energy on the GPU (an ``argmax`` over axis 0 is a
    strided reduction, several times slower on the CPU).
    """
    W, N = d.shape
    idx = xp.zeros(N, dtype=xp.int32)
    todo = xp.ones(N, dtype=bool)
    prev = d[0] >= level
    up = xp.empty_like(prev)
    hit = xp.empty_like(prev)
    for j in range(1, W):
        # In-place, branch-free row operations: masked copies (where/copyto) with scattered
        # masks are ~30x slower than arithmetic in NumPy.
        xp.greater_equal(d[j], level, out=up)
        xp.greater(up, prev, out=hit)           # up and not prev (bool order False < True)
        xp.logical_and(hit, todo, out=hit)      # only the first crossing counts
        idx += hit.astype(xp.int32) * xp.int32(j - 1)
        xp.greater(todo, hit, out=todo)         # todo and not hit
        prev, up = up, prev
    found = ~todo
    i = xp.where(found, idx, xp.int32(0))
    cols = xp.arange(N)
    d0, d1 = d[i, cols], d[i + 1, cols]
    e0, e1 = Ew[i], Ew[i + 1]
    denom = xp.where(found, d1 - d0, xp.float32(1))
    t = xp.clip((level - d0) / denom, 0, 1)
    return xp.where(found, e0 + t * (e1 - e0), xp.float32(np.nan))


def _peak(xp, v, Ew, Ew_host, *, interior, lower=None):
    """Energy of the maximum of ``v`` (W, N) along axis 0, refined by a parabola through 3 samples.

    Only rows with energy above ``lower`` (N,) are candidates when given.
    With ``interior`` the parabola is centred off the window ends; otherwise
    a maximum on the last sample (no peak inside the window) gives NaN, as
    does a column without candidates. Running maximum over rows (see
    :func:`_first_crossing` for why not ``argmax``).
    """
    W, N = v.shape
    best = xp.full(N, -np.inf, dtype=xp.float32)
    k = xp.zeros(N, dtype=xp.int32)
    better = xp.empty(N, dtype=bool)
    ok = xp.empty(N, dtype=bool)
    found = xp.zeros(N, dtype=bool)            # some row was a candidate (best alone cannot tell)
    for j in range(W):                         # branch-free row operations, as in _first_crossing
        xp.greater(v[j], best, out=better)
        if lower is not None:
            xp.less(lower, xp.float32(Ew_host[j]), out=ok)
            xp.logical_and(better, ok, out=better)
        xp.logical_or(found, better, out=found)
        k += better.astype(xp.int32) * (xp.int32(j) - k)
        xp.maximum(best, v[j] - xp.float32(3e38) * (~better), out=best)
    none = ~found
    at_end = k >= W - 1
    kc = xp.clip(k, 1, W - 2)
    cols = xp.arange(N)
    y0, y1, y2 = v[kc - 1, cols], v[kc, cols], v[kc + 1, cols]
    x0, x1, x2 = Ew[kc - 1], Ew[kc], Ew[kc + 1]
    a, b = x1 - x0, x1 - x2
    num = a * a * (y1 - y2) - b * b * (y1 - y0)
    den = a * (y1 - y2) - b * (y1 - y0)
    safe = xp.abs(den) > 0
    vertex = x1 - 0.5 * num / xp.where(safe, den, xp.float32(1))
    vertex = xp.where(safe, xp.clip(vertex, x0, x2), x1)
    # Where the maximum sat on a window end, the parabola is not centred on it: keep the sample.
    vertex = xp.where(k == kc, vertex, Ew[k])
    bad = none if interior else (none | at_end)
    return xp.where(bad, xp.float32(np.nan), vertex).astype(xp.float32)


def _derivative_operator(E, smooth):
    """(n, n) matrix: Gaussian-smoothed (sigma ``smooth`` eV) second-order d/dE on a non-uniform grid."""
    n = E.size
    G = np.zeros((n, n))
    h = np.diff(E)
    G[0, 0], G[0, 1] = -1 / h[0], 1 / h[0]
    G[-1, -2], G[-1, -1] = -1 / h[-1], 1 / h[-1]
    for i in range(1, n - 1):
        hl, hr = h[i - 1], h[i]
        G[i, i - 1] = -hr / (hl * (hl + hr))
        G[i, i] = (hr - hl) / (hl * hr)
        G[i, i + 1] = hl / (hr * (hl + hr))
    if smooth > 0:
        S = np.exp(-0.5 * ((E[:, None] - E[None, :]) / smooth) ** 2)
        S /= S.sum(axis=1, keepdims=True)
        G = S @ G
    return G


def _derivative_peak_1d(E, spec):
    der = _derivative_operator(E, 0.0) @ spec
    k = int(np.argmax(der[1:-1])) + 1
    return float(E[k])
