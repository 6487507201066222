"""Edge-energy uncertainty: the noise propagated to the 0.5 crossing, and the model error that noise leaves out.

The 1-sigma map ``edge_energy_sigma`` is, per voxel,
``sqrt(noise^2 + grid^2 + resolution^2 [+ denoising^2])``, every term estimated
from the data alone (nothing is fitted to a truth; the one constant is the
PSF width :data:`PSF_VOXELS`):

* **noise** (:func:`crossing_sigma`): the per-voxel noise level (the residual of
  the spectrum to the stack's spectral basis, :mod:`gpureg.xanes.denoise`)
  propagated linearly to the crossing: the noise of ``mu - pre_edge - step / 2``
  at the crossing over its slope there.
* **grid** (interpolation between energies; :func:`gpureg.xanes.edge_energy`):
  the crossing is read from the monotone cubic through the samples; where the
  true spectrum lies between them is unknown. The term is the difference
  between that crossing and the linear interpolation's in the same bracket, two
  readings of the same samples. On noise-free model spectra (:mod:`gpureg.synth`,
  27 edge positions x 4 white lines) the cubic's error is 0.139 eV RMS on 3 eV
  steps and 0.026 eV on 1.5 eV steps; this term is 0.183 and 0.062 eV RMS there
  and covers 71 % and 82 % of the errors (conservative: the linear crossing is
  the worse of the two readings; ``tests/xanes/test_uncertainty.py``).
* **resolution** (:func:`gpureg.xanes.stack.edge_energy_map`, which has the
  voxels' neighbours): reconstruction (FBP) and the resampling of every energy
  onto the reference grid mix each voxel's spectrum with its neighbours', which
  moves the crossing where the chemistry changes within a few voxels (a
  core-shell gradient, a particle's surface). Measured is ``m``, the change one
  more such mixing makes: the crossing of the voxel's spectrum minus that of its
  neighbourhood average with a Gaussian of ``psf`` voxels. Where the crossing is
  about linear in the spectra, with ``K`` the PSF's convolution and ``e`` the
  true edge energies, the map is ``K e`` and its error ``(K - 1) e``, while
  ``m = -(K - 1) K e``: the error blurred once more, so ``m`` alone reads it low
  (by 0.66-0.76 in RMS on exact volumes blurred with 0.55-0.7 voxel, correlation
  0.94-0.97). The term is ``(2 - K) m``, the first two terms of
  ``K^-1 = sum (1 - K)^n`` (0.78-0.87 of the RMS).
* **denoising** (maps with ``--denoise-spectra``): the truncation to a few
  components also removes some signal. The term is the change denoising made to
  the crossing (raw minus denoised), averaged over the PSF neighbourhood, less
  the noise of that average in quadrature (the change's own noise is the raw
  noise outside the basis, ``raw^2 - denoised^2`` of the noise terms, averaged
  as if independent from voxel to voxel; floored at 0).

The grid and resolution terms are read from the **signal**, the projection of
each spectrum onto the stack's spectral basis (its noise is the projected noise,
a few times smaller), so the noise is not counted twice; they are 0 where that
signal has no crossing. The terms are added in quadrature as independent errors.
Grid and resolution errors are biases fixed by the grid and the sample, not
random per voxel: an exact bias estimate alone covers about half of its errors,
so the nominal coverage holds for the sum over voxels, not for each term.

Measured (``bench/denoise.py`` and ``bench/results/denoise-*``; simulated 48^3
scans, seeds 0-2, 1000 and 10^4 photons, default 3 eV and fine 1.5 eV grids):
see the README's ``--denoise-spectra`` entry for the coverage of 1 and 2 sigma.

All array code is ``xp``-generic (NumPy or CuPy).
"""

from __future__ import annotations

import numpy as np

from ..core.backend import ndimage_of, xp_of
from .crossing import crossing
from .preedge import normalisation_functionals, pre_edge

__all__ = ["PSF_VOXELS", "crossing_sigma", "half_crossing", "linear_crossing", "local_mean", "model_terms",
           "noise_operator"]

PSF_VOXELS = 0.7
"""Gaussian standard deviation (voxels) of the spatial mixing that FBP and the trilinear resampling onto the
reference grid do to the edge map of ``gpureg simulate`` (48^3, 181 angles). Measured without noise, against
the exact attenuation volumes (seeds 0, 1): the aligned stack's crossings differ from the exact volumes' by
0.23 and 0.21 eV RMS; the exact volumes blurred with 0.7 voxel by 0.22 and 0.30 eV, with 0.55 voxel by 0.14
and 0.19 eV. A least-squares fit of the blurred exact volumes to the aligned stack's attenuation gives
0.54-0.55 voxel (3 seeds; 0.45 at the reference energy, which is not resampled): the edge map's equivalent
width is larger, as it also holds the registration's residual misalignment between energies (0.08 voxel)
where the attenuation changes fast. Other data: their resolution in voxels
(``edge_energy_map(..., psf=)``)."""


