"""CUDA kernel launchers (CuPy raw kernels): affine resampling, the fused MSE pass, pyramid, median and moments.

The only module that launches kernels (loaded by :mod:`gpureg.core.cuda_loader`);
the per-voxel mathematics is in ``kernels/voxel_math.cuh``, which also
compiles as plain C++ and is tested on the CPU (``tests/core/test_voxel_math.py``).
Each launch checks dtype and contiguity and computes its grid next to the call.

Convention
----------
Volumes are float32, C order, ``(z, y, x)``. ``matrix`` is
``moving_from_reference`` in voxel indices: a reference voxel ``p`` samples
the moving volume at ``q = A p + t``; a sample is valid when
``0 <= q_k <= n_k - 1`` on every axis (the rule of :mod:`gpureg.core.metric`).
"""

from __future__ import annotations

import math

import numpy as np

from .cuda_loader import THREADS, get_kernel, require_cupy, resident_blocks
from .kernel_layout import N_MONOMIALS, N_TERMS, SUMS
from .terms import MetricTerms

__all__ = ["affine_args", "as_mask", "center_of_mass", "check_size", "downsample2", "median", "mse_pass_blocks", "mse_pass_name", "mse_terms",
           "mse_terms_device", "pointer_or_null", "reduce_partials", "resample_affine", "unpack_terms", "wide_index"]

# Layout of the fused pass's sums (kernel_layout: also given to kernels/voxel_math.cuh).
_S0, _S1, _S2, _R0, _R1, _SSE, _COUNT = (SUMS[k] for k in ("S0", "S1", "S2", "R0", "R1", "SSE", "COUNT"))


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


_BLOCK_3D = (32, 8, 1)


_RADIX = ((11, 21), (11, 10), (10, 0))  # (bits, shift) of the three radix-select passes


_MAX_ELEMENTS = 2**31 - 1  # above: the kernels' 64-bit index build (cuda_loader.WIDE_INDEX)
_MAX_WIDE = 2**62  # 64-bit indices (with room for the kernels' 3-plane outputs)


