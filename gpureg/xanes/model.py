"""Model K-edge spectra with a known edge, and the energy grid of a typical TXM-XANES scan.

The one spectrum model of gpureg: the tests and benchmarks of the XANES
analysis use it with its defaults (error-function step, sloped pre- and
post-edge lines: a line fit far from the edge is exact), and the simulated
Mn experiment of :mod:`gpureg.synth` with the Mn parameters of
:data:`gpureg.synth.MN_SPECTRUM` (arctan step, pre-edge peak, EXAFS-like
wiggle, Victoreen-like pre-edge background).
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host, xp_of

__all__ = ["EDGE_SHAPES", "scan_energies", "synthetic_spectra"]

EDGE_SHAPES = ("erf", "arctan")


def scan_energies(start: float = 6480.0, stop: float = 6705.0, *, fine=(6528.0, 6600.0), fine_step: float = 3.0,
                  coarse_step: float = 15.0) -> np.ndarray:
    """Energy grid of a typical TXM-XANES scan: coarse away from the edge, fine across it.

    Coarse steps go up from ``start`` to below ``fine[0]``, fine steps from
    ``fine[0]`` to ``fine[1]`` (inclusive when the step divides the range),
    coarse steps go down from ``stop`` to above the last fine energy; so
    ``start`` and ``stop`` are always scanned.

    The defaults mimic a Mn K-edge scan (edge near 6540-6555 eV): 15 eV steps
    from 6480 eV, 3 eV steps over 6528-6600 eV, then 15 eV steps to 6705 eV
    (36 energies). ``fine_step=1.5`` gives 60 energies.

    Parameters
    ----------
    start, stop : float
        First and last energy (eV).
    fine : (float, float)
        The finely sampled region around the edge (eV),
        ``start <= fine[0] < fine[1] <= stop``.
    fine_step, coarse_step : float
        Step sizes (eV), positive.

    Returns
    -------
    (n_energy,) ndarray of float64
        Strictly increasing, eV (rounded to 1e-6 eV).
    """
    f0, f1 = (float(v) for v in fine)
    if not (start <= f0 < f1 <= stop) or fine_step <= 0 or coarse_step <= 0:
        raise ValueError(f"scan_energies: need start <= fine[0] < fine[1] <= stop and positive steps, got "
                         f"start={start}, fine={fine}, stop={stop}, fine_step={fine_step}, coarse_step={coarse_step}")
    eps = 1e-6
    pre = np.arange(start, f0 - eps, coarse_step)
    near = np.arange(f0, f1 + eps, fine_step)
    post = np.arange(stop, near[-1] + eps, -coarse_step)[::-1]
    post = post[post > near[-1] + eps]
    return np.round(np.concatenate([pre, near, post]), 6)


def synthetic_spectra(energies, e0, *, jump=1.0, edge: str = "erf", width=3.0, white_line=0.5, wl_offset=8.0,
                      wl_width=4.0, pre_offset=0.1, pre_slope=-2e-4, post_slope=-1e-3, pre_peak=0.0,
                      pre_peak_offset=-12.0, pre_peak_width=1.5, exafs=0.0, victoreen=0.0, dtype=np.float32):
    """Model K-edge spectra with a known edge.

    ``mu(E) = p(E) + S(E) jump (1 + post_slope x + w(x)) + jump W(x) + jump P(x) + victoreen (E / e0)^-3``
    with ``x = E - e0``, the pre-edge line ``p = pre_offset + pre_slope x``,
    the step ``S = (1 + erf(x / width)) / 2`` (``edge="erf"``) or
    ``S = 1/2 + arctan(x / width) / pi`` (``edge="arctan"``), the white line
    ``W = white_line exp(-((x - wl_offset) / wl_width)^2 / 2)``, the pre-edge
    peak ``P = pre_peak exp(-((x - pre_peak_offset) / pre_peak_width)^2 / 2)``
    and the EXAFS-like wiggle ``w = exafs sin(2 pi (x - wl_offset) / 40)
    exp(-max(x, 0) / 120) (1 + tanh(x / 4)) / 2``.

    With the defaults (erf step, no peak, wiggle or Victoreen term), far from
    the edge (more than ~4 ``width`` below, ~5 ``wl_width`` above) ``mu``
    equals the lines to float precision, so a line fit there is exact; the
    edge jump is ``jump (1 + post_slope x)`` over the pre-edge line. ``e0``
    is the step's midpoint; the 0.5 crossing of the normalised spectrum is
    slightly below it when a white line overlaps the step.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    e0 : float or ndarray (...)
        Step centres, eV. Its array module (NumPy/CuPy) sets the output's;
        the other parameters broadcast against it.
    edge : {"erf", "arctan"}
        Shape of the step.
    jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope : float or ndarray
        Edge jump, step width (eV), white-line height (relative to the jump),
        position and width (eV), pre-edge line, post-edge slope (1/eV).
    pre_peak, pre_peak_offset, pre_peak_width : float
        Pre-edge peak height (relative to the jump), position and width (eV).
    exafs : float
        Amplitude of the wiggle above the edge (relative to the jump).
    victoreen : float
        Amplitude of the ``(E / e0)^-3`` pre-edge background.
    dtype : numpy dtype
        Of the result; the model is evaluated in float64.

    Returns
    -------
    (n_energy, ...) ndarray of ``dtype``
        The trailing shape broadcasts ``e0`` with the other parameters.
    """
    if edge not in EDGE_SHAPES:
        raise ValueError(f"synthetic_spectra: edge must be one of {EDGE_SHAPES}, got {edge!r}")
    xp = xp_of(e0) if hasattr(e0, "shape") else np
    e0 = xp.asarray(e0, dtype=xp.float64)
    p = [xp.asarray(v, dtype=xp.float64) if not np.isscalar(v) else v
         for v in (jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope)]
    jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope = p
    shape = np.broadcast_shapes(e0.shape, *(np.shape(v) for v in p))
    E = xp.asarray(np.asarray(to_host(energies), dtype=np.float64)).reshape((-1,) + (1,) * len(shape))
    x = E - e0
    if edge == "erf":
        step = 0.5 * (1.0 + _erf_of(xp)(x / width))
    else:
        step = 0.5 + xp.arctan(x / width) / xp.pi
    above = 1.0 + post_slope * x
    if exafs:
        above = above + exafs * xp.sin(2.0 * xp.pi * (x - wl_offset) / 40.0) * xp.exp(-xp.clip(x, 0, None) / 120.0) \
            * (0.5 * (1.0 + xp.tanh(x / 4.0)))
    peak = white_line * xp.exp(-0.5 * ((x - wl_offset) / wl_width) ** 2)
    mu = pre_offset + pre_slope * x + step * jump * above + jump * peak
    if pre_peak:
        mu = mu + jump * pre_peak * xp.exp(-0.5 * ((x - pre_peak_offset) / pre_peak_width) ** 2)
    if victoreen:
        mu = mu + victoreen * (E / e0) ** -3
    return xp.broadcast_to(mu, (E.shape[0],) + shape).astype(dtype)


def _erf_of(xp):
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf
