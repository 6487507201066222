"""Spectral denoising: truncated PCA of the (energy x voxel) matrix, components chosen from the data.

A stack of thousands of voxel spectra spans only a few chemical components; what
lies outside their span is noise. The mean spectrum ``m`` and the principal
directions ``U`` (n_energy x K) are estimated from a sample of voxels (the
energy x energy covariance, one matrix product over the voxels, then a small
``eigh`` on the host: exact, and the covariance of a large stack is summed slab
by slab, so nothing larger than a slab is ever in memory; with a few dozen
energies this is cheaper than a randomised SVD and has no sampling error of its
own). Every voxel spectrum ``x`` is then replaced by ``m + U U^T (x - m)``.

Number of components (``components="auto"``): the eigenvalues of the noise part
of a covariance cluster at the noise variance; Gavish & Donoho's optimal hard
threshold for unknown noise (IEEE Trans. Inf. Theory 60, 2014) keeps the
singular values above ``omega(beta) x`` their median, ``beta = n_energy /
n_voxels``: here eigenvalues above ``omega(beta)^2 x`` the median eigenvalue
(about 2.04 x for ``beta -> 0``). An integer ``K`` keeps that many.

The residual ``x - m - U U^T (x - m)`` also gives every voxel's noise level,
``sigma^2 = |residual|^2 / (n_energy - K)``, from which the edge-energy
uncertainty map is propagated (:func:`gpureg.xanes.edge.edge_energy`).
All array code is ``xp``-generic (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.backend import to_host
from ..core.errors import InputError, ParameterError
from .spectra import spectra_matrix

__all__ = ["DENOISE", "SpectralBasis", "denoise_spectra", "parse_denoise", "project", "spectral_basis"]

DENOISE = ("auto", "off")
"""Named choices of ``--denoise-spectra`` (or an integer number of components)."""


@dataclass(frozen=True)
class SpectralBasis:
    """Mean spectrum and principal directions of a set of voxel spectra.

    Attributes
    ----------
    mean : (n_energy,) ndarray of float64
    components : (n_energy, K) ndarray of float64
        Orthonormal columns.
    eigenvalues : (n_energy,) ndarray of float64
        Variance along every principal direction, largest first (scree plot).
    threshold : float
        The eigenvalue threshold of ``"auto"`` (NaN for a given K).
    n_voxels : int
        Voxels the basis was estimated from.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    threshold: float
    n_voxels: int

    @property
    def k(self) -> int:
        """Number of components kept."""
        return int(self.components.shape[1])

    def to_dict(self) -> dict:
        """Plain-number summary (for the result's attributes and the report)."""
        return {"components": self.k, "n_voxels": self.n_voxels, "threshold": float(self.threshold),
                "eigenvalues": [float(v) for v in self.eigenvalues]}


def parse_denoise(value):
    """``"auto"`` / ``"off"`` / a positive integer (from text too) -> ``"auto"``, None or int."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise ParameterError(f"denoise_spectra must be 'auto', 'off' or a number of components >= 1, got {value!r}")
        return int(value)
    text = str(value).strip().lower()
    if text in ("off", "none", "0", "false"):
        return None
    if text == "auto":
        return "auto"
    if text.isdigit():
        return parse_denoise(int(text))
    raise ParameterError(f"denoise_spectra must be 'auto', 'off' or a number of components >= 1, got {value!r}")


def spectral_basis(sample, components="auto", *, max_components: int = 20) -> SpectralBasis:
    """Principal directions of voxel spectra and the number to keep.

    Parameters
    ----------
    sample : (n_energy, M) ndarray
        NumPy or CuPy spectra (finite), e.g. a sample of particle voxels.
    components : "auto" or int
        Number of components kept, or chosen by the Gavish-Donoho threshold.
    max_components : int
        Upper bound for ``"auto"``.

    Returns
    -------
    SpectralBasis
    """
    xp, X, _ = spectra_matrix(sample, np.arange(sample.shape[0]), "spectral_basis")
    n, M = X.shape
    if M < 2:
        raise InputError(f"spectral_basis: need at least 2 voxel spectra, got {M}")
    mean = X.astype(xp.float64).mean(axis=1)
    Xc = X - mean.astype(xp.float32)[:, None]
    G = np.asarray(to_host(Xc @ Xc.T), dtype=np.float64) / M
    w, V = np.linalg.eigh(0.5 * (G + G.T))
    order = np.argsort(w)[::-1]
    w, V = np.clip(w[order], 0, None), V[:, order]
    if components == "auto":
        beta = min(n / M, 1.0)
        omega = 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43
        thr = omega ** 2 * float(np.median(w))
        k = int(np.clip((w > thr).sum(), 1, min(max_components, n - 1)))
    else:
        k, thr = int(components), float("nan")
        if not 1 <= k < n:
            raise ParameterError(f"spectral_basis: components must be 1..{n - 1} (n_energy - 1), got {components!r}")
    return SpectralBasis(mean=np.asarray(to_host(mean), dtype=np.float64), components=V[:, :k], eigenvalues=w,
                         threshold=thr, n_voxels=int(M))


def project(xp, mu, basis: SpectralBasis, *, denoise: bool = True):
    """(spectra (n, N) float32: denoised or as given, noise sigma per voxel (N,) float32) for ``mu`` (n, N)."""
    U = xp.asarray(basis.components.astype(np.float32))
    m = xp.asarray(basis.mean.astype(np.float32))[:, None]
    xc = mu - m
    fit = U @ (U.T @ xc)
    r = xc - fit
    dof = max(mu.shape[0] - basis.k, 1)
    sigma = xp.sqrt((r * r).sum(axis=0) / xp.float32(dof))
    if not denoise:
        return mu, sigma
    return fit + m, sigma


def denoise_spectra(spectra, components="auto", *, mask=None, max_components: int = 20):
    """Truncated-PCA denoising of voxel spectra (see the module notes).

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy.
    components : "auto" or int
        Components kept.
    mask : (...) ndarray of bool, optional
        Voxels the basis is estimated from (default: every finite spectrum);
        every finite spectrum is projected.
    max_components : int
        Upper bound for ``"auto"``.

    Returns
    -------
    denoised : (n_energy, ...) ndarray of float32
        On the input's device; NaN where the input had a non-finite value.
    sigma : (...) ndarray of float32
        Noise level of every spectrum (input units).
    basis : SpectralBasis
    """
    xp, mu, vox = spectra_matrix(spectra, np.arange(spectra.shape[0]), "denoise_spectra")
    ok = xp.isfinite(mu).all(axis=0)
    use = ok
    if mask is not None:
        m = xp.asarray(mask).reshape(-1).astype(bool)
        if m.size != ok.size:
            raise ValueError(f"denoise_spectra: mask must have shape {vox}, got {tuple(xp.asarray(mask).shape)}")
        use = ok & m
    basis = spectral_basis(mu[:, use], components, max_components=max_components)
    mu0 = xp.where(ok[None, :], mu, xp.float32(0))
    out, sigma = project(xp, mu0, basis)
    nan = xp.float32(np.nan)
    out = xp.where(ok[None, :], out, nan)
    sigma = xp.where(ok, sigma, nan)
    return out.reshape(mu.shape[0], *vox), sigma.reshape(vox), basis
