"""Phases without references: PCA of voxel spectra and k-means clusters of normalised spectra.

PCA: eigen-decomposition of the ``(n_energy, n_energy)`` covariance of the
spectra (one matrix product over all voxels, then a tiny ``eigh`` on the
host). k-means: Lloyd iterations with k-means++ seeding from a fixed seed;
distances as ``|x|^2 - 2 c.x + |c|^2`` (one ``(k, d) @ (d, N)`` product per
iteration), centroid updates as a one-hot product, empty clusters re-seeded
with the worst-fitted voxel. Both are written once against ``xp`` (NumPy or
CuPy); scikit-learn is not needed.

Cluster labels are 1..k (0: not clustered), ordered by the energy at which
the centroid's normalised spectrum first crosses 0.5 (low edge first), so the
numbering is reproducible and means something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.backend import to_host
from ..core.energies import check_energies
from .lcf import common_e0, normalized_spectra
from .spectra import MIN_ENERGIES, spectra_matrix

__all__ = ["ClusterResult", "Components", "assign_clusters", "cluster_spectra", "kmeans", "order_clusters", "pca_columns",
           "spectral_components"]

METHODS = ("kmeans",)


@dataclass(frozen=True)
class Components:
    """Principal components of voxel spectra.

    Attributes
    ----------
    scores : (n, ...) ndarray of float32
        Projection of every (centred) spectrum on each component (NaN outside the mask).
    loadings : (n, n_energy) ndarray of float64
        Unit-norm components (host).
    explained_variance : (n,) ndarray of float64
        Variance along each component.
    explained_variance_ratio : (n,) ndarray of float64
        Its fraction of the total variance (scree plot).
    mean : (n_energy,) ndarray of float64
        Mean spectrum subtracted before projecting.
    """

    scores: object
    loadings: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray


@dataclass(frozen=True)
class ClusterResult:
    """k-means clusters of voxel spectra.

    Attributes
    ----------
    labels : (...) ndarray of int32
        1..k per clustered voxel, 0 elsewhere.
    centroids : (k, n_energy) ndarray of float64
        Mean (normalised) spectrum of each cluster (host).
    counts : (k,) ndarray of int64
        Voxels per cluster.
    inertia : float
        Sum of squared distances of voxels to their centroid (in the clustered space).
    mask : (...) ndarray of bool
        Voxels clustered.
    components : Components or None
        The PCA used to reduce the spectra (``n_components``).
    """

    labels: object
    centroids: np.ndarray
    counts: np.ndarray
    inertia: float
    mask: object
    components: object = None


def spectral_components(spectra, n: int, *, mask=None) -> Components:
    """Principal components of spectra (PCA over voxels).

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy, e.g. normalised spectra; spectra with a non-finite value are left out.
    n : int
        Components to keep (1..n_energy).
    mask : (...) ndarray of bool, optional
        Voxels to use.

    Returns
    -------
    Components
        ``scores`` on the input's device.
    """
    if not hasattr(spectra, "shape"):
        spectra = np.asarray(spectra)
    n_e = int(spectra.shape[0]) if spectra.ndim else 0
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= n_e:
        raise ValueError(f"spectral_components: n must be an integer in 1..{n_e} (n_energy), got {n!r}")
    xp, y, vox = spectra_matrix(spectra, np.arange(n_e), "spectral_components")
    valid = xp.isfinite(y).all(axis=0)
    if mask is not None:
        m = xp.asarray(mask)
        if tuple(m.shape) != tuple(vox):
            raise ValueError(f"spectral_components: mask must have shape {tuple(vox)}, got {tuple(m.shape)}")
        valid &= m.reshape(-1).astype(bool)
    count = int(valid.sum())
    if count < 2:
        raise ValueError(f"spectral_components: need at least 2 finite spectra, got {count}")
    comp, scores = pca_columns(xp, y[:, valid], n)
    full = xp.full((n, y.shape[1]), np.nan, dtype=xp.float32)
    full[:, valid] = scores
    return Components(scores=full.reshape(n, *vox), **comp)


def cluster_spectra(spectra, energies, k: int, *, method: str = "kmeans", n_components: int | None = None,
                    mask=None, normalize: bool = True, use: str = "norm", min_step: float | None = None,
                    seed: int = 0, n_init: int = 3, max_iter: int = 100, e0="mean") -> ClusterResult:
    """k-means clusters of the normalised voxel spectra.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy absorption spectra (normalised here with Larch's
        ``pre_edge`` unless ``normalize=False``).
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    k : int
        Clusters, 2..number of voxels clustered.
    method : {"kmeans"}
        Clustering method.
    n_components : int, optional
        Cluster the first ``n_components`` PCA scores instead of the spectra.
    mask : (...) ndarray of bool, optional
        Voxels to cluster; by default those with an edge step above ``min_step``
        (as :func:`~gpureg.xanes.lcf.fit_references`).
    normalize, use, min_step, e0
        As :func:`~gpureg.xanes.lcf.fit_references` (one common E0 by default).
    seed : int
        k-means++ seed (results are deterministic per seed).
    n_init : int
        k-means runs from different seeds; the lowest inertia wins.
    max_iter : int
        Lloyd iterations per run.

    Returns
    -------
    ClusterResult
        ``labels`` on the input's device.
    """
    if method not in METHODS:
        raise ValueError(f"cluster_spectra: method must be one of {METHODS}, got {method!r}")
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"cluster_spectra: k must be an integer >= 2, got {k!r}")
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    xp, mu, vox = spectra_matrix(spectra, E, "cluster_spectra")
    e0c = common_e0(xp, mu, E, e0, mask=mask) if normalize else None
    y, _, _, valid = normalized_spectra(xp, mu, E, vox, normalize=normalize, use=use, mask=mask, min_step=min_step,
                                        e0=e0c)
    Y = y[:, valid]
    N = int(Y.shape[1])
    if k > N:
        raise ValueError(f"cluster_spectra: k={k} exceeds the {N} voxels to cluster")
    comp = None
    X = Y
    if n_components is not None:
        if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= E.size:
            raise ValueError(f"cluster_spectra: n_components must be in 1..{E.size}, got {n_components!r}")
        c, X = pca_columns(xp, Y, int(n_components))
        comp = Components(scores=None, **c)
    centers, lab, inertia = kmeans(X, int(k), seed=seed, n_init=n_init, max_iter=max_iter)
    centroids, counts = _member_means(xp, Y, lab, int(k))
    perm = order_clusters(centroids, E)
    rank = np.empty(int(k), dtype=np.int32)
    rank[perm] = np.arange(1, int(k) + 1, dtype=np.int32)
    labels = xp.zeros(mu.shape[1], dtype=xp.int32)
    labels[valid] = xp.asarray(rank)[lab]
    return ClusterResult(labels=labels.reshape(vox), centroids=centroids[perm], counts=counts[perm],
                         inertia=float(inertia), mask=valid.reshape(vox), components=comp)


def kmeans(X, k: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
           sample: int = 20000):
    """k-means (Lloyd, k-means++ seeding) of the columns of ``X`` (d, N).

    Parameters
    ----------
    X : (d, N) ndarray
        NumPy or CuPy, float32; points are columns.
    k : int
        Clusters (2..N).
    seed : int
        Seeds the k-means++ choices (a NumPy generator on the host).
    n_init : int
        Independent runs; the one with the lowest inertia is kept.
    max_iter : int
        Lloyd iterations per run.
    tol : float
        Stop when no label changes, or the centroids move less than ``tol``
        times the data's RMS norm.
    sample : int
        k-means++ seeding draws from at most this many points.

    Returns
    -------
    centers : (d, k) ndarray (float32, on X's device)
    labels : (N,) ndarray of int (0..k-1)
    inertia : float
    """
    from ..core.backend import xp_of

    xp = xp_of(X)
    X = X.astype(xp.float32, copy=False)
    N = int(X.shape[1])
    if not 2 <= k <= N:
        raise ValueError(f"kmeans: k must be in 2..{N} (points), got {k}")
    rng = np.random.default_rng([int(seed), 1717])
    xx = (X * X).sum(axis=0)
    scale = float(to_host(xp.sqrt(xx.mean()))) or 1.0
    best = None
    for _ in range(max(1, int(n_init))):
        sub = rng.choice(N, size=min(N, int(sample)), replace=False) if N > sample else np.arange(N)
        centers = _kmeanspp(xp, X[:, xp.asarray(sub)], k, rng)
        labels = None
        for _it in range(int(max_iter)):
            new, d2 = assign_clusters(X, centers, xx=xx)
            moved = labels is None or bool((new != labels).any())
            labels = new
            cen, counts = _centroids(xp, X, labels, k)
            empty = np.flatnonzero(to_host(counts) == 0)
            for j in empty:        # re-seed with the worst-fitted point
                far = int(to_host(xp.argmax(d2)))
                cen[:, j] = X[:, far]
                d2[far] = 0
            shift = float(to_host(xp.sqrt(((cen - centers) ** 2).sum(axis=0)).max()))
            centers = cen
            if not moved or shift < tol * scale:
                break
        labels, d2 = assign_clusters(X, centers, xx=xx)
        inertia = float(to_host(d2.sum(dtype=xp.float64)))
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    return best


def assign_clusters(X, centers, *, xx=None):
    """Nearest centre of every column of ``X`` (d, N) among ``centers`` (d, k): (labels (N,), squared distance (N,))."""
    from ..core.backend import xp_of

    xp = xp_of(X)
    if xx is None:
        xx = (X * X).sum(axis=0)
    cc = (centers * centers).sum(axis=0)
    d = cc[:, None] - 2 * (centers.T @ X)               # (k, N), |x|^2 added after the argmin
    lab = xp.argmin(d, axis=0)
    d2 = xp.maximum(d[lab, xp.arange(X.shape[1])] + xx, 0)
    return lab, d2


def order_clusters(centroids, energies) -> np.ndarray:
    """Order of clusters by the first 0.5 crossing of their centroid spectra (low edge first; no crossing last)."""
    C = np.asarray(to_host(centroids), dtype=np.float64)
    E = np.asarray(energies, dtype=np.float64)
    key = []
    for j, c in enumerate(C):
        up = np.flatnonzero((c[1:] >= 0.5) & (c[:-1] < 0.5))
        if up.size:
            i = int(up[0])
            key.append((0, E[i] + (0.5 - c[i]) * (E[i + 1] - E[i]) / (c[i + 1] - c[i]), j))
        else:
            key.append((1, 0.0, j))
    return np.array([t[2] for t in sorted(key)], dtype=np.int64)


def pca_columns(xp, Y, n):
    """PCA of the columns of ``Y`` (n_energy, N) on ``xp``: (dict of :class:`Components` fields but ``scores``, scores (n, N) float32)."""
    N = int(Y.shape[1])
    mean = Y.astype(xp.float64).mean(axis=1)
    Yc = Y - mean.astype(xp.float32)[:, None]
    C = to_host(Yc @ Yc.T).astype(np.float64) / max(N - 1, 1)
    w, V = np.linalg.eigh(C)
    order = np.argsort(w)[::-1]
    w, V = np.clip(w[order], 0, None), V[:, order]
    V *= np.where(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])] < 0, -1.0, 1.0)   # sign: largest entry > 0
    total = float(w.sum()) or 1.0
    L = V[:, :n].T
    scores = xp.asarray(L.astype(np.float32)) @ Yc
    return {"loadings": L, "explained_variance": w[:n], "explained_variance_ratio": w[:n] / total,
            "mean": np.asarray(to_host(mean), dtype=np.float64)}, scores


# --------------------------------------------------------------------------- helpers

def _kmeanspp(xp, X, k, rng):
    """k-means++ seeds (d, k) from the columns of X; choices drawn on the host with ``rng``."""
    n = int(X.shape[1])
    first = int(rng.integers(n))
    centers = [X[:, first]]
    d2 = ((X - X[:, first][:, None]) ** 2).sum(axis=0)
    for _ in range(1, k):
        p = np.asarray(to_host(d2), dtype=np.float64)
        s = p.sum()
        j = int(rng.choice(n, p=p / s)) if s > 0 else int(rng.integers(n))
        centers.append(X[:, j])
        d2 = xp.minimum(d2, ((X - X[:, j][:, None]) ** 2).sum(axis=0))
    return xp.stack(centers, axis=1)


def _centroids(xp, X, labels, k):
    onehot = (labels[None, :] == xp.arange(k)[:, None]).astype(xp.float32)     # (k, N)
    counts = onehot.sum(axis=1)
    sums = X @ onehot.T                                                         # (d, k)
    return sums / xp.maximum(counts, 1)[None, :], counts


def _member_means(xp, Y, labels, k):
    cen, counts = _centroids(xp, Y, labels, k)
    return np.asarray(to_host(cen), dtype=np.float64).T, np.asarray(to_host(counts)).astype(np.int64)