def affine_args(matrix, center) -> tuple:
    """The 15 float32 kernel arguments of ``matrix`` about ``center``.

    Parameters
    ----------
    matrix : (4, 4) array_like
        ``moving_from_reference``, ``q = A p + t``.
    center : (3,) array_like
        Centre ``c`` (voxel indices, ``(z, y, x)``).

    Returns
    -------
    tuple of 15 numpy.float32
        ``D = A - I`` row-major (9), ``D c + t`` (3) and ``c`` (3), so that the
        kernels form ``q = p + D (p - c) + (D c + t)`` (see ``voxel_math.cuh``).
        Computed in float64, rounded once.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must have shape (4, 4), got {m.shape}")
    c = np.asarray(center, dtype=np.float64).reshape(3)
    d = m[:3, :3] - np.eye(3)
    t = d @ c + m[:3, 3]
    return tuple(np.float32(v) for v in np.concatenate([d.ravel(), t, c]))


def unpack_terms(sums, hessian: bool = True) -> MetricTerms:
    """Turn the fused pass's ``(32, 6)`` sums into :class:`~gpureg.metric.MetricTerms`.

    Parameters
    ----------
    sums : (32, 6) array_like of float64
        ``sums[term, monomial]``: each row-sum term of ``voxel_math.cuh``
        (``S_a[ik] = sum g_i g_k x'^a``, ``R_a[i] = sum r g_i x'^a``, ``sum r^2``,
        count) times the monomials ``1, z', y', z'^2, z'y', y'^2`` of its row,
        summed over the reference rows (``z' = z - c_z`` etc.).
    hessian : bool
        Also assemble ``sum J J^T``.

    Returns
    -------
    MetricTerms
        ``rj[3 i + j] = sum r g_i e_j``, ``rj[9 + i] = sum r g_i`` and
        ``jtj[(i, j), (k, l)] = sum g_i g_k e_j e_l`` with ``e = (z', y', x', 1)``,
        the order of :func:`gpureg.metric.voxel_jacobian`.
    """
    s = np.asarray(sums, dtype=np.float64).reshape(N_TERMS, N_MONOMIALS)
    rj = np.empty(12)
    for i in range(3):
        rj[3 * i] = s[_R0 + i, 1]       # sum r g_i z'
        rj[3 * i + 1] = s[_R0 + i, 2]   # sum r g_i y'
        rj[3 * i + 2] = s[_R1 + i, 0]   # sum r g_i x'
        rj[9 + i] = s[_R0 + i, 0]       # sum r g_i
    jtj = s.ravel()[_JTJ_INDEX] if hessian else None
    return MetricTerms(count=int(round(s[_COUNT, 0])), sse=float(s[_SSE, 0]), rj=rj, jtj=jtj)


def resample_affine(volume, matrix, out_shape, cval: float = 0.0):
    """GPU trilinear affine resampling (the GPU :func:`gpureg.transform.apply_affine`).

    Parameters
    ----------
    volume : (Z', Y', X') cupy.ndarray of float32
        Moving volume (each axis at least 2 long); converted to C-contiguous float32 if needed.
    matrix : (4, 4) array_like of float64
        ``moving_from_reference``.
    out_shape : tuple of 3 int
        Reference grid ``(Z, Y, X)``.
    cval : float
        Value where ``q`` falls outside ``0 <= q_k <= n_k - 1``.

    Returns
    -------
    (Z, Y, X) cupy.ndarray of float32
        ``out[p] = volume(q)``, on the device of ``volume``.
    """
    cp = require_cupy()
    volume = _as_volume(cp, volume, "volume")
    out_shape = tuple(int(n) for n in out_shape)
    if len(out_shape) != 3 or min(out_shape) < 0:
        raise ValueError(f"out_shape must be 3 non-negative sizes (Z, Y, X), got {out_shape}")
    check_size(out_shape, "out_shape")
    if out_shape[0] > 65535:
        raise ValueError(f"out_shape[0] must be at most 65535 (CUDA grid z), got {out_shape[0]}")
    with volume.device:
        out = cp.empty(out_shape, dtype=cp.float32)
        if out.size == 0:
            return out
        nz, ny, nx = out_shape
        mz, my, mx = volume.shape
        args = affine_args(matrix, (np.asarray(out_shape, dtype=np.float64) - 1.0) / 2.0)
        kernel = get_kernel("affine.cu", "resample_affine", wide_index(volume.shape, out_shape))
        kernel(_grid_3d(out_shape), _BLOCK_3D,
               (volume, np.int32(mz), np.int32(my), np.int32(mx), out, np.int32(nz), np.int32(ny), np.int32(nx),
                *args, np.float32(cval)))
    return out


def mse_terms(fixed, moving, matrix, center, mask=None, hessian: bool = True) -> MetricTerms:
    """One fused GPU pass: valid count, ``sum r^2``, ``sum r J`` and ``sum J J^T``.

    Parameters
    ----------
    fixed : (Z, Y, X) cupy.ndarray of float32
        Reference volume.
    moving : (Z', Y', X') cupy.ndarray of float32
        Moving volume (each axis at least 2 long), sampled at ``q = A p + t``.
    matrix : (4, 4) array_like of float64
        ``moving_from_reference``.
    center : (3,) array_like
        Centre ``c`` of the 12 parameters (:func:`gpureg.transform.matrix_from_params`).
    mask : (Z, Y, X) ndarray of bool or float32, optional
        Reference voxels to use (float: ``> 0.5``); NumPy or CuPy (copied to
        the device of ``fixed``).
    hessian : bool
        Also accumulate ``sum J J^T``.

    Returns
    -------
    MetricTerms
        Float64 sums on the host, the same quantities as the CPU
        :func:`gpureg.metric.mse_terms` (parameter order and Jacobian of
        :func:`gpureg.metric.voxel_jacobian`).

    Notes
    -----
    One kernel reads each reference voxel once and its 8 moving neighbours,
    keeps 26 float row sums per thread (``voxel_math.cuh``), reduces them per
    row with warp shuffles and per block in shared memory into double partials
    (no atomics, no full-size temporaries); a second tiny kernel adds the
    partials. The host receives 192 doubles.
    """
    sums = mse_terms_device(fixed, moving, matrix, center, mask=mask, hessian=hessian)
    return unpack_terms(sums.get(), hessian)


def mse_terms_device(fixed, moving, matrix, center, mask=None, hessian: bool = True, empty_space=None):
    """The fused pass of :func:`mse_terms` without the copy to the host.

    Parameters are those of :func:`mse_terms`, and

    empty_space : tuple, optional
        ``(fixed_rows, cell_sat)`` of :func:`gpureg.core.cuda_solver.empty_space_tables`
        (without a mask only): rows that can only add their count are not read.

    Returns
    -------
    (32, 6) cupy.ndarray of float64
        The raw sums (see :func:`unpack_terms`), queued on the current stream
        (nothing waits for them: for pipelining and for timing the kernels).
    """
    cp = require_cupy()
    fixed = _as_volume(cp, fixed, "fixed")
    moving = _as_volume(cp, moving, "moving")
    if moving.device != fixed.device:
        raise ValueError(f"fixed and moving must be on the same GPU, got devices {fixed.device.id} and "
                         f"{moving.device.id}")
    mask = as_mask(cp, mask, fixed)
    name = mse_pass_name(hessian, mask)
    nz, ny, nx = fixed.shape
    mz, my, mx = moving.shape
    wide = wide_index(fixed.shape, moving.shape)
    with fixed.device:
        kernel = get_kernel("affine.cu", name, wide)
        blocks = mse_pass_blocks(name, nz * ny, wide=wide)
        partials = cp.empty(N_TERMS * N_MONOMIALS * blocks, dtype=cp.float64)
        args = affine_args(matrix, center)
        dims = (np.int32(nz), np.int32(ny), np.int32(nx), np.int32(mz), np.int32(my), np.int32(mx))
        row_code = None
        if empty_space is not None and mask is None:
            row_code = cp.empty(nz * ny, dtype=cp.int32)
            get_kernel("affine.cu", "classify_rows", wide)((-(-(nz * ny) // THREADS),), (THREADS,),
                                                     (*empty_space, *dims, *args, row_code))
        kernel((blocks,), (THREADS,), (fixed, moving, pointer_or_null(mask), pointer_or_null(row_code), *dims, *args,
                                       partials))
        sums = reduce_partials("affine.cu", partials, N_TERMS * N_MONOMIALS, blocks, wide=wide)
    return sums.reshape(N_TERMS, N_MONOMIALS)


def as_mask(cp, mask, fixed):
    """``mask`` as a C-contiguous bool or float32 CuPy array on ``fixed``'s device, or None.

    NumPy masks are copied to the device (a NumPy mask with CuPy volumes is
    allowed); other dtypes become ``mask > 0.5``.
    """
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(fixed.shape):
        raise ValueError(f"mask must have the shape of fixed {tuple(fixed.shape)}, got {tuple(mask.shape)}")
    with fixed.device:
        mask = cp.asarray(mask)  # a NumPy mask is copied; a CuPy mask on another GPU is copied here
        if mask.dtype != np.float32 and mask.dtype != np.bool_:
            mask = mask > 0.5
        return cp.ascontiguousarray(mask)


def pointer_or_null(array):
    """A kernel argument for an optional array: the array, or an explicit null pointer.

    CuPy <= 13 passes ``None`` as an undefined pointer (cupy#9046), which the
    kernels would dereference; a 64-bit zero is a null pointer on every CuPy.
    """
    return np.uint64(0) if array is None else array


def mse_pass_name(hessian: bool, mask) -> str:
    """Name expression of the fused pass for ``hessian`` and the mask's dtype (float when no mask)."""
    mask_type = "bool" if mask is not None and mask.dtype == np.bool_ else "float"
    return f"mse_terms_pass<{'true' if hessian else 'false'}, {mask_type}>"


def mse_pass_blocks(name: str, rows: int, source: str = "affine.cu", wide: bool = False) -> int:
    """Grid of the fused pass: one warp per row up to the blocks that fill the device."""
    return max(1, min(-(-rows // (THREADS // 32)), resident_blocks(source, name, wide)))


def downsample2(volume):
    """2x block average (the pyramid step of :func:`gpureg.register.pyramid`) on the GPU.

    Parameters
    ----------
    volume : (Z, Y, X) cupy.ndarray of float32

    Returns
    -------
    (Z // 2, Y // 2, X // 2) cupy.ndarray of float32
        ``out[k] = mean(volume[2k : 2k + 2])`` over each 2x2x2 block; odd
        trailing planes, rows and columns are dropped (as the NumPy path).
    """
    cp = require_cupy()
    volume = _as_volume(cp, volume, "volume", min_size=0)
    out_shape = tuple(n // 2 for n in volume.shape)
    with volume.device:
        out = cp.empty(out_shape, dtype=cp.float32)
        if out.size == 0:
            return out
        _, ny, nx = volume.shape
        oz, oy, ox = out_shape
        get_kernel("volume.cu", "downsample2", wide_index(volume.shape))(_grid_3d(out_shape), _BLOCK_3D,
                                            (volume, np.int32(ny), np.int32(nx), out, np.int32(oz), np.int32(oy),
                                             np.int32(ox)))
    return out


def median(volume) -> float:
    """Exact median of a CuPy volume, as ``numpy.median`` (mean of the two middle values for an even size).

    Radix selection on the float bits: three histogram passes (11, 11, 10
    bits) per rank instead of a full sort.

    Parameters
    ----------
    volume : cupy.ndarray of float32
        Any shape, no NaN.

    Returns
    -------
    float
        The median, rounded to float32 like NumPy's.
    """
    cp = require_cupy()
    with volume.device:
        v = cp.ascontiguousarray(volume, dtype=cp.float32).ravel()
    n = int(v.size)
    if n == 0:
        raise ValueError("cannot take the median of an empty volume")
    check_size((n,), "volume")
    wide = wide_index((n,))  # the 64-bit build also counts in 64 bits
    with v.device:
        hist = cp.zeros(1 << max(b for b, _ in _RADIX), dtype=cp.uint64 if wide else cp.uint32)
        kernel = get_kernel("volume.cu", "radix_histogram", wide)
        blocks = max(1, min(-(-n // THREADS), resident_blocks("volume.cu", "radix_histogram", wide)))

        def histogram(prefix, prefix_mask, shift, bits):
            hist.fill(0)
            kernel((blocks,), (THREADS,), (v, np.int64(n), np.uint32(prefix), np.uint32(prefix_mask),
                                            np.int32(shift), np.uint32((1 << bits) - 1), hist))
            return hist[: 1 << bits].get().astype(np.int64)

        return float(median_from_histograms(histogram, n))


def median_from_histograms(histogram, n: int) -> np.float32:
    """Median of ``n`` float32 values from radix histograms of their keys.

    Parameters
    ----------
    histogram : callable
        ``histogram(prefix, prefix_mask, shift, bits) -> (2**bits,) int array``:
        counts of the keys (``float_key`` of ``voxel_math.cuh``) whose bits under
        ``prefix_mask`` equal ``prefix``, binned by ``(key >> shift) & (2**bits - 1)``.
    n : int
        Number of values.

    Returns
    -------
    numpy.float32
        As ``numpy.median``: the middle value, or the float32 mean of the two middle values.
    """
    if n < 1:
        raise ValueError(f"need at least one value, got n={n}")
    lo, last = _select(histogram, (n - 1) // 2)
    if n % 2:
        return lo
    prefix, hist, rank, b = last
    if rank + 1 < hist[b]:
        hi = lo  # the next rank has the same key
    else:
        after = np.flatnonzero(hist[b + 1:])
        hi = _key_to_float(prefix | (b + 1 + int(after[0]))) if after.size else _select(histogram, n // 2)[0]
    return np.float32(np.float32(lo) + np.float32(hi)) / np.float32(2)


def center_of_mass(volume) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` of ``max(volume - median, 0)`` on the GPU.

    Same definition as :func:`gpureg.register.center_of_mass` (which calls
    this for CuPy arrays): the grid centre when the weights sum to zero.

    Parameters
    ----------
    volume : (Z, Y, X) cupy.ndarray of float32

    Returns
    -------
    (3,) ndarray of float64
    """
    cp = require_cupy()
    volume = _as_volume(cp, volume, "volume", min_size=1)
    nz, ny, nx = volume.shape
    med = np.float32(median(volume))
    with volume.device:
        name = "com_moments"
        wide = wide_index(volume.shape)
        blocks = max(1, min(-(-(nz * ny) // (THREADS // 32)), resident_blocks("volume.cu", name, wide)))
        partials = cp.empty(4 * blocks, dtype=cp.float64)
        get_kernel("volume.cu", name, wide)((blocks,), (THREADS,),
                                   (volume, np.int32(nz), np.int32(ny), np.int32(nx), med, partials))
        m = reduce_partials("volume.cu", partials, 4, blocks, wide=wide).get()
    if not m[0] > 0:
        return (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
    return m[1:] / m[0]


def reduce_partials(name: str, partials, n_terms: int, blocks: int, wide: bool = False, out=None):
    """Sums over blocks of term-major block partials, in double, on the device.

    Parameters
    ----------
    name : str
        Kernel source holding ``reduce_partials`` (``"affine.cu"``, ``"volume.cu"``).
    partials : (n_terms * blocks,) cupy.ndarray of float64
        ``partials[term * blocks + block]``.
    n_terms, blocks : int
    wide : bool
        From the 64-bit index build of ``name`` (the one the pass used: no second compilation).
    out : (n_terms,) cupy.ndarray of float64, optional
        Written in place (a loop of passes allocates nothing per pass).

    Returns
    -------
    (n_terms,) cupy.ndarray of float64
    """
    if out is None:
        out = require_cupy().empty(n_terms, dtype=np.float64)
    get_kernel(name, "reduce_partials", wide)((n_terms,), (THREADS,), (partials, np.int32(blocks), out))
    return out


def _build_jtj_index() -> np.ndarray:
    """Flat index into the (32, 6) sums of every ``J J^T`` entry (see :func:`unpack_terms`)."""
    pair = {}
    for k, (i, j) in enumerate(_PAIRS):
        pair[(i, j)] = pair[(j, i)] = k
    monomial = {(): 0, (0,): 1, (1,): 2, (0, 0): 3, (0, 1): 4, (1, 1): 5}
    index = np.empty((12, 12), dtype=np.intp)
    for a in range(12):
        i, j = divmod(a, 3) if a < 9 else (a - 9, 3)  # J[a] = g_i e_j, e_3 = 1
        for b in range(12):
            k, l = divmod(b, 3) if b < 9 else (b - 9, 3)
            x_degree = (j == 2) + (l == 2)
            zy = tuple(sorted(e for e in (j, l) if e < 2))
            term = (_S0, _S1, _S2)[x_degree] + pair[(i, k)]
            index[a, b] = term * N_MONOMIALS + monomial[zy]
    return index


_JTJ_INDEX = _build_jtj_index()


def _select(histogram, k: int):
    """The ``k``-th smallest value (0-based) by radix selection; also the last level's state."""
    prefix, prefix_mask = 0, 0
    for bits, shift in _RADIX:
        hist = np.asarray(histogram(prefix, prefix_mask, shift, bits), dtype=np.int64)
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, k, side="right"))
        if b >= hist.size:
            raise RuntimeError(f"radix selection lost rank {k} (histogram holds {int(cum[-1])} values)")
        k -= int(cum[b - 1]) if b else 0
        level_prefix = prefix
        prefix |= b << shift
        prefix_mask |= ((1 << bits) - 1) << shift
    return _key_to_float(prefix), (level_prefix, hist, k, b)


def _key_to_float(key: int) -> np.float32:
    """Inverse of ``float_key`` in ``voxel_math.cuh``."""
    key = int(key) & 0xFFFFFFFF
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _as_volume(cp, volume, name, min_size: int = 2):
    if getattr(volume, "ndim", None) != 3:
        raise ValueError(f"{name} must be a 3D (Z, Y, X) array, got shape {getattr(volume, 'shape', None)}")
    if type(volume).__module__.split(".")[0] != "cupy":
        raise TypeError(f"{name} must be a CuPy array for the GPU kernels, got {type(volume).__name__}")
    if min(volume.shape) < min_size:
        raise ValueError(f"{name} must be at least {min_size} voxels along every axis, got shape {tuple(volume.shape)}")
    check_size(volume.shape, name)
    with volume.device:  # convert on the array's GPU, not the current one
        return cp.ascontiguousarray(volume, dtype=cp.float32)


def wide_index(*shapes) -> bool:
    """Whether a launch over arrays of these shapes needs the kernels' 64-bit index build.

    The kernels index voxels with 32-bit ints up to 2^31 - 1 voxels, and are compiled a second
    time with 64-bit indices for larger volumes (as ``cupyx.scipy.ndimage`` selects its
    kernels by size); shapes are checked by :func:`check_size` first.
    """
    return max(math.prod(s) for s in shapes) > _MAX_ELEMENTS


def check_size(shape, name):
    """Raise ``ValueError`` when an array of ``shape`` is beyond what any kernel build can index.

    Rows ``(z, y)`` are counted with 32-bit ints in both builds; voxels with 64-bit ones above
    2^31 - 1 (:func:`wide_index`).
    """
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) > _MAX_WIDE:
        raise ValueError(f"{name} has {math.prod(shape)} voxels; the kernels index at most {_MAX_WIDE}")
    if len(shape) >= 2 and math.prod(shape[:-1]) > _MAX_ELEMENTS:
        raise ValueError(f"{name} has {math.prod(shape[:-1])} rows of voxels; the kernels count rows with "
                         f"32-bit ints (at most {_MAX_ELEMENTS})")


def _grid_3d(shape):
    nz, ny, nx = shape
    return (-(-nx // _BLOCK_3D[0]), -(-ny // _BLOCK_3D[1]), nz)
