"""FBP geometry, fixed once: voxel ``(z, y, x)`` projects at angle ``theta`` onto row ``z``, column
``u = c + (x - c) cos(theta) - (y - c) sin(theta)`` (``c = (nx - 1) / 2``; module docstring of
:mod:`gpureg.recon.fbp`).

The projections here are analytic line integrals of Gaussian blobs placed off-centre at known
positions (not ASTRA's projector), so a flipped, transposed or mis-scaled reconstruction fails:
each blob must come back where it was put, with its mass.
"""

import numpy as np
import pytest

from gpureg import recon
from gpureg.recon import fbp, project

N, SIGMA = 40, 1.5
C = (N - 1) / 2.0
# (z, y, x, amplitude): different heights and asymmetric places pin every axis and its direction
BLOBS = [(1, 12.3, 25.6, 1.0), (1, 27.0, 10.0, 0.5), (2, 20.0, 31.2, 0.8)]
THETA = np.arange(0.0, 180.0, 1.0)


def _analytic_projections():
    """Line integrals of 2D Gaussian blobs (sigma ``SIGMA``) sampled at the detector columns."""
    u = np.arange(N, dtype=np.float64)
    t = np.deg2rad(THETA)[:, None]
    proj = np.zeros((THETA.size, 4, N))
    for z, y, x, amp in BLOBS:
        centre = C + (x - C) * np.cos(t) - (y - C) * np.sin(t)
        proj[:, z, :] += amp * np.sqrt(2 * np.pi) * SIGMA * np.exp(-0.5 * ((u - centre) / SIGMA) ** 2)
    return proj.astype(np.float32)


def _blob_volume():
    zz, yy, xx = np.meshgrid(np.arange(4), np.arange(N), np.arange(N), indexing="ij")
    vol = np.zeros((4, N, N))
    for z, y, x, amp in BLOBS:
        vol += amp * (zz == z) * np.exp(-0.5 * ((yy - y) ** 2 + (xx - x) ** 2) / SIGMA ** 2)
    return vol.astype(np.float32)


def _check_blobs(vol):
    yy, xx = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    for z, y, x, amp in BLOBS:
        near = (yy - y) ** 2 + (xx - x) ** 2 <= (3 * SIGMA) ** 2
        w = np.where(near, vol[z], 0.0)
        mass = float(w.sum())
        # position: the weighted centre within 0.1 voxel (a flip or transposition moves it by > 5 voxels);
        # mass: 2 pi sigma^2 amp within 3 % (Ram-Lak FBP of 180 angles, 3-sigma window keeps 98.9 % of it)
        assert (w * yy).sum() / mass == pytest.approx(y, abs=0.1)
        assert (w * xx).sum() / mass == pytest.approx(x, abs=0.1)
        assert mass == pytest.approx(amp * 2 * np.pi * SIGMA ** 2 * 0.989, rel=0.03)
    assert np.abs(vol[0]).max() < 0.02 * max(b[3] for b in BLOBS)  # rows stay rows


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_blobs_come_back_where_they_were(device):
    if device == "gpu" and not recon.astra_cuda_available():
        pytest.skip("ASTRA has no CUDA here")
    _check_blobs(recon.reconstruct_fbp(_analytic_projections(), THETA, device=device))


def test_forward_projection_follows_the_same_convention():
    """The synthetic experiment's projector puts each blob's line integral where the convention says."""
    analytic = _analytic_projections()
    ours = recon.forward_project(_blob_volume(), THETA, projector="strip")
    u = np.arange(N)
    for z in (1, 2):
        a, b = analytic[:, z], ours[:, z]
        np.testing.assert_allclose((b * u).sum(1) / b.sum(1), (a * u).sum(1) / a.sum(1), atol=0.05)
        np.testing.assert_allclose(b.sum(1), a.sum(1), rtol=0.01)


def test_gpu_path_is_astras_fbp_cuda_in_the_same_geometry(monkeypatch):
    """On a CPU-only machine: FBP_CUDA is run as ASTRA's CPU FBP on the same objects, so the GPU path's
    plumbing (centre shift, filter option, device index, fallback) is exercised; geometry is shared."""
    seen, gpus = [], []
    make = project.Astra.algorithm

    def algorithm(self, cfg):
        if cfg["type"] == "FBP_CUDA":
            seen.append(cfg["option"])
            pg = self.astra.data2d.get_geometry(cfg["ProjectionDataId"])
            vg = self.astra.data2d.get_geometry(cfg["ReconstructionDataId"])
            cfg = {**cfg, "type": "FBP", "ProjectorId": self.projector("linear", pg, vg)}
        return make(self, cfg)

    monkeypatch.setattr(project.Astra, "algorithm", algorithm)
    monkeypatch.setattr(fbp, "_astra_cuda_probe", lambda: (True, ""))
    monkeypatch.setattr(fbp, "set_astra_gpu", gpus.append)
    proj = _analytic_projections()
    for center, filt in ((None, "ram-lak"), (20.3, "hann")):
        gpu = recon.reconstruct_fbp(proj, THETA, device="gpu", center=center, filter=filt)
        np.testing.assert_array_equal(gpu, recon.reconstruct_fbp(proj, THETA, device="cpu", center=center,
                                                                 filter=filt))
    assert seen == [{"FilterType": "ram-lak"}, {"FilterType": "hann"}] and gpus == [0, 0]
