"""Per-projection alignment before FBP: iterative reprojection, coarse to fine.

Nano-tomography projections wobble: stage run-out and drift move each
projection by a few detector pixels, and FBP bakes that into blur. Following
the joint reprojection scheme (Gürsoy et al., Sci. Rep. 7, 11818, 2017; TomoPy's
``align_seq``/``align_joint``), every iteration reconstructs the shifted
projections (FBP, :func:`~gpureg.recon.reconstruct_fbp`), forward-projects the
volume (ASTRA, :func:`~gpureg.recon.forward_project`) and registers each
projection to its reprojection. Unlike TomoPy, the projections are never
resampled twice: the total shift is applied once to the input (Fourier shift,
edge-padded) at every iteration. Coarse to fine: projections binned 2x2
(4x4 ...) first, full resolution last.

Convention
----------
``shifts[k] = (dr, dc)`` in detector pixels: the measured projection ``k`` is
the ideal one displaced by ``+(dr, dc)``, ``measured(r, c) = ideal(r - dr, c - dc)``;
the aligned projection is ``measured(r + dr, c + dc)``. Part of the shifts is
a sample translation, which the 3D registration handles and which projections
alone cannot tell from one: column shifts ``a + b cos(theta) + c sin(theta)``
(``a`` is the rotation centre, set by ``center``) and a constant row shift. The
estimate is constrained to have no such part (``unobservable_part``), so the
frame does not drift from iteration to iteration or from energy to energy.

Registration of a projection to its reprojection
------------------------------------------------
First iteration at the coarsest level: FFT cross-correlation (integer peak,
parabolic sub-pixel fit), robust to shifts of many pixels. Then Gauss-Newton
steps on ``measured ~ alpha * model(x - d) + beta`` (4 unknowns per
projection, normal equations batched over projections), accurate for the
sub-pixel residuals that remain. A cheap start, when every projection holds
the same total attenuation (the sample stays inside the field of view): the
centre of mass of each projection (rows: constant for a parallel beam;
columns: a sinusoid of theta).

Array code is written once against ``xp`` (NumPy or CuPy); on the GPU the FBP
and the forward projection run in ASTRA-CUDA on device arrays.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..core.backend import array_device, to_host, xp_of
from ..core.errors import InputError, ParameterError
from .fbp import fbp_device, reconstruct_fbp
from .project import forward_project
from .wobble import WOBBLE_HINT_PX, com_shifts, input_wobble, unobservable_part, wobble_estimate

__all__ = ["AlignmentResult", "AlignmentWarning", "align_energy", "align_projections", "com_shifts", "input_wobble",
           "shift_projections", "unobservable_part", "wobble_estimate", "WOBBLE_HINT_PX"]

_log = logging.getLogger("gpureg")


class AlignmentWarning(RuntimeWarning):
    """Projection alignment did not converge or moved too far; the unaligned reconstruction is used."""


@dataclass(frozen=True)
class AlignmentResult:
    """What :func:`align_projections` found.

    Attributes
    ----------
    volume : (nz, nx, nx) ndarray of float32
        FBP of the aligned projections (of the input when ``applied`` is False);
        on the device when the input was.
    shifts : (n_angle, 2) ndarray of float64
        Applied ``(row, column)`` shift per projection (pixels; zeros when not applied).
    estimated : (n_angle, 2) ndarray of float64
        The estimate itself (equal to ``shifts`` when applied).
    iterations : int
        Reconstruct-reproject-register iterations over all levels.
    error_before, error_after : float
        Relative RMS reprojection error ``|p - P(FBP(p))| / |p|`` of the unaligned and
        the aligned projections, both on the coarsest level's binned projections.
    converged : bool
        The last update's RMS was below ``tol``.
    applied : bool
        The shifts were applied.
    status : str
        ``"aligned"``; ``"unchanged"``: no wobble worth removing (the reprojection error fell
        by less than ``min_gain``), the unaligned reconstruction is kept, no warning;
        ``"fallback"``: the alignment failed (``reason``), warned, unaligned reconstruction.
    reason : str
        Why not applied ("" when applied).
    seconds : float
        Wall time (including the final FBP).
    """

    volume: object
    shifts: np.ndarray
    estimated: np.ndarray
    iterations: int
    error_before: float
    error_after: float
    converged: bool
    applied: bool
    status: str
    reason: str
    seconds: float


def align_projections(projections, theta_deg, *, center=None, filter: str = "ram-lak", device: str = "auto",
                      reference=None, levels=None, tol: float = 0.05, max_shift: float | None = None,
                      min_gain: float = 0.02, com_start: bool = True, smooth_modes: int = 8,
                      name: str = "projections") -> AlignmentResult:
    """Estimate and remove a (row, column) shift per projection, then reconstruct (FBP).

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals (``-log`` transmission, :func:`~gpureg.recon.flatfield_correct`), NumPy or CuPy.
    theta_deg : (n_angle,) array_like
        Angles in degrees; at least 8.
    center, filter, device
        As in :func:`~gpureg.recon.reconstruct_fbp` (``center`` "auto" is estimated once, before alignment).
    reference : (nz, nx, nx) ndarray, optional
        A reconstruction of the same sample on the same grid (the reference
        energy's aligned volume): the first model is its reprojection instead of
        the FBP of the unaligned projections, so fewer coarse iterations are needed.
    levels : sequence of (int, int), optional
        ``(binning, iterations)`` from coarse to fine; default: binning 2 (4 for
        ``nx >= 128`` ...) with up to 6 iterations (3 with ``reference``), then
        full resolution with 1.
    tol : float
        Converged when the last update's RMS is below ``tol`` pixels.
    max_shift : float, optional
        Largest shift accepted (pixels; default ``max(12, nx / 10)``: 3 px RMS of jitter reaches
        about 9 px over 181 projections).
    min_gain : float
        Apply the shifts only when they lower the relative reprojection error by at
        least this fraction (default 2 %: jitter-free data stays exactly unchanged;
        0.3 px RMS of jitter already lowers it by about 20 % at 64^3).
    com_start : bool
        Start from the centre-of-mass estimate when the projections conserve their total.
    smooth_modes : int
        With a centre-of-mass start, the column shifts' ``smooth_modes`` slowest cosine
        modes over the angular range stay those of the centre of mass (reprojection alone
        lets them drift: 0.17 px RMS error at 128^3 instead of 0.05; ``bench/align.py``).
    name : str
        Named in warnings (e.g. "energy 6550 eV").

    Returns
    -------
    AlignmentResult
        When the estimate does not converge, exceeds ``max_shift`` or makes the
        reprojection error worse, an :class:`AlignmentWarning` names ``name`` and the
        unaligned reconstruction is returned (``applied=False``).
    """
    t0 = time.perf_counter()
    xp = xp_of(projections)
    proj = xp.asarray(projections, dtype=xp.float32)
    if proj.ndim != 3:
        raise InputError(f"{name}: projections must be (n_angle, nz, nx), got shape {proj.shape}")
    n_angle, nz, nx = proj.shape
    theta = np.asarray(to_host(theta_deg), dtype=np.float64).ravel()
    if theta.shape != (n_angle,):
        raise InputError(f"{name}: theta_deg must have one angle per projection ({n_angle}), got {theta.size}")
    if n_angle < 8 or min(nz, nx) < 8:
        raise InputError(f"{name}: alignment needs at least 8 angles and 8x8 pixels, got shape {proj.shape}")
    if tol <= 0 or not np.isfinite(tol):
        raise ParameterError(f"tol must be > 0 pixels, got {tol}")
    if isinstance(center, str):
        from .project import estimate_center

        if center.lower() != "auto":
            raise ParameterError(f"center must be a number, None or 'auto', got {center!r}")
        center = estimate_center(proj, theta)
    c = (nx - 1) / 2.0 if center is None else float(center)
    limit = max(12.0, nx / 10.0) if max_shift is None else float(max_shift)
    if reference is not None and tuple(reference.shape) != (nz, nx, nx):
        raise InputError(f"{name}: reference must be a ({nz}, {nx}, {nx}) volume, got shape {reference.shape}")
    plan = _levels(nx, reference is not None) if levels is None else [(int(b), int(k)) for b, k in levels]
    if not plan or any(b < 1 or k < 0 for b, k in plan):
        raise ParameterError(f"levels must be (binning >= 1, iterations >= 0) pairs, got {levels!r}")
    fbp = {"filter": filter, "device": device}
    fp = fbp_device(device)  # the forward projection runs where FBP runs (ASTRA-CUDA or CPU)

    shifts, anchor = np.zeros((n_angle, 2)), None
    if com_start:
        start = com_shifts(proj, theta)
        if start is not None and np.abs(start).max() <= limit:
            shifts = anchor = start
    b0 = plan[0][0]
    error_before = error_after = None
    iterations, update = 0, np.inf
    for level, (b, n_iter) in enumerate(plan):
        binned, cb = _bin(xp, proj, b), _binned_center(c, b)
        for k in range(n_iter):
            first = level == 0 and k == 0
            aligned = shift_projections(binned, shifts / b)
            if first and reference is not None:
                volume = _bin3(xp, xp.asarray(reference, dtype=xp.float32), b)
                model = _reproject(volume, theta, center=cb, device=fp)
            else:
                volume = reconstruct_fbp(aligned, theta, center=cb, **fbp)
                model = _reproject(volume, theta, center=cb, device=fp)
            weight = _window(xp, aligned.shape[1:], np.abs(shifts).max() / b)
            err = _error(xp, aligned, model, weight)
            if first and not np.any(shifts) and reference is None:
                error_before = err
            register = _xcorr if first else _gauss_newton
            h, w = aligned.shape[1:]
            step = np.concatenate([register(xp, aligned[a:b], model[a:b], weight)
                                   for a, b in _chunks(n_angle, h * w * (64 if first else 48))])
            shifts = _constrain(shifts + _constrain(step * b, theta), theta, anchor, smooth_modes)
            iterations += 1
            update = float(np.sqrt(((step * b) ** 2).mean()))
            _log.debug("%s: alignment binning %d iteration %d: error %.4f, update %.3f px RMS", name, b, k, err,
                       update)
            if not np.isfinite(update) or update < (tol / 2 if level + 1 < len(plan) else tol):
                break
    converged = bool(np.isfinite(update) and update < tol)
    if error_before is None:
        error_before = _model_error(xp, _bin(xp, proj, b0), theta, _binned_center(c, b0), fbp)
    error_after = _model_error(xp, shift_projections(_bin(xp, proj, b0), shifts / b0), theta,
                               _binned_center(c, b0), fbp)
    reason, status = "", "fallback"
    if not converged:
        reason = f"did not converge (last update {update:.3g} px RMS after {iterations} iterations, tol {tol:g})"
    elif np.abs(shifts).max() > limit:
        reason = f"moves a projection by {np.abs(shifts).max():.1f} px (limit {limit:.1f})"
    elif error_after > error_before:
        reason = f"raises the reprojection error ({error_before:.4f} -> {error_after:.4f})"
    elif error_after > (1.0 - min_gain) * error_before:
        reason, status = (f"no wobble worth removing (reprojection error {error_before:.4f} -> {error_after:.4f}, "
                          f"less than {100 * min_gain:g} % lower)"), "unchanged"
    applied = not reason
    if applied:
        status = "aligned"
        volume = reconstruct_fbp(shift_projections(proj, shifts), theta, center=center, **fbp)
    elif status == "unchanged":
        _log.info("gpureg: %s: projection alignment: %s", name, reason)
        volume = reconstruct_fbp(proj, theta, center=center, **fbp)
    else:
        warnings.warn(f"{name}: projection alignment {reason}; using the unaligned reconstruction",
                      AlignmentWarning, stacklevel=2)
        volume = reconstruct_fbp(proj, theta, center=center, **fbp)
    if array_device(projections) == "cpu":
        volume = to_host(volume)
    return AlignmentResult(volume=volume, shifts=shifts if applied else np.zeros_like(shifts), estimated=shifts,
                           iterations=iterations, error_before=float(error_before), error_after=float(error_after),
                           converged=converged, applied=applied, status=status, reason=reason,
                           seconds=time.perf_counter() - t0)


def align_energy(reader, i: int, *, center=None, filter: str = "ram-lak", device: str = "auto",
                 reference=None, repairs: dict | None = None) -> AlignmentResult:
    """:func:`align_projections` on energy ``i`` of an input opened with :func:`gpureg.io.open_input`.

    Parameters
    ----------
    reader : gpureg.io.InputReader
        Open input of kind ``"projections"``.
    i : int
        Energy index.
    center, filter, device, reference
        As in :func:`align_projections`.

    Raises
    ------
    gpureg.io.InputError
        The input holds reconstructions (nothing to align).
    gpureg.io.BadEnergyError
        The energy cannot give a valid volume (see :func:`~gpureg.recon.reconstruct_energy`).
    """
    from ..io.files import BadEnergyError, InputError
    from .flatfield import energy_problem, flatfield_correct
    from .repair import repair_projections

    if reader.kind != "projections":
        raise InputError(f"{reader.path}: holds reconstructions; projection alignment needs projections")
    energy = float(reader.energies[i])
    raw, flat, dark = reader.projections(i), reader.flat(i), reader.dark(i)
    problem = energy_problem(raw, flat, dark)
    if problem is not None:
        raise BadEnergyError(f"{reader.path}: energy {energy:g} eV: {problem}", energy=energy, reason=problem)
    p, rep = repair_projections(flatfield_correct(raw, flat, dark, warn=False))  # dead/hot pixels first, recorded
    if repairs is not None:
        repairs[i] = rep
    return align_projections(p, reader.theta, center=center, filter=filter, device=device, reference=reference,
                             name=f"{reader.path}: energy {energy:g} eV")


def shift_projections(projections, shifts):
    """Move each projection by ``-shifts[k]``: ``out[k](r, c) = projections[k](r + dr, c + dc)``.

    Sub-pixel Fourier shift of every projection at once, edge-padded (no
    wrap-around of the far edge into the field). xp-generic.

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
    shifts : (n_angle, 2) array_like
        ``(dr, dc)`` per projection, pixels.

    Returns
    -------
    (n_angle, nz, nx) ndarray of float32
    """
    xp = xp_of(projections)
    p = xp.asarray(projections, dtype=xp.float32)
    s = np.asarray(to_host(shifts), dtype=np.float64).reshape(-1, 2)
    if s.shape[0] != p.shape[0]:
        raise ValueError(f"shifts must be ({p.shape[0]}, 2), got {np.shape(shifts)}")
    if not np.any(s):
        return p
    n, h, w = p.shape
    m = int(np.ceil(np.abs(s).max())) + 2
    hh, ww = h + 2 * m, w + 2 * m
    kr = xp.asarray(np.fft.fftfreq(hh))[None, :, None]
    kc = xp.asarray(np.fft.rfftfreq(ww))[None, None, :]
    out = xp.empty_like(p)
    for a, b in _chunks(n, hh * ww * 16):  # spectrum, phase and padded copy of a chunk within _CHUNK_BYTES
        sd = xp.asarray(s[a:b])
        phase = (xp.exp(2j * np.pi * kr * sd[:, 0, None, None]).astype(xp.complex64)
                 * xp.exp(2j * np.pi * kc * sd[:, 1, None, None]).astype(xp.complex64))  # (n,h,1)*(n,1,w)
        padded = xp.pad(p[a:b], ((0, 0), (m, m), (m, m)), mode="edge")
        out[a:b] = xp.fft.irfft2(xp.fft.rfft2(padded) * phase, s=(hh, ww))[:, m:m + h, m:m + w]
    return out


# --- internals ---------------------------------------------------------------------------

_CHUNK_BYTES = 1 << 28  # temporary memory per batch of projections (shift, registration): 256 MiB


def _chunks(n, bytes_per_item):
    """``(start, stop)`` batches of ``n`` projections using at most :data:`_CHUNK_BYTES` of temporaries each."""
    step = max(1, int(_CHUNK_BYTES // max(int(bytes_per_item), 1)))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _levels(nx, warm):
    """Default plan: 2x2 binning (none below 48 columns), preceded by coarser levels down to 32-63 columns.

    Full resolution is left out by default: at 64-128 columns the shifts found on 2x2-binned
    projections are within about 0.05-0.1 px of the truth, and one full-resolution forward
    projection costs about two FBPs (bench/align.py).
    """
    fine = 2 if nx >= 48 else 1
    plan, b = [(fine, 4)], fine
    while nx // (2 * b) >= 32:
        b *= 2
        plan.insert(0, (b, 2 if warm else 4))
    if len(plan) == 1 and not warm:
        plan[0] = (fine, 6)
    return plan


def _binned_center(c, b):
    """Rotation-axis column after ``b x b`` binning (pixel j covers columns j*b .. j*b + b - 1)."""
    return (c - (b - 1) / 2.0) / b


def _bin(xp, p, b):
    """Block means of ``b x b`` detector pixels (edge-padded to a multiple of ``b``)."""
    if b == 1:
        return p
    n, h, w = p.shape
    ph, pw = -h % b, -w % b
    if ph or pw:
        p = xp.pad(p, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return p.reshape(n, (h + ph) // b, b, (w + pw) // b, b).mean(axis=(2, 4), dtype=xp.float32)


def _bin3(xp, v, b):
    """Block means of ``b^3`` voxels (edge-padded like :func:`_bin`: the binned detector's grid)."""
    if b == 1:
        return v
    pad = [(0, -n % b) for n in v.shape]
    if any(p for _, p in pad):
        v = xp.pad(v, pad, mode="edge")
    z, y, x = v.shape
    return v.reshape(z // b, b, y // b, b, x // b, b).mean(axis=(1, 3, 5), dtype=xp.float32)


def _model_error(xp, projections, theta, center, fbp):
    """Relative reprojection error of projections against the reprojection of their own FBP."""
    model = _reproject(reconstruct_fbp(projections, theta, center=center, **fbp), theta, center=center,
                       device=fbp_device(fbp["device"]))
    return _error(xp, projections, model, _window(xp, projections.shape[1:], 0.0))


def _reproject(volume, theta, center=None, device="cpu"):
    """Forward projection of ``volume`` (ASTRA 2D; CUDA with ``device="gpu"``), in the geometry FBP inverted."""
    xp = xp_of(volume)
    out = forward_project(volume, theta, projector="linear", device=device)
    nx = out.shape[-1]
    if center is not None and abs(center - (nx - 1) / 2.0) > 1e-6:  # FBP shifted the axis to the middle
        shift = np.zeros((out.shape[0], 2))
        shift[:, 1] = (nx - 1) / 2.0 - center
        out = shift_projections(out, shift)
    return xp.asarray(out)


def _window(xp, shape, margin):
    """Weights: 1 inside, a cosine taper over the ``margin + 2`` pixels at each detector edge."""
    out = []
    for n in shape:
        m = min(int(np.ceil(margin)) + 2, n // 4)
        w = np.ones(n)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
        w[:m], w[n - m:] = ramp, ramp[::-1]
        out.append(w)
    return xp.asarray((out[0][:, None] * out[1][None, :]).astype(np.float32))


def _error(xp, measured, model, weight):
    num = float(((measured - model) ** 2 * weight).sum())
    den = float((measured ** 2 * weight).sum())
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def _xcorr(xp, measured, model, weight):
    """Per-projection displacement of ``measured`` relative to ``model``: FFT cross-correlation peak, parabolic fit."""
    n, h, w = measured.shape
    a = (measured - measured.mean(axis=(1, 2), keepdims=True)) * weight
    s = (model - model.mean(axis=(1, 2), keepdims=True)) * weight
    corr = xp.fft.irfft2(xp.fft.rfft2(a, s=(2 * h, 2 * w)) * xp.conj(xp.fft.rfft2(s, s=(2 * h, 2 * w))),
                         s=(2 * h, 2 * w))
    flat = corr.reshape(n, -1)
    k = xp.argmax(flat, axis=1)
    r, c = k // (2 * w), k % (2 * w)
    idx = xp.arange(n)

    def peak(v0, v1, v2):
        den = v0 - 2 * v1 + v2
        return xp.where(den < 0, 0.5 * (v0 - v2) / xp.where(den < 0, den, -1), 0.0)

    dr = peak(corr[idx, (r - 1) % (2 * h), c], corr[idx, r, c], corr[idx, (r + 1) % (2 * h), c])
    dc = peak(corr[idx, r, (c - 1) % (2 * w)], corr[idx, r, c], corr[idx, r, (c + 1) % (2 * w)])
    r = xp.where(r >= h, r - 2 * h, r) + dr
    c = xp.where(c >= w, c - 2 * w, c) + dc
    return to_host(xp.stack([r, c], axis=1)).astype(np.float64)


def _gauss_newton(xp, measured, model, weight):
    """One Gauss-Newton step of ``measured ~ alpha * model(x - d) + beta`` per projection; returns ``d``."""
    gr, gc = xp.gradient(model, axis=(1, 2))
    basis = xp.stack([model, xp.ones_like(model), -gr, -gc], axis=1)  # (n, 4, h, w)
    wb = basis * weight
    n = model.shape[0]
    wb, basis = wb.reshape(n, 4, -1), basis.reshape(n, 4, -1)
    normal = (wb @ basis.transpose(0, 2, 1)).astype(xp.float64)
    rhs = (wb @ (measured - model).reshape(n, -1, 1))[..., 0].astype(xp.float64)
    normal = normal + 1e-9 * xp.eye(4)[None] * xp.trace(normal, axis1=1, axis2=2)[:, None, None]
    sol = xp.linalg.solve(normal, rhs[..., None])[..., 0]
    return to_host(sol[:, 2:]).astype(np.float64)


def _constrain(shifts, theta, anchor=None, modes=0):
    """Remove the unobservable part; with ``anchor``, take the ``modes`` smoothest column modes from it.

    Column shifts that vary slowly with the angle are nearly unobservable by
    reprojection (they drift with noise, more with more iterations); the centre of
    mass measures them directly, so they are kept from ``anchor`` (cosine modes
    ``cos(k pi (theta - theta0) / range)``, k < ``modes``).
    """
    out = shifts - unobservable_part(shifts, theta)
    if anchor is not None and modes > 0:
        t = np.asarray(theta, dtype=np.float64)
        u = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
        basis = np.cos(np.pi * np.arange(modes)[None, :] * u[:, None])  # (n_angle, modes)
        coef, *_ = np.linalg.lstsq(basis, out[:, 1] - anchor[:, 1], rcond=None)
        out[:, 1] -= basis @ coef
        out -= unobservable_part(out, theta)
    return out
