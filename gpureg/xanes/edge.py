"""Per-voxel XANES analysis: normalisation, edge energy, edge jump and white line.

Every voxel of an aligned energy stack carries an absorption spectrum
``mu(E)``. It is normalised with the layer's one normalisation,
:func:`gpureg.xanes.preedge.pre_edge` (Larch's definition: pre-edge line,
post-edge polynomial, edge step at E0), with **one common E0** for all voxels
(Larch's ``find_e0`` of the mean spectrum, or given), so the normalisation is
the same linear map for every voxel. From the normalised spectrum it measures

* the **edge energy**: where the normalised spectrum first crosses 0.5
  (``method="half"``), read from the monotone cubic (PCHIP, Fritsch-Carlson)
  interpolant of the samples around the crossing, or where ``dmu/dE`` is
  largest after light Gaussian smoothing (``method="derivative"``; parabolic
  refinement of the peak);
* the **edge jump** (Larch's edge step, in the units of the input);
* the **white-line** energy: peak of the normalised spectrum above the edge.

Bias on coarse grids, measured on the real Fe K-edge spectra of
``tests/data/xanes`` resampled onto a 45-energy TXM-like grid (15 eV steps,
1.5 eV across the edge) against the same spectra on their dense (~0.6 eV)
grid, with the same E0 and ranges: the monotone cubic reads the crossing within
0.021 eV (-0.018, +0.008, -0.021, -0.003 eV), linear interpolation is off by
up to 0.12 eV; the step fitted against the spline interpolant over the
nominal ranges (``fit="spline"``) is within 0.75 % of the dense one, Larch's
point fit 3-45 % off (its grid-dependent default ranges).
``tests/xanes/test_real_spectra.py`` holds the crossing to 0.10 eV.

Voxels whose jump is too small (background) or whose spectrum has a non-finite
value are masked out.

Convention
----------
Spectra are ``(n_energy, ...)`` with the energy axis first; maps have shape
``spectra.shape[1:]``. Energies are in eV and strictly increasing. All array
code is written once against ``xp`` (NumPy or CuPy): results come back on the
input's device. The normalisation is one small matrix product; the edge
search runs only over the energies between the two fit ranges.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..core.backend import to_host
from ..core.energies import check_energies
from ..core.errors import InputError, ParameterError
from .e0 import find_e0_index
from .crossing import crossing
from .preedge import fit_ranges, pre_edge
from .spectra import MIN_ENERGIES, auto_min_jump, edge_window, fine_region, spectra_matrix
from .uncertainty import crossing_sigma, linear_crossing, model_terms, noise_operator

__all__ = ["edge_energy", "edge_ranges", "METHODS", "normalize"]

METHODS = ("half", "derivative", "both")


_log = logging.getLogger("gpureg")


def edge_ranges(energies, spectrum=None, *, pre=None, post=None, e0=None) -> dict:
    """Common E0 and the pre-edge / post-edge fit ranges (eV) of the normalisation.

    E0: ``e0`` when given; else Larch's ``find_e0`` of ``spectrum`` (e.g. the
    mean over voxels); else the middle of the grid's fine-step region (beamline
    scans put fine steps across the edge); else the middle of the grid, with a
    warning. Ranges: ``pre`` / ``post`` when given, else Larch's defaults
    around E0 for ``fit="spline"`` (:func:`gpureg.xanes.preedge.fit_ranges`):
    pre-edge from the first energy to half-way to E0, post-edge from
    E0 + 25 eV to the last energy.

    Parameters
    ----------
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    spectrum : (n_energy,) array_like, optional
        A representative spectrum (e.g. the mean over voxels).
    pre, post : (float, float), optional
        Inclusive energy ranges (eV) that override the automatic choice.
    e0 : float, optional
        The common edge energy (eV).

    Returns
    -------
    dict
        ``pre`` and ``post``: ``(lo, hi)`` in eV (inclusive; each holds at
        least 2 energies); ``e0``: the common E0 (eV); ``rule``: how E0 was chosen.

    Raises
    ------
    EnergyGridError
        (an ``InputError``) The grid cannot place the edge (:func:`~gpureg.xanes.spectra.edge_window`).
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    rule = "given"
    if e0 is None:
        spec = None
        if spectrum is not None:
            spec = np.asarray(to_host(spectrum), dtype=np.float64)
            if spec.shape != E.shape:
                raise ValueError(f"edge_ranges: spectrum must have shape {E.shape}, got {spec.shape}")
        usable = spec is not None and np.isfinite(spec).all() and np.ptp(spec) > 0
        if usable and E.size >= 10:
            e0 = float(E[int(find_e0_index(np, spec[:, None].astype(np.float32), E)[0])])
            rule = "find_e0 of the mean spectrum"
        elif usable:  # too few energies for find_e0's derivative: the steepest step between two energies
            k = int(np.argmax(np.diff(spec) / np.diff(E)))
            e0 = float(min(max(0.5 * (E[k] + E[k + 1]), E[1]), E[-2]))
            rule = "steepest step of the mean spectrum (fewer than 10 energies)"
        elif fine_region(E) is not None:
            fr = fine_region(E)
            e0, rule = 0.5 * (fr[1] + fr[2]), "middle of the grid's fine-step region"
        else:
            e0, rule = 0.5 * (E[0] + E[-1]), "middle of the grid (fallback)"
            warnings.warn("edge_ranges: no spectrum and no fine-step region in the energy grid; E0 is taken at the "
                          "middle of the grid (pass e0= or pre=/post= to choose)", stacklevel=2)
    e0 = float(e0)
    if not E[1] <= e0 <= E[-2]:
        raise InputError(f"edge_ranges: e0={e0:g} eV must lie inside the grid {E[1]:g}..{E[-2]:g} eV")
    given = pre is not None and post is not None
    if not given:
        r = fit_ranges(E, e0, fit="spline")
        auto_pre = (max(E[0], e0 + r["pre1"]), e0 + r["pre2"])
        auto_post = (e0 + r["norm1"], min(E[-1], e0 + r["norm2"]))
        if E[(E >= auto_pre[0] - 1e-6) & (E <= auto_pre[1] + 1e-6)].size < 2:
            auto_pre = (E[0], E[max(1, int(np.searchsorted(E, e0)) - 2)])
        if E[(E >= auto_post[0] - 1e-6) & (E <= auto_post[1] + 1e-6)].size < 2:
            auto_post = (E[min(E.size - 2, int(np.searchsorted(E, e0)) + 2)], E[-1])
        pre = auto_pre if pre is None else pre
        post = auto_post if post is None else post
    pre, post = edge_window(E, pre, post, given=given)
    return {"pre": pre, "post": post, "e0": e0, "rule": rule}


def edge_energy(spectra, energies, *, method: str = "half", pre=None, post=None, min_jump: float | None = None,
                smooth: float = 1.0, mask=None, e0: float | None = None, noise=None, noise_components=None,
                noise_profile=None, signal=None, model: bool = True) -> dict:
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
        The common E0 (eV) of the normalisation; default from :func:`edge_ranges`.
    noise : (...) ndarray, optional
        Standard deviation of the (white) noise of every voxel's ``mu``
        (e.g. from :func:`gpureg.xanes.denoise.denoise_spectra`); with it the
        result holds ``edge_energy_sigma``, the 1-sigma error of the 0.5
        crossing (:mod:`gpureg.xanes.uncertainty`): the noise of
        ``mu - pre_edge - step / 2`` at the crossing (the interpolated samples,
        the pre-edge line and the step, all linear in ``mu``) over its slope
        there (``step x dnorm/dE``), with the interpolation error between
        energies added in quadrature (``model``).
    noise_components : (n_energy, K) ndarray, optional
        When the spectra were denoised by projection onto these orthonormal
        components (of the noise-whitened spectra, see
        :mod:`gpureg.xanes.denoise`), the noise left is that projection of the noise.
    noise_profile : (n_energy,) ndarray, optional
        Relative noise variance per energy: the noise of a voxel at energy
        ``e`` is ``noise x sqrt(noise_profile[e])`` (default: the same at
        every energy; see :mod:`gpureg.xanes.denoise`).
    signal : (n_energy, ...) ndarray, optional
        Noise-reduced estimate of ``spectra`` (e.g. their projection onto the
        stack's spectral basis) from which the interpolation error is read
        (default: ``spectra``).
    model : bool
        Add the interpolation error (:mod:`gpureg.xanes.uncertainty`) to the
        noise in ``edge_energy_sigma``; False: noise only. (Spatial resolution
        needs the voxels' neighbours: :func:`gpureg.xanes.stack.edge_energy_map`
        adds it.)

    Returns
    -------
    dict of ndarray, each of shape ``spectra.shape[1:]``, on the input's device
        ``edge_energy`` (float32, eV, NaN where masked), ``edge_jump``
        (float32, input units; NaN for non-finite spectra), ``white_line``
        (float32, eV, NaN where masked or no peak lies above the edge),
        ``mask`` (bool, True for valid voxels), ``edge_energy_sigma`` with
        ``noise``, and, for ``method="both"``, ``e0_derivative`` (float32, eV).
        ``"half"``/``"both"``: ``edge_ambiguous`` (bool), voxels whose normalised
        spectrum rises through 0.5 more than once in the edge window: no single
        edge energy (noise on a small jump, mixed spectra at a contact); masked.

    Raises
    ------
    ValueError
        Fewer than 5 energies, energies not strictly increasing, spectra whose
        first axis does not match, no spectrum with all values finite, bad
        method or ranges.
    """
    if method not in METHODS:
        raise ParameterError(f"edge_energy: method must be one of {METHODS}, got {method!r}")
    if smooth is None or not smooth >= 0:
        raise ParameterError(f"edge_energy: smooth must be >= 0 eV, got {smooth!r}")
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
        raise InputError(f"edge_energy: none of the {mu.shape[1]} spectra is finite at every energy "
                         f"(all voxels NaN/inf)")
    if n_finite < mu.shape[1]:
        mu = xp.where(finite[None, :], mu, xp.float32(0))
    sig = None
    if noise is not None:
        sig = xp.asarray(noise, dtype=xp.float32)
        if tuple(sig.shape) != out_shape:
            raise ValueError(f"edge_energy: noise must have shape {out_shape} (spectra.shape[1:]), "
                             f"got {tuple(sig.shape)}")
        sig = (sig.reshape(-1), noise_operator(E.size, noise_components, noise_profile))
        if model:
            y = mu if signal is None else spectra_matrix(signal, E, "edge_energy")[1]
            if y.shape != mu.shape:
                raise ValueError(f"edge_energy: signal must have the shape of spectra {tuple(spectra.shape)}, "
                                 f"got {tuple(signal.shape)}")
            sig += (None if signal is None else xp.nan_to_num(y),)
    if e0 is None:
        mean = to_host(mu.sum(axis=1)) / n_finite
        rng = edge_ranges(E, mean, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post, e0=e0)
    res = _edge_core(xp, mu, E, rng, method, smooth, sig)
    jump = res["edge_jump"]
    thr = auto_min_jump(xp, jump[finite]) if min_jump is None else float(min_jump)
    valid = finite & (jump > max(thr, 0.0)) & xp.isfinite(res["edge_energy"])
    if mask is not None:
        valid &= mask
    ambiguous = valid & res["ambiguous"] if "ambiguous" in res else None  # no single edge: flagged and masked
    valid = valid if ambiguous is None else valid & ~ambiguous
    nan = xp.float32(np.nan)
    out = {"edge_energy": xp.where(valid, res["edge_energy"], nan),
           "edge_jump": xp.where(finite, jump, nan),
           "white_line": xp.where(valid, res["white_line"], nan),
           "mask": valid}
    if ambiguous is not None:
        out["edge_ambiguous"] = ambiguous
    if sig is not None:
        out["edge_energy_sigma"] = xp.where(valid, res["sigma"], nan)
    if method == "both":
        out["e0_derivative"] = xp.where(valid, res["e0_derivative"], nan)
    return {k: v.astype(bool if v.dtype == bool else xp.float32, copy=False).reshape(out_shape) for k, v in out.items()}


def normalize(spectra, energies, *, pre=None, post=None, e0=None):
    """Normalised spectra: the layer's one normalisation (Larch's ``pre_edge``) with one common E0.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy.
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    pre, post : (float, float), optional
        Fit ranges (eV), see :func:`edge_ranges`.
    e0 : float, optional
        The common E0 (eV); default Larch's ``find_e0`` of the mean spectrum.

    Returns
    -------
    (n_energy, ...) ndarray of float32
        0 on the pre-edge line, 1 at the post-edge curve at E0; NaN where
        the step is not positive or a value is non-finite.
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    xp, mu, voxels = spectra_matrix(spectra, E, "normalize")
    finite = xp.isfinite(mu.sum(axis=0))
    mu0 = xp.where(finite[None, :], mu, xp.float32(0))
    if e0 is None:
        n_finite = max(int(finite.sum()), 1)
        rng = edge_ranges(E, to_host(mu0.sum(axis=1)) / n_finite, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post, e0=e0)
    pe = pre_edge(mu0, E, e0=rng["e0"], pre=rng["pre"], post=rng["post"], flatten=False)
    ok = finite & (pe["edge_step"] > 1e-12)
    norm = xp.where(ok[None, :], pe["norm"], xp.float32(np.nan))
    return norm.astype(xp.float32, copy=False).reshape(E.size, *voxels)


