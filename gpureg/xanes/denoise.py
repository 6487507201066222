"""Spectral denoising: truncated PCA of the (energy x voxel) matrix, components chosen from the data.

A stack of thousands of voxel spectra spans only a few chemical components; what
lies outside their span is noise. The mean spectrum ``m`` and the principal
directions ``U`` (n_energy x K) are estimated from a sample of voxels (the
energy x energy covariance, one matrix product over the voxels, then a small
``eigh`` on the host: exact, and the covariance of a large stack is summed slab
by slab, so nothing larger than a slab is ever in memory; with a few dozen
energies this is cheaper than a randomised SVD and has no sampling error of its
own). Every voxel spectrum ``x`` is then replaced by ``m + U U^T (x - m)``
(:func:`project`), plus what is spatially coherent in its residual
(:func:`restore_residual`, below).

Restoring what the components miss. The few components the threshold keeps
(K = 3 at 1000 photons) span the dominant shapes; a minority's edge is poorly
spanned, and the projection pulls it towards the majority's. In the
simulation (``gpureg simulate``) particle 2 holds a third of the voxels, its
edges 1-3 eV above most of particle 1's: projected, its median edge energy
moves by -0.107 eV on the fine grid (1.5 eV steps, seed 0; 6 noise
realisations: -0.082 +- 0.025), and by -0.03 to -0.05 eV in the noise-free
scan's stack too, so it is not noise. More components do not cure it (K 4-10:
-0.046 to -0.023 eV, the RMS error 0.29 -> 0.44 eV). But noise averages out
in space and signal outside the components does not: the whitened residual
``r_v`` of voxel ``v`` is modelled as its amplitude ``a_v`` (crude edge jump of
the projected spectrum) times a residual shape that varies slowly in space,
estimated by amplitude-weighted least squares over a Gaussian neighbourhood of
``sigma`` voxels (``G(w a r) / G(w a^2)``, ``w`` the voxels with an edge) and
added back: the part of a spectrum outside the components is kept at a
resolution of ``sigma`` (1.5 voxels by default), the part inside at full
resolution. On the noise-free stacks (default grid, seeds 0 and 2) the restored maps'
particle medians are within 0.01 eV of the maps without denoising
(projection: 0.035-0.052 eV off).
At a face of the neighbourhood (a particle's surface, the volume's faces) the
neighbourhood is one-sided: a gradient outside the components is restored as
its mean a voxel inwards. The noise that comes back with the residual is its
part that does not average out: ``sqrt(sum k^2)`` of the kernel for
independent voxels (:func:`residual_noise_factor`, 0.08 at 1.5 voxels; more
where the noise is spatially correlated, as after FBP), included in the sigma
map. Measured over 48^3 simulated scans at 1000 photons (``bench/denoise.py``,
seeds 0-2, both grids, against the same scans' maps without denoising): the
RMS error is 36-56 % lower (projection alone: the same); particle 2's median
moves by -0.017 to +0.068 eV (projection: -0.107 to +0.043); particle 1's by
+0.017 to +0.069 eV (projection: +0.031 to +0.095).

Why particle medians move. Mostly because the map WITHOUT denoising is biased
by the noise: the 0.5 crossing is a non-linear function of noisy samples, read
only where the jump clears the threshold and the spectrum crosses once, and at
1000 photons that pulls a particle's median edge energy by up to 0.07 eV.
Measured against the same reconstructions without noise resampled with the
same transforms (``bench/denoise.py``, ``particle_noise_bias_ev``; seeds 0-2,
both grids, 12 particle medians at 1000 photons): without denoising the
medians are -0.073 to +0.047 eV off (RMS 0.040), denoised -0.047 to +0.064 eV
(RMS 0.031); at 10^4 photons 0.017 and 0.008 eV RMS. Of the 5 medians that
move by more than issue 26's 0.05 eV, 4 move from 0.035-0.073 eV off the
noise-free median to within 0.021 eV of it; one (default grid, seed 2,
particle 2) moves from +0.015 to +0.064 eV. Particle 1's noise bias is
negative in every scan at both doses (-0.073 to -0.003 eV) and denoising
removes most of it (the moves are positive); particle 2's (the minority, a
third of the voxels) is of either sign and denoising does not reliably reduce
it: the few components concentrate the noise that is left at the edge energies,
where its shape is read. With white noise of the same level instead (2 draws
per scan): -0.083 to +0.031 eV without denoising, -0.053 to +0.027 denoised.
``tests/pipeline/test_denoise_simulated.py`` holds this on the simulation's
exact attenuation, blurred and with white noise.
Between noise realisations of the same scan (default grid, seed 0, 7
realisations) the per-particle median of the map without denoising varies by
0.015 / 0.049 eV (sd, particle 1 / 2), the moves by 0.007 / 0.024 eV.

Number of components (``components="auto"``): the eigenvalues of the noise part
of a covariance cluster at the noise variance; Gavish & Donoho's optimal hard
threshold for unknown noise (IEEE Trans. Inf. Theory 60, 2014) keeps the
singular values above ``omega(beta) x`` their median, ``beta = n_energy /
n_voxels``: here eigenvalues above ``omega(beta)^2 x`` the median eigenvalue
(about 2.04 x for ``beta -> 0``). An integer ``K`` keeps that many. Keeping
every component above the Marchenko-Pastur noise bulk instead (1.2-1.5 x the
median; K 6-7 instead of 3 at 1000 photons, ``bench/denoise.py``, 3 seeds)
raised the edge RMS by up to 13 % and did not make the per-particle medians
better: at most 0.067 instead of 0.092 eV from the map without denoising,
but 0.089 instead of 0.064 eV from the noise-free scan's map. What did help
is estimating the basis from all voxels with an edge, not a third of the
planes (:func:`gpureg.xanes.stack.stack_basis`): seed 1's particle 1 moved
0.125 -> 0.092 eV from the map without denoising (which is itself 0.053 eV
below the noise-free scan's there), 0.073 -> 0.039 eV from the noise-free one.

Noise that is not white. The noise level is not the same at every energy:
the reference energy is not resampled by the registration while every other
one is interpolated (trilinear interpolation at a sub-voxel offset averages
the noise of 8 voxels: down to about a third of the variance), and fewer
photons pass the sample above the edge (Poisson). The noise of voxel ``v`` at
energy ``e`` is modelled as ``sigma_v^2 g_e``, with one **noise profile**
``g`` (mean 1) per stack, and the principal directions are those of the
noise-whitened spectra ``(x - m) / sqrt(g)`` (the minimum-noise-fraction
transform of hyperspectral imaging, Green et al., IEEE TGRS 26, 1988), where
the Gavish-Donoho threshold, made for white noise, applies. ``g`` comes from
the residual ``r = R (x - m)``, ``R = I - U U^T``: its mean square per energy
over the sample is ``(R o R) g`` (non-negative least squares), alternated
with the basis for 2 rounds. Every spectrum is then replaced by
``m + S U U^T S^-1 (x - m)``, ``S = diag(sqrt(g))``, and its noise level is
``sigma_v^2 = |residual|^2 / (n_energy - K)`` in whitened units, from which
the edge-energy uncertainty map is propagated
(:func:`gpureg.xanes.edge.edge_energy`).

Measured on the simulated scans of ``bench/denoise.py`` (48^3, 29 energies;
``bench/results/denoise-*.json``): the reference energy's noise is 1.6-1.8x
the mean (standard deviation); the first principal direction of the
unwhitened spectra held that noise, so the white-noise threshold kept it as
signal (seed 0: K 4 -> 3 at 1000 photons, 7 -> 6 at 10^4). With the basis
of all voxels (3 seeds, 1000 photons) this noise term alone covers 0.59-0.61
of the true errors of the map without denoising and 0.67-0.71 of the errors
that noise alone makes (against the same scan without noise); after denoising
0.31-0.40 of the true errors: it leaves out spatial resolution (about 0.26 eV
at 48^3: neighbouring spectra mixed), interpolation between energies and the
truncation's own error, which :mod:`gpureg.xanes.uncertainty` adds to the sigma map.
White noise gives a flat profile and the plain PCA. All array code is
``xp``-generic (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.backend import to_host
from ..core.errors import InputError, ParameterError
from .spectra import crude_jump, spectra_matrix

__all__ = ["DENOISE", "SpectralBasis", "basis_from_moments", "denoise_spectra", "parse_denoise", "project",
           "residual_noise_factor", "restore_residual", "spectral_basis"]

DENOISE = ("auto", "off")
"""Named choices of ``--denoise-spectra`` (or an integer number of components)."""


@dataclass(frozen=True)
class SpectralBasis:
    """Mean spectrum and principal directions of a set of voxel spectra.

    Attributes
    ----------
    mean : (n_energy,) ndarray of float64
    components : (n_energy, K) ndarray of float64
        Orthonormal columns, in the noise-whitened coordinates ``(x - mean) / scale``.
    eigenvalues : (n_energy,) ndarray of float64
        Variance along every principal direction of the whitened spectra, largest first (scree plot).
    threshold : float
        The eigenvalue threshold of ``"auto"`` (NaN for a given K).
    n_voxels : int
        Voxels the basis was estimated from.
    noise_profile : (n_energy,) ndarray of float64, optional
        Relative noise variance per energy (mean 1; see the module notes);
        None: white (the same at every energy).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    threshold: float
    n_voxels: int
    noise_profile: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Number of components kept."""
        return int(self.components.shape[1])

    def to_dict(self) -> dict:
        """Plain-number summary (for the result's attributes and the report)."""
        out = {"components": self.k, "n_voxels": self.n_voxels, "threshold": float(self.threshold),
               "eigenvalues": [float(v) for v in self.eigenvalues]}
        if self.noise_profile is not None:
            out["noise_profile"] = [round(float(v), 4) for v in self.noise_profile]
        return out

    @property
    def scale(self) -> np.ndarray:
        """Noise standard deviation per energy relative to the level (``sqrt(noise_profile)``; ones when white)."""
        n = self.components.shape[0]
        return np.ones(n) if self.noise_profile is None else np.sqrt(self.noise_profile)


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


def spectral_basis(sample, components="auto", *, max_components: int = 20, whiten: bool = True) -> SpectralBasis:
    """Principal directions of voxel spectra and the number to keep.

    Parameters
    ----------
    sample : (n_energy, M) ndarray
        NumPy or CuPy spectra (finite), e.g. a sample of particle voxels.
    components : "auto" or int
        Number of components kept, or chosen by the Gavish-Donoho threshold.
    max_components : int
        Upper bound for ``"auto"``.
    whiten : bool
        Estimate the noise profile and take the principal directions of the
        noise-whitened spectra (see the module notes); False: plain PCA, white noise assumed.

    Returns
    -------
    SpectralBasis
    """
    xp, X, _ = spectra_matrix(sample, np.arange(sample.shape[0]), "spectral_basis")
    M = X.shape[1]
    if M < 2:
        raise InputError(f"spectral_basis: need at least 2 voxel spectra, got {M}")
    mean = X.astype(xp.float64).mean(axis=1)
    Xc = X - mean.astype(xp.float32)[:, None]
    G = np.asarray(to_host(Xc @ Xc.T), dtype=np.float64) / M
    return basis_from_moments(np.asarray(to_host(mean), dtype=np.float64), G, M, components,
                              max_components=max_components, whiten=whiten)


def basis_from_moments(mean, cov, n_voxels: int, components="auto", *, max_components: int = 20,
                       whiten: bool = True) -> SpectralBasis:
    """:class:`SpectralBasis` from the mean (n,) and covariance (n, n) of ``n_voxels`` spectra (host arrays;
    e.g. summed slab by slab over a whole stack). Parameters as :func:`spectral_basis`."""
    G = np.asarray(cov, dtype=np.float64)
    n = G.shape[0]
    if components != "auto":
        components = int(components)
        if not 1 <= components < n:
            raise ParameterError(f"spectral_basis: components must be 1..{n - 1} (n_energy - 1), got {components!r}")
    scale = np.ones(n)
    for rounds in range(3 if whiten else 1):
        w, V = np.linalg.eigh(0.5 * (G + G.T) / np.outer(scale, scale))
        order = np.argsort(w)[::-1]
        w, V = np.clip(w[order], 0, None), V[:, order]
        if components == "auto":
            beta = min(n / n_voxels, 1.0)
            omega = 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43
            thr = omega ** 2 * float(np.median(w))
            k = int(np.clip((w > thr).sum(), 1, min(max_components, n - 1)))
        else:
            k, thr = components, float("nan")
        U = V[:, :k]
        if rounds == 2 or not whiten:
            break
        g = _residual_profile(G / np.outer(scale, scale), U)
        if g is None:
            break
        scale = scale * np.sqrt(g)
        scale /= np.sqrt(np.mean(scale ** 2))
    return SpectralBasis(mean=np.asarray(mean, dtype=np.float64).reshape(-1), components=U, eigenvalues=w,
                         threshold=thr, n_voxels=int(n_voxels), noise_profile=scale ** 2 if whiten else None)


def _residual_profile(C, U, *, min_dof: int = 5):
    """Relative noise variance per energy (mean 1) from the covariance ``C`` (n, n) of centred spectra, outside
    the span of ``U`` (n, K): non-negative least squares of ``diag(R C R) = (R o R) g`` (``R = I - U U^T``, the
    residual's mean square per energy); None when fewer than ``min_dof`` residual dimensions are left or the fit
    is degenerate. Clipped below at 1 % of the mean (a zero would divide by zero when whitening)."""
    from scipy.optimize import nnls

    n, k = U.shape
    if n - k < min_dof:
        return None
    R = np.eye(n) - U @ U.T
    g, _ = nnls(R * R, np.einsum("ij,jk,ki->i", R, C, R))
    if not np.isfinite(g).all() or g.mean() <= 0:
        return None
    g = np.clip(g / g.mean(), 0.01, None)
    return g / g.mean()


def project(xp, mu, basis: SpectralBasis, *, denoise: bool = True):
    """(spectra (n, N) float32: denoised or as given, noise level per voxel (N,) float32) for ``mu`` (n, N).

    The level ``sigma`` is the noise standard deviation at an energy of relative variance 1 (see the module
    notes): the noise at energy ``e`` is ``sigma sqrt(basis.noise_profile[e])``."""
    fit, _, sigma, m, s = _whitened_fit(xp, mu, basis)
    if not denoise:
        return mu, sigma
    return fit * s + m, sigma


def _whitened_fit(xp, mu, basis):
    """The components' fit to the whitened spectra, the residual, the noise level per voxel (the residual's RMS
    over its ``n - K`` degrees of freedom), the mean (n, 1) and the scale (n, 1)."""
    U = xp.asarray(basis.components.astype(np.float32))
    m = xp.asarray(basis.mean.astype(np.float32))[:, None]
    s = xp.asarray(basis.scale.astype(np.float32))[:, None]
    xc = (mu - m) / s
    fit = U @ (U.T @ xc)
    r = xc - fit
    noise = xp.sqrt((r * r).sum(axis=0) / xp.float32(max(mu.shape[0] - basis.k, 1)))
    return fit, r, noise, m, s


def restore_residual(xp, mu, basis: SpectralBasis, shape, sigma: float, *, weight=None):
    """Projected spectra plus the spatially coherent part of their residual, and the noise level per voxel.

    The residual ``r_v = R S^-1 (x_v - m)`` of every voxel (``R = I - U U^T``, whitened, as :func:`project`) is
    modelled as its spectrum's amplitude ``a_v`` (edge jump of the projected spectrum) times a residual shape that
    varies slowly in space: the shape is the weighted least-squares estimate over a Gaussian neighbourhood of
    ``sigma`` voxels, ``G(w a r) / G(w a^2)``, and ``a_v`` times it is added back (see the module notes).

    Parameters
    ----------
    xp : module
        NumPy or CuPy.
    mu : (n_energy, N) ndarray of float32
        Finite spectra of the ``N = prod(shape)`` voxels (0 where not finite).
    basis : SpectralBasis
    shape : tuple of 3 int
        The voxels' grid ``(Z, Y, X)`` (a slab with its halo of neighbouring planes).
    sigma : float
        Gaussian sigma of the neighbourhood (voxels).
    weight : (N,) ndarray, optional
        Voxels whose residual is estimated from (e.g. those with an edge); default all.

    Returns
    -------
    spectra : (n_energy, N) ndarray of float32
    noise : (N,) ndarray of float32
        As :func:`project`.
    """
    from ..core.segment import gaussian

    fit, r, noise, m, s = _whitened_fit(xp, mu, basis)
    n = mu.shape[0]
    y = fit * s + m
    a = xp.maximum(crude_jump(y), xp.float32(0))
    w = a if weight is None else a * xp.asarray(weight, dtype=xp.float32)
    den = gaussian((w * a).reshape(shape), sigma).reshape(-1)
    ok = den > 0                                          # no weighted voxel within reach: projection only
    scale = xp.where(ok, a / xp.where(ok, den, xp.float32(1)), xp.float32(0))
    for e in range(n):
        y[e] += s[e, 0] * scale * gaussian((w * r[e]).reshape(shape), sigma).reshape(-1)
    return y, noise


def residual_noise_factor(sigma: float) -> float:
    """Standard deviation of a normalised 3D Gaussian average (sigma ``sigma`` voxels) of spatially independent
    noise of equal weight (an interior voxel), over the noise's own: ``sqrt(sum k^2)`` of the kernel. E.g. the
    noise :func:`restore_residual` adds back, over the residual's."""
    radius = int(4.0 * float(sigma) + 0.5)              # scipy.ndimage.gaussian_filter's kernel (truncate 4)
    k1 = np.exp(-0.5 * (np.arange(-radius, radius + 1) / float(sigma)) ** 2)
    k1 /= k1.sum()
    return float(np.sum(k1 ** 2) ** 1.5)


def denoise_spectra(spectra, components="auto", *, mask=None, max_components: int = 20):
    """Truncated-PCA denoising of voxel spectra (see the module notes): the plain projection, without the
    residual restoration that :func:`gpureg.xanes.stack.edge_energy_map` adds (it needs the voxels' grid).

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
        Noise level of every spectrum (input units; times ``sqrt(basis.noise_profile)`` per energy).
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