def model_terms(xp, signal, mixed, E, rng):
    """The model-error terms (eV) of the 0.5 crossing of every spectrum (see the module notes).

    Parameters
    ----------
    xp : module
        NumPy or CuPy.
    signal : (n, N) ndarray of float32
        Noise-reduced spectra (finite).
    mixed : (n, N) ndarray of float32 or None
        The same after spatial mixing with their neighbours (finite).
    E : (n,) ndarray
        Energies (eV).
    rng : dict
        ``e0``, ``pre``, ``post`` of the normalisation (:func:`gpureg.xanes.edge_ranges`).

    Returns
    -------
    dict of (N,) ndarray of float32
        ``grid``: ``|PCHIP - linear crossing|`` of ``signal``; ``mixing`` (with ``mixed``): the signed change
        of the crossing, ``signal``'s minus ``mixed``'s. 0 where a crossing is missing.
    """
    e, lin = _crossings(xp, signal, E, rng, linear=True)
    out = {"grid": xp.nan_to_num(xp.abs(e - lin)).astype(xp.float32, copy=False)}
    if mixed is not None:
        out["mixing"] = xp.nan_to_num(e - _crossings(xp, mixed, E, rng)[0]).astype(xp.float32, copy=False)
    return out


def half_crossing(xp, mu, E, rng):
    """0.5 crossing (eV, PCHIP; NaN where none) of the normalised spectra ``mu`` (n, N), finite float32."""
    return _crossings(xp, mu, E, rng)[0]


def local_mean(volume, psf):
    """Gaussian-weighted (``psf`` voxels) mean of the finite values of a (..., Z, Y, X) array around every voxel.

    Over the last three axes; a voxel counts where it is finite along every leading axis (a whole spectrum).
    NaN where no finite voxel is near."""
    xp, nd = xp_of(volume), ndimage_of(volume)
    lead = volume.ndim - 3
    ok = xp.isfinite(volume).all(axis=tuple(range(lead))) if lead else xp.isfinite(volume)
    w = nd.gaussian_filter(ok.astype(xp.float32), psf, mode="nearest")
    v = xp.where(ok, volume, xp.float32(0)).astype(xp.float32, copy=False)
    s = (nd.gaussian_filter(v, psf, mode="nearest") if not lead else
         xp.stack([nd.gaussian_filter(u, psf, mode="nearest") for u in v.reshape(-1, *v.shape[-3:])]).reshape(v.shape))
    return xp.where(w > 1e-3, s / xp.maximum(w, xp.float32(1e-3)), xp.float32(np.nan))


def noise_operator(n, U, profile):
    """``P`` with ``|P^T w|`` the noise of the functional ``w`` of a spectrum per unit noise level: ``S U`` for
    spectra denoised by projection onto ``U`` (noise-whitened coordinates), ``S`` without, ``S`` the diagonal of
    noise standard deviations per energy (``sqrt(profile)``); None (identity) for white noise without projection."""
    U = None if U is None else np.asarray(U, np.float64)
    if profile is None:
        return U
    s = np.sqrt(np.clip(np.asarray(profile, np.float64).reshape(-1), 0, None))
    if s.size != n:
        raise ValueError(f"edge_energy: noise_profile must have {n} values (one per energy), got {s.size}")
    return np.diag(s) if U is None else s[:, None] * U


def crossing_sigma(xp, E, rng, e_half, slope, i, t, step, sigma, U):
    """1-sigma error of the crossing energy: ``sigma |P^T w| / (step slope)`` with ``w`` the functional
    ``mu(Ec) - pre_edge(Ec) - step / 2`` of ``mu`` and ``P`` the noise operator (:func:`noise_operator`;
    identity when None)."""
    c0, c1, st, mid, half = normalisation_functionals(E, rng["e0"], pre=rng["pre"], post=rng["post"])
    a0 = c0 + 0.5 * st
    P = np.eye(E.size) if U is None else U                     # (n, K)
    f32 = xp.float32
    PT = xp.asarray(P.astype(np.float32))                       # rows: energies
    pa0 = xp.asarray((P.T @ a0).astype(np.float32))[:, None]
    pc1 = xp.asarray((P.T @ c1).astype(np.float32))[:, None]
    ok = xp.isfinite(e_half)
    tt = xp.where(ok, t, f32(0))
    tau = (xp.where(ok, e_half, f32(mid)) - f32(mid)) / f32(half)
    ii = xp.where(ok, i, 0)
    pw = (1 - tt)[None, :] * PT[ii].T + tt[None, :] * PT[xp.minimum(ii + 1, E.size - 1)].T - pa0 - tau[None, :] * pc1
    g = xp.sqrt((pw * pw).sum(axis=0))
    return xp.where(ok, sigma * g / xp.maximum(step * slope, f32(1e-12)), f32(np.nan))


def linear_crossing(xp, norm, i, E):
    """The 0.5 crossing of the straight line between rows ``i`` and ``i + 1`` of ``norm`` (n, N) (eV, (N,))."""
    cols = xp.arange(norm.shape[1])
    ip = xp.minimum(i + 1, E.size - 1)
    y0, y1 = norm[i, cols], norm[ip, cols]
    Ex = xp.asarray(E.astype(np.float32))
    dy = y1 - y0
    t = xp.clip((xp.float32(0.5) - y0) / xp.where(dy != 0, dy, xp.float32(1)), 0, 1)
    return Ex[i] + t * (Ex[ip] - Ex[i])


def _crossings(xp, mu, E, rng, *, linear=False):
    """0.5 crossing of the normalised ``mu`` (PCHIP) and, with ``linear``, the linear one in the same bracket."""
    norm = pre_edge(mu, E, e0=rng["e0"], pre=rng["pre"], post=rng["post"], flatten=False)["norm"]
    i_lo, i_hi = int(np.searchsorted(E, rng["pre"][1])), int(np.searchsorted(E, rng["post"][0]))
    e, _, i, _, _ = crossing(xp, norm, 0.5, E, i_lo, i_hi)
    return e, (linear_crossing(xp, norm, i, E) if linear else None)
