// One Levenberg-Marquardt step of gpureg's device-resident solver, on the sums of one fused pass.
//
// Host-compilable (g++) like voxel_math.cuh: tests/core/test_gpu_solver.py runs this arithmetic on
// the CPU and compares it with the NumPy reference gpureg.core.solver.levenberg_marquardt,
// which it mirrors step for step:
//   first pass: the start parameters' sums become the current ones (no overlap: status 3);
//   later passes: accept the trial when it overlaps and its MSE is not larger (damping / LAM_DOWN,
//   at least LAM_MIN), else reject (damping * LAM_UP; above LAM_MAX, or the rejected step moved no
//   grid corner by REJECT_FACTOR tol voxel or more: converged);
//   after max_iter passes: stop (status 2); else solve the damped Gauss-Newton system
//   (H + lam diag(H)) step = -g over the free parameters, in double, by Cholesky (a failed
//   factorisation multiplies the damping by LAM_SINGULAR and retries, up to LAM_MAX: status 4); a step that moves no grid corner
//   by tol voxel or more: converged; else the next pass evaluates params + step.
// g = 2/N sum r J and H = 2/N sum J J^T come from the (32, 6) sums as gpureg.core.cuda.unpack_terms.
#pragma once

#include "voxel_math.cuh"

namespace gpureg {

// Solver state, float64 in device memory: written by lm_update, the trial read by the pass. The
// layout, the statuses and the constants are defined once in gpureg/core/kernel_layout.py (and
// gpureg/core/solver.py) and arrive as -D options (NVRTC through gpureg.core.cuda_loader).
enum : int {
  kLmParams = GPUREG_LM_PARAMS,    // 12 accepted parameters (matrix_from_params order)
  kLmTrial = GPUREG_LM_TRIAL,      // 12 parameters the next pass evaluates
  kLmLam = GPUREG_LM_LAM,          // damping
  kLmSse = GPUREG_LM_SSE,          // sums of the accepted parameters: sum r^2, count,
  kLmCount = GPUREG_LM_COUNT,
  kLmRj = GPUREG_LM_RJ,            // sum r J (12),
  kLmJtj = GPUREG_LM_JTJ,          // sum J J^T (12 x 12, row-major)
  kLmPasses = GPUREG_LM_PASSES,    // passes evaluated
  kLmStatus = GPUREG_LM_STATUS,    // kLmRunning, or why it stopped
  kLmMove = GPUREG_LM_MOVE,        // largest corner move (voxels) of the step to the trial
  kLmStateSize = GPUREG_LM_SIZE,
};

enum : int {
  kLmRunning = GPUREG_LM_STATUS_RUNNING,
  kLmConverged = GPUREG_LM_STATUS_CONVERGED,
  kLmMaxPasses = GPUREG_LM_STATUS_MAX_PASSES,
  kLmNoOverlap = GPUREG_LM_STATUS_NO_OVERLAP,
  kLmSingular = GPUREG_LM_STATUS_SINGULAR,
};

// gpureg.core.solver: LAM_MIN, LAM_MAX, LAM_DOWN, LAM_UP, LAM_SINGULAR, REJECT_FACTOR, DIAG_FLOOR
constexpr double kLmLamMin = GPUREG_LM_LAM_MIN;
constexpr double kLmLamMax = GPUREG_LM_LAM_MAX;
constexpr double kLmLamDown = GPUREG_LM_LAM_DOWN;
constexpr double kLmLamUp = GPUREG_LM_LAM_UP;
constexpr double kLmLamSingular = GPUREG_LM_LAM_SINGULAR;
constexpr double kLmRejectFactor = GPUREG_LM_REJECT_FACTOR;
constexpr double kLmDiagFloor = GPUREG_LM_DIAG_FLOOR;

// Index into the (32, 6) sums of J J^T entry (a, b), J[a] = g_i e_j (a = 3 i + j < 9) or g_i
// (a = 9 + i, e_3 = 1): the term S_{x degree}[pair ik] times the (z', y') monomial of e_j e_l.
GPUREG_HD int jtj_slot(int a, int b) {
  const int i = a < 9 ? a / 3 : a - 9, j = a < 9 ? a % 3 : 3;
  const int k = b < 9 ? b / 3 : b - 9, l = b < 9 ? b % 3 : 3;
  const int lo = i < k ? i : k, hi = i < k ? k : i;
  const int pair = lo == 0 ? hi : (lo == 1 ? 2 + hi : 5);  // zz zy zx yy yx xx
  const int xdeg = (j == 2) + (l == 2);
  const int nz = (j == 0) + (l == 0), ny = (j == 1) + (l == 1);
  const int mono = nz == 2 ? 3 : (nz == 1 ? (ny == 1 ? 4 : 1) : (ny == 2 ? 5 : (ny == 1 ? 2 : 0)));
  return ((xdeg == 0 ? kS0 : (xdeg == 1 ? kS1 : kS2)) + pair) * kMonomials + mono;
}

// sum r J entry a from the sums (the order of gpureg.core.metric.voxel_jacobian).
GPUREG_HD double rj_entry(const double* sums, int a) {
  if (a >= 9) return sums[(kR0 + a - 9) * kMonomials];
  const int i = a / 3, j = a % 3;
  return j == 2 ? sums[(kR1 + i) * kMonomials] : sums[(kR0 + i) * kMonomials + 1 + j];
}

// In-place Cholesky solve of the SPD system A x = b (n x n, row-major, leading dimension 12).
// Returns false (A, b clobbered) when A is not numerically positive definite.
GPUREG_HD bool cholesky_solve(double* A, double* b, int n) {
  for (int j = 0; j < n; ++j) {
    double d = A[j * 12 + j];
    for (int k = 0; k < j; ++k) d -= A[j * 12 + k] * A[j * 12 + k];
    if (!(d > 0.0)) return false;  // also NaN
    d = sqrt(d);
    A[j * 12 + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = A[i * 12 + j];
      for (int k = 0; k < j; ++k) s -= A[i * 12 + k] * A[j * 12 + k];
      A[i * 12 + j] = s / d;
    }
  }
  for (int i = 0; i < n; ++i) {  // L y = b
    double s = b[i];
    for (int k = 0; k < i; ++k) s -= A[i * 12 + k] * b[k];
    b[i] = s / A[i * 12 + i];
  }
  for (int i = n - 1; i >= 0; --i) {  // L^T x = y
    double s = b[i];
    for (int k = i + 1; k < n; ++k) s -= A[k * 12 + i] * b[k];
    b[i] = s / A[i * 12 + i];
  }
  return true;
}

// Largest displacement (voxels, any axis) that the 12-parameter step causes at the corners of
// the (nz, ny, nx) grid, taken about its centre (the solver's step size).
GPUREG_HD double corner_move(const double* step, int nz, int ny, int nx) {
  const double c[3] = {0.5 * (nz - 1), 0.5 * (ny - 1), 0.5 * (nx - 1)};
  const int n[3] = {nz, ny, nx};
  double move = 0.0;
  for (int corner = 0; corner < 8; ++corner) {
    double p[3];
    for (int k = 0; k < 3; ++k) p[k] = ((corner >> (2 - k)) & 1 ? n[k] - 1 : 0) - c[k];
    for (int i = 0; i < 3; ++i) {
      const double u = step[3 * i] * p[0] + step[3 * i + 1] * p[1] + step[3 * i + 2] * p[2] + step[9 + i];
      move = fabs(u) > move ? fabs(u) : move;
    }
  }
  return move;
}

// The solver's work after one pass whose (32, 6) sums are `sums` (evaluated at state[kLmTrial]).
// free_mask: bit a set when parameter a is optimised. No-op once state[kLmStatus] is not running.
GPUREG_HD void lm_update(double* state, const double* sums, unsigned int free_mask, int nz, int ny, int nx,
                         double tol, int max_iter) {
  if (state[kLmStatus] != (double)kLmRunning) return;
  const double count = rint(sums[kCount * kMonomials]);
  const double sse = sums[kSSE * kMonomials];
  const double passes = state[kLmPasses] + 1.0;
  state[kLmPasses] = passes;
  double lam = state[kLmLam];
  bool take = false;
  if (passes == 1.0) {
    if (count == 0.0) {
      state[kLmStatus] = kLmNoOverlap;
      return;
    }
    take = true;
  } else if (count > 0.0 && sse / count <= state[kLmSse] / state[kLmCount]) {
    take = true;
    lam = fmax(lam / kLmLamDown, kLmLamMin);
  } else {
    lam *= kLmLamUp;
    // No descent direction left at this resolution, or a step of under kLmRejectFactor * tol
    // voxel that does not lower the MSE: below that scale the MSE's own noise decides.
    if (lam > kLmLamMax || state[kLmMove] < kLmRejectFactor * tol) {
      state[kLmLam] = lam;
      state[kLmStatus] = kLmConverged;
      return;
    }
  }
  if (take) {
    for (int a = 0; a < 12; ++a) state[kLmParams + a] = state[kLmTrial + a];
    state[kLmSse] = sse;
    state[kLmCount] = count;
    for (int a = 0; a < 12; ++a) state[kLmRj + a] = rj_entry(sums, a);
    for (int a = 0; a < 12; ++a)
      for (int b = 0; b < 12; ++b) state[kLmJtj + 12 * a + b] = sums[jtj_slot(a, b)];
  }
  state[kLmLam] = lam;
  if (passes >= (double)max_iter) {
    state[kLmStatus] = kLmMaxPasses;
    return;
  }
  int idx[12], n = 0;
  for (int a = 0; a < 12; ++a)
    if (free_mask >> a & 1u) idx[n++] = a;
  const double scale = 2.0 / fmax(state[kLmCount], 1.0);
  double diag[12], dmax = -1.0e308;
  for (int a = 0; a < n; ++a) {
    diag[a] = scale * state[kLmJtj + 13 * idx[a]];
    dmax = fmax(dmax, diag[a]);
  }
  const double floor_ = kLmDiagFloor * fmax(dmax, 1e-30);
  for (int a = 0; a < n; ++a) diag[a] = fmax(diag[a], floor_);
  double A[144], x[12];
  bool solved = false;
  while (!solved) {
    for (int a = 0; a < n; ++a) {
      for (int b = 0; b < n; ++b) A[12 * a + b] = scale * state[kLmJtj + 12 * idx[a] + idx[b]];
      A[13 * a] += lam * diag[a];
      x[a] = -scale * state[kLmRj + idx[a]];
    }
    solved = cholesky_solve(A, x, n);
    if (!solved) {
      lam = fmax(lam, kLmLamMin) * kLmLamSingular;  // grows from any lam (0 too), so the retries end
      if (lam > kLmLamMax) break;  // not converged
    }
  }
  state[kLmLam] = lam;
  if (!solved) {
    state[kLmStatus] = kLmSingular;
    return;
  }
  double step[12] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int a = 0; a < n; ++a) step[idx[a]] = x[a];
  const double move = corner_move(step, nz, ny, nx);
  state[kLmMove] = move;
  if (move < tol) {
    state[kLmStatus] = kLmConverged;
    return;
  }
  for (int a = 0; a < 12; ++a) state[kLmTrial + a] = state[kLmParams + a] + step[a];
}

// The transform of the kernels (voxel_math.cuh) for parameters p about the centre c:
// q = (I + D)(p - c) + c + s gives u = q - p = D (p - c) + s, so d = D and t = s.
GPUREG_HD Affine affine_from_params(const double* p, float cz, float cy, float cx) {
  Affine a;
  for (int k = 0; k < 9; ++k) a.d[k] = (float)p[k];
  for (int k = 0; k < 3; ++k) a.t[k] = (float)p[9 + k];
  a.c[0] = cz;
  a.c[1] = cy;
  a.c[2] = cx;
  return a;
}

}  // namespace gpureg
