"""Constants shared by the CUDA kernels and their Python launchers, defined once, here.

The kernels receive them as preprocessor definitions (:func:`define_flags`, ``-DGPUREG_...``):
:mod:`gpureg.core.cuda_loader` passes them to NVRTC, the tests to nvcc and g++, and the
headers refuse to compile without them. The Levenberg-Marquardt constants come from
:mod:`gpureg.core.solver`, whose NumPy solver the device solver mirrors. Importing this
module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

from . import solver

__all__ = ["define_flags", "defines", "MSE_MIN_BLOCKS", "MSE_STATE_MIN_BLOCKS_WIDE", "N_MONOMIALS", "N_TERMS", "STATE", "STATUS", "SUMS", "THREADS"]

# Threads per block of every 1D kernel (their __launch_bounds__); 32 x 8 for the 3D-grid kernels.
THREADS = 256
# Resident blocks per SM the fused pass is built for: caps it at 64 registers, where ptxas
# (nvcc 13.0, NVRTC 13.0-13.5) reports no spills for sm_80 and sm_90.
MSE_MIN_BLOCKS = 4
# The same for the device solver's pass in the 64-bit index build (more registers: 80).
MSE_STATE_MIN_BLOCKS_WIDE = 3

# The fused pass's sums: N_TERMS row-sum terms (padded to a warp) x N_MONOMIALS monomials of
# (z', y') (kernels/voxel_math.cuh; gpureg.core.cuda.unpack_terms). SUMS: first term of each group.
N_TERMS, N_MONOMIALS = 32, 6
SUMS = {"S0": 0, "S1": 6, "S2": 12, "R0": 18, "R1": 21, "SSE": 24, "COUNT": 25}

# The device solver's float64 state (kernels/lm_step.cuh; gpureg.core.cuda_solver).
STATE = {"params": 0, "trial": 12, "lam": 24, "sse": 25, "count": 26, "rj": 27, "jtj": 39, "passes": 183,
         "status": 184, "move": 185, "size": 192}
# Why the device solver stopped (state[STATE["status"]]).
STATUS = {"running": 0, "converged": 1, "max_passes": 2, "no_overlap": 3, "singular": 4}


def defines() -> dict:
    """``{macro: value}`` of every constant above, as the kernels name them."""
    out = {"GPUREG_THREADS": THREADS, "GPUREG_MSE_MIN_BLOCKS": MSE_MIN_BLOCKS,
           "GPUREG_MSE_STATE_MIN_BLOCKS_WIDE": MSE_STATE_MIN_BLOCKS_WIDE, "GPUREG_N_TERMS": N_TERMS,
           "GPUREG_N_MONOMIALS": N_MONOMIALS}
    out.update({f"GPUREG_SUMS_{k}": v for k, v in SUMS.items()})
    out.update({f"GPUREG_LM_{k.upper()}": v for k, v in STATE.items()})
    out.update({f"GPUREG_LM_STATUS_{k.upper()}": v for k, v in STATUS.items()})
    out.update(GPUREG_LM_LAM_MIN=solver.LAM_MIN, GPUREG_LM_LAM_MAX=solver.LAM_MAX, GPUREG_LM_LAM_DOWN=solver.LAM_DOWN,
               GPUREG_LM_LAM_UP=solver.LAM_UP, GPUREG_LM_LAM_SINGULAR=solver.LAM_SINGULAR,
               GPUREG_LM_REJECT_FACTOR=solver.REJECT_FACTOR, GPUREG_LM_DIAG_FLOOR=solver.DIAG_FLOOR)
    return out


def define_flags() -> tuple:
    """``-D`` options for NVRTC, nvcc and g++ (floats in full precision, as C double literals)."""
    flags = []
    for name, value in defines().items():
        text = repr(float(value)) if isinstance(value, float) else str(int(value))
        flags.append(f"-D{name}={text}")
    return tuple(flags)