# --------------------------------------------------------------------------- helpers

def _edge_core(xp, mu, E, rng, method, smooth, sig):
    """Edge energy, jump, white line (and sigma) of finite spectra ``mu`` (n_energy, N) float32."""
    pe = pre_edge(mu, E, e0=rng["e0"], pre=rng["pre"], post=rng["post"], flatten=False)
    norm, step = pe["norm"], pe["edge_step"]
    i_lo, i_hi = int(np.searchsorted(E, rng["pre"][1])), int(np.searchsorted(E, rng["post"][0]))
    w = slice(i_lo, i_hi + 1)
    Ew = E[w]
    Ew_x = xp.asarray(Ew.astype(np.float32))
    d = norm[w]
    out = {}
    if method in ("half", "both"):
        e_half, slope, i, t, count = crossing(xp, norm, 0.5, E, i_lo, i_hi)
        edge = e_half
        out["ambiguous"] = count > 1
        if sig is not None:
            out["sigma"] = crossing_sigma(xp, E, rng, e_half, slope, i, t, step, *sig[:2])
            if len(sig) > 2:   # interpolation error; from these spectra's own crossing when no signal is given
                g = (xp.nan_to_num(xp.abs(e_half - linear_crossing(xp, norm, i, E))) if sig[2] is None
                     else model_terms(xp, sig[2], None, E, rng)["grid"])
                out["sigma"] = xp.sqrt(out["sigma"] ** 2 + g * g)
    if method in ("derivative", "both"):
        K = _derivative_operator(E, smooth)[w]             # (W, n): smoothed d/dE
        der = xp.asarray(K.astype(np.float32)) @ mu
        e_der = _peak(xp, der, Ew_x, Ew, interior=True)
        del der
        if method == "derivative":
            edge = e_der
            if sig is not None:
                out["sigma"] = xp.full(mu.shape[1], np.nan, dtype=xp.float32)
        else:
            out["e0_derivative"] = e_der
    # White line: highest point of the normalised spectrum above the edge (window only).
    out["white_line"] = _peak(xp, d, Ew_x, Ew, interior=False,
                              lower=xp.where(xp.isfinite(edge), edge, xp.float32(np.inf)))
    out["edge_energy"] = edge
    out["edge_jump"] = step
    return out


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
