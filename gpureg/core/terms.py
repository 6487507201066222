"""The reduced sums of one metric pass, shared by every backend (NumPy, CUDA, numba)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MetricTerms"]


@dataclass
class MetricTerms:
    """Reduced sums of one metric pass (float64, on the host)."""

    count: int
    sse: float
    rj: np.ndarray  # (n,) sum r J (n = 12 for one affine)
    jtj: np.ndarray | None  # (n, n) sum J J^T, or None when not asked for

    @property
    def mse(self) -> float:
        """Mean squared error over the valid voxels (``inf`` when none is valid)."""
        return self.sse / self.count if self.count else float("inf")

    @property
    def gradient(self) -> np.ndarray:
        """``dE/dtheta = 2/N sum r J`` (n,)."""
        return 2.0 * self.rj / max(self.count, 1)

    @property
    def hessian(self) -> np.ndarray:
        """Gauss-Newton approximation ``2/N sum J J^T`` (n, n)."""
        if self.jtj is None:
            raise ValueError("this pass was run with hessian=False")
        return 2.0 * self.jtj / max(self.count, 1)
