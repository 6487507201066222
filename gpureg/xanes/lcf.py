"""Linear-combination fitting (LCF) of voxel spectra to reference spectra, all voxels at once.

Every voxel's normalised spectrum ``y(E)`` is fitted as ``sum_j f_j r_j(E) (+ c)``
where ``r_j`` are the normalised references on the scan's energies, ``f_j``
the fractions (>= 0 with ``nonneg``; summing to 1 with ``sum_to_one``) and
``c`` an optional constant offset. This is what Larch's ``lincombo_fit`` does
for one spectrum; here it is one batched solve for millions of voxels.

Solver
------
The design matrix ``A`` (energies x references) is the same for every voxel,
so the normal equations share ``G = A^T A`` and differ only in ``b = A^T y``
(one matrix product for all voxels). The non-negative least-squares solution
is the unconstrained solution on its own support (KKT), and the best feasible
support-restricted solution is the global optimum; with a few references
(at most 10) every support is tried: for each subset ``S`` of references,
``x_S = P_S b + q_S`` (a small precomputed matrix; the equality constraint
enters through the KKT system), its objective ``|y|^2 - 2 x.b + x.G x``
costs ``O(m^2)`` per voxel, and a running minimum keeps the best feasible
one. Exact (no iterations, no tolerance), xp-generic (NumPy/CuPy).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..core.backend import to_host
from ..core.errors import InputError, ParameterError
from ..core.energies import check_energies
from .e0 import find_e0_index
from .preedge import normalisation_functionals, pre_edge
from .references import load_references, reference_matrix
from .spectra import MIN_ENERGIES, auto_min_jump, spectra_matrix

__all__ = ["FitResult", "LinearCombination", "common_e0", "fit_references", "prepare_references"]

MAX_REFERENCES = 10
WHITEN_RIDGE = 1e-2
"""Ridge (fraction of the mean noise variance) added before whitening (``weights="noise"``)."""


@dataclass(frozen=True)
class FitResult:
    """Per-voxel linear-combination fit.

    Attributes
    ----------
    fractions : (n_refs, ...) ndarray of float32
        Weight of each reference (NaN outside the mask).
    residual : (...) ndarray of float32
        RMS of the fit residual over the fitted energies (normalised units).
    r_factor : (...) ndarray of float32
        ``sum(residual^2) / sum(y^2)`` over the fitted energies (Larch's definition).
    offset : (...) ndarray of float32 or None
        The constant term when ``offset=True``.
    mask : (...) ndarray of bool
        Voxels fitted.
    e0, edge_step : (...) ndarray of float32
        From the normalisation (NaN where not normalised).
    names : tuple of str
        Reference names, in the order of ``fractions``.
    references : (n_energy, n_refs) ndarray of float64
        The normalised references on the scan's energies (host).
    fractions_stderr : (n_refs, ...) ndarray of float32
        Standard error of every fraction from the fit's residual (0 where a
        fraction sits at its bound; NaN outside the mask).
    """

    fractions: object
    residual: object
    r_factor: object
    offset: object
    mask: object
    e0: object
    edge_step: object
    names: tuple
    references: np.ndarray
    fractions_stderr: object = None


def fit_references(spectra, energies, references, *, offset: bool = True, sum_to_one: bool = False,
                   nonneg: bool = True, mask=None, normalize: bool = True, use: str = "norm", fit_range=None,
                   min_step: float | None = None, names=None, e0="mean", column=None,
                   fit: str = "spline", weights: str = "noise") -> FitResult:
    """Fractions of reference compounds in every voxel (batched non-negative least squares).

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy absorption spectra (raw ``mu``; normalised here unless
        ``normalize=False``).
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    references : sequence
        Paths (two-column text, Athena ``.prj``), ``(energy, mu)`` pairs or
        :class:`~gpureg.xanes.references.Reference` objects; see
        :func:`~gpureg.xanes.references.load_references`. Interpolated onto
        ``energies`` and normalised like the data.
    offset : bool
        Fit a constant offset as well (not constrained).
    sum_to_one : bool
        Constrain the fractions to sum to 1.
    nonneg : bool
        Constrain the fractions to be >= 0.
    mask : (...) ndarray of bool, optional
        Voxels to fit; by default those with finite spectra and an edge step
        above ``min_step``.
    normalize : bool
        Normalise data and references with Larch's ``pre_edge``; with False
        both are used as given (already normalised).
    use : {"norm", "flat"}
        Which normalised spectrum to fit (Larch's ``norm`` or ``flat``).
    fit_range : (float, float), optional
        Energies (eV, inclusive) used in the fit; default all.
    min_step : float, optional
        Edge-step threshold for the default mask; default 0.1 x the 99.5th
        percentile of the steps (as the edge-energy maps).
    names : sequence of str, optional
        Reference names.
    e0 : float or {"mean", "each"}
        E0 of the normalisation: ``"mean"`` (default) one common E0 for data
        and references, Larch's ``find_e0`` of the mean spectrum of the voxels
        to fit; a number: that energy (eV); ``"each"``: every spectrum and
        reference its own (Larch's per-spectrum default). A common E0 keeps
        the normalisation one linear map, so a mixture normalises to the
        mixture of the normalised references (measured on real Fe K-edge
        spectra on a TXM grid, FeSO4 + Fe foil + goethite: 0.005 RMS
        noise-free with or without ``sum_to_one``, fitted sums within 1e-4;
        ``"each"``: 0.0034 but sums off by up to 2 %, 0.0085 with
        ``sum_to_one``).
    column : str, optional
        Column to read from reference files (see
        :func:`~gpureg.xanes.references.load_references`).
    fit : {"spline", "points"}
        How the normalisation fits its lines (:func:`~gpureg.xanes.preedge.pre_edge`);
        ``"points"`` with ``e0="each"`` and ``weights="uniform"`` is Larch's
        ``lincombo_fit`` exactly.
    weights : {"noise", "uniform"}
        ``"noise"`` (with a common E0): generalised least squares with the
        covariance that white noise in ``mu`` has after the normalisation (the
        pre-edge line and the step are fitted to the same noisy samples, so
        their noise tilts the whole normalised spectrum); ``"uniform"``:
        ordinary least squares (Larch). Measured on real Fe K-edge mixtures at
        1 % noise: FeSO4 + Fe foil 0.030 -> 0.012 RMS, FeSO4 + goethite
        0.012 -> 0.010; noise-free results unchanged.

    Returns
    -------
    FitResult
        On the input's device.
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    xp, mu, vox = spectra_matrix(spectra, E, "fit_references")
    e0c = common_e0(xp, mu, E, e0, mask=mask, vox=vox) if normalize else None
    names_, A = prepare_references(references, E, normalize=normalize, use=use, names=names, e0=e0c,
                                   column=column, fit=fit)
    _weights(weights)
    y, e0, step, valid = normalized_spectra(xp, mu, E, vox, normalize=normalize, use=use, mask=mask,
                                            min_step=min_step, e0=e0c, fit=fit)
    noise_map = step_noise = None
    if e0c is not None:
        # weights from the references' mean spectrum in the step term of the noise (as the slab driver,
        # chemistry_map, which fits before it has seen every voxel); each voxel's standard errors with its own
        noise_map = normalisation_noise_map(E, e0c, A, fit=fit)
        step_noise = (A.mean(axis=1), normalisation_functionals(E, e0c, fit=fit)[2])
    solver = LinearCombination(A, E, offset=offset, sum_to_one=sum_to_one, nonneg=nonneg, fit_range=fit_range,
                               noise_map=noise_map, whiten=weights == "noise", step_noise=step_noise)
    x, resid, rfac, se = solver.solve(xp, y[:, valid] if not bool(valid.all()) else y, stderr=True)
    N = mu.shape[1]
    nan = xp.float32(np.nan)
    frac = xp.full((len(names_), N), nan, dtype=xp.float32)
    res = xp.full(N, nan, dtype=xp.float32)
    rf = xp.full(N, nan, dtype=xp.float32)
    off = xp.full(N, nan, dtype=xp.float32) if offset else None
    frac[:, valid] = x[:len(names_)]
    frac_se = xp.full((len(names_), N), nan, dtype=xp.float32)
    frac_se[:, valid] = se[:len(names_)]
    res[valid] = resid
    rf[valid] = rfac
    if offset:
        off[valid] = x[len(names_)]
    return FitResult(fractions=frac.reshape(len(names_), *vox), residual=res.reshape(vox), r_factor=rf.reshape(vox),
                     offset=None if off is None else off.reshape(vox), mask=valid.reshape(vox),
                     e0=e0.reshape(vox), edge_step=step.reshape(vox), names=tuple(names_), references=A,
                     fractions_stderr=frac_se.reshape(len(names_), *vox))


def _weights(weights):
    if weights not in ("noise", "uniform"):
        raise ParameterError(f"weights must be 'noise' or 'uniform', got {weights!r}")
    return weights


def normalisation_noise_map(E, e0, A, *, fit="spline", spectrum=None):
    """(n, n) ``M``: white noise ``eps`` in ``mu`` moves the normalised spectrum by ``M eps / step`` (pre-edge line
    and edge step fitted to the same noisy samples). The step's noise scales the normalised spectrum itself:
    ``spectrum`` (n,), the mean normalised spectrum of the voxels fitted (default: the references' mean).
    Measured on a real FeSO4 + goethite mixture (40/60) at 1 % noise, 2000 draws: the fractions' standard
    errors were 15 % below their spread with the references' mean, 2 % with the mixture's own spectrum (which
    :class:`LinearCombination` takes per voxel for the standard errors, ``step_noise``)."""
    c0, c1, st, mid, half = normalisation_functionals(E, e0, fit=fit)
    L = c0[None, :] + ((np.asarray(E, dtype=np.float64) - mid) / half)[:, None] * c1[None, :]
    y = np.asarray(A, dtype=np.float64).mean(axis=1) if spectrum is None else np.asarray(spectrum, np.float64)
    return np.eye(E.size) - L - y.reshape(-1)[:, None] * st[None, :]


def common_e0(xp, mu, E, e0, *, mask=None, vox=None):
    """The E0 (eV) the fit normalises with: a number, None for ``"each"``, or find_e0 of the mean spectrum."""
    if isinstance(e0, str):
        if e0 == "each":
            return None
        if e0 != "mean":
            raise ParameterError(f"e0 must be a number, 'mean' or 'each', got {e0!r}")
        ok = xp.isfinite(mu).all(axis=0)
        if mask is not None:
            m = xp.asarray(mask).reshape(-1).astype(bool)
            if m.size == ok.size:
                ok &= m
        if not bool(ok.any()):
            return None
        mean = to_host(xp.where(ok[None, :], mu, xp.float32(0)).sum(axis=1)) / float(ok.sum())
        if mean.size < 10:
            raise InputError(f"e0='mean' needs at least 10 energies to find E0, got {mean.size} (pass e0=)")
        return float(E[int(find_e0_index(np, mean[:, None].astype(np.float32), E)[0])])
    e0 = float(e0)
    if not E[1] <= e0 <= E[-2]:
        raise ParameterError(f"e0={e0:g} eV must lie inside the scan's energies {E[1]:g}..{E[-2]:g} eV")
    return e0


def prepare_references(references, energies, *, normalize: bool = True, use: str = "norm", names=None, e0=None,
                       column=None, fit="spline"):
    """Reference names and their normalised spectra on ``energies``: (names, (n_energy, n_refs) float64).

    ``e0``: the common E0 (eV) to normalise with (None: each its own).
    Raises ValueError for a reference that does not cover the scan, is in keV,
    holds NaN, or cannot be normalised.
    """
    if use not in ("norm", "flat"):
        raise ValueError(f"use must be 'norm' or 'flat', got {use!r}")
    refs = load_references(references, names, column=column)
    if len(refs) > MAX_REFERENCES:
        raise ValueError(f"fit_references: at most {MAX_REFERENCES} references, got {len(refs)}")
    E = np.asarray(energies, dtype=np.float64)
    raw = reference_matrix(refs, E)
    if not normalize:
        return [r.name for r in refs], raw
    pe = pre_edge(raw.astype(np.float32), E, flatten=(use == "flat"), e0=e0, fit=fit)
    A = np.asarray(pe[use], dtype=np.float64)
    for k, r in enumerate(refs):
        if not np.isfinite(A[:, k]).all() or not pe["edge_step"][k] > 1e-6 * max(np.abs(raw[:, k]).max(), 1e-30):
            raise ValueError(f"reference {r.name!r}: no edge step on the scan's energies {E[0]:g}-{E[-1]:g} eV "
                             f"(cannot normalise it)")
    return [r.name for r in refs], A


def normalized_spectra(xp, mu, E, vox, *, normalize, use, mask, min_step, e0=None, fit="spline"):
    """(y (n, N) float32, e0 (N,), step (N,), valid (N,) bool) for the voxels to fit."""
    finite = xp.isfinite(mu).all(axis=0)
    user = None
    if mask is not None:
        user = xp.asarray(mask)
        if tuple(user.shape) != tuple(vox):
            raise ValueError(f"mask must have shape {tuple(vox)} (spectra.shape[1:]), got {tuple(user.shape)}")
        user = user.reshape(-1).astype(bool)
    sel = finite if user is None else finite & user
    nan = xp.float32(np.nan)
    if normalize:
        pe = pre_edge(mu, E, flatten=(use == "flat"), mask=sel, e0=e0, fit=fit)
        y, e0, step = pe[use], pe["e0"], pe["edge_step"]
    else:
        y = mu
        e0 = xp.full(mu.shape[1], nan, dtype=xp.float32)
        step = xp.full(mu.shape[1], nan, dtype=xp.float32)
    valid = sel & xp.isfinite(y).all(axis=0)
    if normalize and user is None:
        ok = xp.isfinite(step) & valid
        thr = auto_min_jump(xp, step[ok]) if min_step is None else float(min_step)
        valid &= xp.where(ok, step, xp.float32(0)) > thr
    elif normalize and min_step is not None:
        valid &= xp.where(xp.isfinite(step), step, xp.float32(0)) > float(min_step)
    if not bool(valid.any()):
        raise ValueError("no voxel to fit: every spectrum is masked, non-finite or below the edge-step threshold")
    return y, e0, step, valid


class LinearCombination:
    """Batched least squares ``y ~ A f (+ c)`` with ``f >= 0`` and/or ``sum f = 1``, for many ``y`` at once.

    Parameters
    ----------
    A : (n_energy, n_refs) array_like
        Reference spectra on the scan's energies (host).
    energies : (n_energy,) array_like
        eV (for ``fit_range``).
    offset, sum_to_one, nonneg : bool
        As :func:`fit_references`.
    fit_range : (float, float), optional
        Energies used (inclusive).
    """

    def __init__(self, A, energies, *, offset=True, sum_to_one=False, nonneg=True, fit_range=None, noise_map=None,
                 whiten: bool = False, step_noise=None):
        A = np.asarray(A, dtype=np.float64)
        E = np.asarray(energies, dtype=np.float64)
        if A.ndim != 2 or A.shape[0] != E.size:
            raise ValueError(f"references must be ({E.size}, n_refs), got {A.shape}")
        if not np.isfinite(A).all():
            raise ValueError("references hold NaN/inf on the scan's energies")
        rows = np.ones(E.size, bool)
        if fit_range is not None:
            lo, hi = (float(v) for v in fit_range)
            rows = (E >= lo) & (E <= hi)
        r = A.shape[1]
        m = r + int(bool(offset))
        if rows.sum() < m + 1:
            raise ValueError(f"fit_range {fit_range} holds {int(rows.sum())} energies; {m} parameters need at least "
                             f"{m + 1}")
        Af = np.concatenate([A[rows], np.ones((int(rows.sum()), 1))], axis=1) if offset else A[rows]
        self.rows, self.n_refs, self.m, self.offset = rows, r, m, bool(offset)
        self.raw_design = Af
        M = np.eye(E.size) if noise_map is None else np.asarray(noise_map, dtype=np.float64)
        self.noise_rows = M[rows]
        # (spectrum, st): M's step term is -spectrum st^T; a voxel's own is -y st^T (see error_terms)
        self.step_noise = None if step_noise is None else tuple(np.asarray(v, np.float64) for v in step_noise)
        C = (M @ M.T)[np.ix_(rows, rows)]
        self.whitener = None
        if whiten and noise_map is not None:
            # generalised least squares: C^(-1/2) (ridge WHITEN_RIDGE x mean variance) makes the noise white
            w, V = np.linalg.eigh(C + WHITEN_RIDGE * np.trace(C) / C.shape[0] * np.eye(C.shape[0]))
            self.whitener = (V * w ** -0.5) @ V.T
            Af = self.whitener @ Af
            C = self.whitener @ C @ self.whitener.T
        self.noise_cov = C
        self.design = Af
        G = Af.T @ Af
        self.G = G
        c = np.r_[np.ones(r), np.zeros(m - r)]
        if nonneg:
            subsets = [s for k in range(0 if not sum_to_one else 1, r + 1) for s in itertools.combinations(range(r), k)]
        else:
            subsets = [tuple(range(r))]
        self.nonneg = bool(nonneg)
        self.sum_to_one = bool(sum_to_one)
        self._terms = None
        self.plans = []
        for s in subsets:
            cols = list(s) + list(range(r, m))
            P = np.zeros((m, m))
            q = np.zeros(m)
            if cols:
                Gs = G[np.ix_(cols, cols)]
                if sum_to_one:
                    cs = c[cols]
                    K = np.block([[Gs, cs[:, None]], [cs[None, :], np.zeros((1, 1))]])
                    Ki = np.linalg.pinv(K)
                    P[np.ix_(cols, cols)] = Ki[:-1, :-1]
                    q[cols] = Ki[:-1, -1]
                else:
                    P[np.ix_(cols, cols)] = np.linalg.pinv(Gs)
            self.plans.append((np.array(s, dtype=np.int64), P, q))

    def error_terms(self):
        """Per plan: diag of ``P A^T W A P`` (m,) and ``tr((I - H) W (I - H))``, ``W`` the noise covariance of the
        fitted spectra per unit noise (identity, or ``M M^T`` for a ``noise_map`` M) and ``H = A P A^T``:
        the residual sum of squares over the latter estimates the unit noise variance. With ``step_noise``
        also, per plan, ``K M st`` (m,) and ``K spectrum`` (m,), ``K`` the plan's linear map from spectra to
        parameters: a voxel whose spectrum ``y`` gives ``K y = x - q`` has the noise map
        ``M + (spectrum - y) st^T``, so its variance is ``diag + 2 (K spectrum - K y) K M st
        + (K spectrum - K y)^2 |st|^2`` (:meth:`solve`)."""
        if self._terms is None:
            A, W = self.design, self.noise_cov
            diag, tr, kst, kbar = [], [], [], []
            WA, trW = W @ A, float(np.trace(W))
            AWA = A.T @ WA
            Wh = np.eye(A.shape[0]) if self.whitener is None else self.whitener
            for _, P, _ in self.plans:
                AP = A @ P
                diag.append(np.clip(np.einsum("ij,ik,kj->j", AP, W, AP), 0, None))
                # tr((I - AP A^T) W (I - AP A^T)^T) with (n, m) products only
                t = trW - 2 * float((WA * AP).sum()) + float(((AP.T @ AP) * AWA).sum())
                tr.append(max(t, 1e-12))
                if self.step_noise is not None:
                    spectrum, st = self.step_noise
                    K = AP.T @ Wh                                   # (m, rows): spectra -> parameters
                    kst.append(K @ (self.noise_rows @ st))
                    kbar.append(K @ spectrum[self.rows])
            extra = None if self.step_noise is None else (np.stack(kst), np.stack(kbar),
                                                          float(self.step_noise[1] @ self.step_noise[1]))
            self._terms = (np.stack(diag), np.array(tr), extra)
        return self._terms

    def solve(self, xp, Y, *, stderr: bool = False):
        """Fit columns of ``Y`` (n_energy, N): (x (m, N) float32 with fractions then offset, RMS residual, R-factor)
        and, with ``stderr``, the standard errors of ``x`` (m, N): ``sqrt(s^2 diag(P_S))`` on the winning support
        ``S`` (``P_S`` the inverse normal (or KKT) matrix there, ``s^2`` the residual variance per degree of
        freedom; 0 for a fraction held at its bound)."""
        f32 = xp.float32
        Yf = Y[xp.asarray(np.flatnonzero(self.rows))] if not self.rows.all() else Y
        Yf = Yf.astype(f32, copy=False)
        Yw = Yf if self.whitener is None else xp.asarray(self.whitener.astype(np.float32)) @ Yf
        At = xp.asarray(self.design.T.astype(np.float32))
        b = At @ Yw                                               # (m, N)
        G = xp.asarray(self.G.astype(np.float32))
        N = Yf.shape[1]
        best_f = xp.full(N, np.inf, dtype=f32)
        best_x = xp.zeros((self.m, N), dtype=f32)
        best_k = xp.zeros(N, dtype=xp.int32)
        for k, (s, P, q) in enumerate(self.plans):
            x = xp.asarray(P.astype(np.float32)) @ b + xp.asarray(q.astype(np.float32))[:, None]
            f = ((G @ x) * x).sum(axis=0) - 2 * (x * b).sum(axis=0)   # |y|^2 omitted: same for every subset
            if self.nonneg and s.size:
                f = xp.where((x[xp.asarray(s)] >= 0).all(axis=0), f, f32(np.inf))
            better = f < best_f
            best_f = xp.where(better, f, best_f)
            best_x = xp.where(better[None, :], x, best_x)
            best_k = xp.where(better, xp.int32(k), best_k)
        r = Yf - xp.asarray(self.raw_design.astype(np.float32)) @ best_x     # reported in the spectra's units
        ss = (r * r).sum(axis=0)
        yy = (Yf * Yf).sum(axis=0)
        rms = xp.sqrt(ss / f32(Yf.shape[0]))
        rfac = ss / xp.where(yy > 0, yy, f32(1))
        if not stderr:
            return best_x, rms.astype(f32), rfac.astype(f32)
        if self.whitener is not None:
            rw = Yw - xp.asarray(self.design.astype(np.float32)) @ best_x
            ss = (rw * rw).sum(axis=0)
        diag, dof, extra = self.error_terms()
        var = ss / xp.asarray(dof.astype(np.float32))[best_k]
        d = xp.asarray(diag.astype(np.float32))[best_k].T                     # (m, N)
        if extra is not None:
            kst, kbar, g = (xp.asarray(v.astype(np.float32)) if isinstance(v, np.ndarray) else v for v in extra)
            q = xp.asarray(np.stack([p[2] for p in self.plans]).astype(np.float32))[best_k].T
            u = kbar[best_k].T - (best_x - q)                                   # K (spectrum - y)
            d = xp.maximum(d + 2 * u * kst[best_k].T + u * u * xp.float32(g), xp.float32(0))
        se = xp.sqrt(d * var[None, :])
        return best_x, rms.astype(f32), rfac.astype(f32), se.astype(f32)


def host_result(res: FitResult) -> FitResult:
    """A copy of ``res`` with every array on the host."""
    conv = {k: (None if getattr(res, k) is None else to_host(getattr(res, k)))
            for k in ("fractions", "residual", "r_factor", "offset", "mask", "e0", "edge_step", "fractions_stderr")}
    return FitResult(names=res.names, references=res.references, **conv)
