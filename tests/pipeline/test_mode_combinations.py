"""Deformable registration together with per-particle, Dask and watch (issue 27): small, deterministic cases."""

import shutil

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.core import transform as tf
from gpureg.io import write_dataexchange
from gpureg.pipeline import run
from gpureg.pipeline.deform import composed_displacement
from gpureg.register import apply_deformation, apply_piecewise, bspline, particle_regions
from known_transforms import relative_motion_series

SIZE = 48  # at 32^3 particle 2 has fewer than register_particles' 1000 voxels
ENERGIES = np.array([6500.0, 6540.0, 6552.0, 6570.0, 6600.0])


def test_composed_displacement_is_the_piecewise_alignment_then_the_bspline():
    vol = gpureg.two_particle_phantom((24,) * 3)
    _, labels = gpureg.two_particle_phantom((24,) * 3, return_labels=True)
    regions = particle_regions(labels)
    c = tf.grid_center((24,) * 3)
    mats = np.stack([tf.rotation_matrix(2.0, (0, 1, 0), c), tf.rotation_matrix(-3.0, (1, 0, 0), c),
                     tf.scale_matrix(1.02, c)])
    mats[1, :3, 3] += (0.7, -0.4, 1.1)
    zero = np.zeros((3, *bspline.control_shape((24,) * 3, 6.0)), np.float32)
    # No deformation: exactly the piecewise resampling, with and without the contact guard
    for guard in (0, 3):
        disp = composed_displacement(zero, 6.0, mats, regions, (24,) * 3, guard=guard)
        np.testing.assert_allclose(apply_deformation(vol, disp, device="cpu"),
                                   apply_piecewise(vol, mats, regions, guard=guard, device="cpu"), atol=1e-5)
    # A constant B-spline (partition of unity: u = c everywhere) under one affine M everywhere: M (p + c)
    const = zero + np.array([0.5, -1.25, 0.75], np.float32)[:, None, None, None]
    same = np.stack([mats[0]] * 3)
    disp = composed_displacement(const, 6.0, same, regions, (24,) * 3)
    shift = np.eye(4)
    shift[:3, 3] = (0.5, -1.25, 0.75)
    np.testing.assert_allclose(apply_deformation(vol, disp, device="cpu"),
                               gpureg.apply_affine(vol, mats[0] @ shift, device="cpu"), atol=1e-4)


@pytest.fixture(scope="module")
def relative(tmp_path_factory):
    """Particle 2 turns and shifts relative to particle 1 (a reconstructed series, no FBP)."""
    return relative_motion_series(tmp_path_factory.mktemp("rel"), ENERGIES, SIZE)


def test_per_particle_with_deformable_resamples_once_through_the_composition(relative, tmp_path):
    path, truths, labels = relative
    res = run(path, tmp_path / "both.h5", per_particle=True, deformable=True, spacing=8.0, device="cpu", report=False)
    with h5py.File(res.output) as h5:
        reg = h5["registration"]
        coeffs, pm = reg["bspline_coefficients"][...], reg["particle_matrix"][...]
        assert reg["bspline_coefficients"].attrs["base"] == "piecewise"
        assert np.all(reg["bspline_min_jacobian"][...] > 0)
        regions = particle_regions(reg["particle_labels"][...], 3)
        # /aligned is the reconstruction resampled once through q(p) = P(p + u(p)) (stored, smoothed transforms;
        # the series pass's 3-voxel contact guard)
        disp = composed_displacement(coeffs[0], float(reg["bspline_coefficients"].attrs["spacing"]), pm[0], regions,
                                     (SIZE,) * 3, guard=3)
        np.testing.assert_allclose(h5["aligned"][0], apply_deformation(h5["recon"][0], disp, device="cpu"),
                                   atol=1e-5)
        assert "aligned_global" in h5 and "xanes_global/edge_energy" in h5
    # Where the composition puts each particle's voxels at the energy farthest from the reference (largest
    # relative motion) against the truth, beside the global affine's and the per-particle affines' errors
    p = np.indices((SIZE,) * 3, dtype=np.float64)
    err = {}
    for k in (1, 2):
        sel = labels == k
        true = truths[0][k][:3, :3] @ p[:, sel] + truths[0][k][:3, 3:4]
        err[k] = {"both": np.linalg.norm(p[:, sel] + disp[:, sel] - true, axis=0).mean(),
                  "global": gpureg.displacement_error(pm[0, 0], truths[0][k], mask=sel)[0],
                  "particle": gpureg.displacement_error(pm[0, k], truths[0][k], mask=sel)[0]}
    # measured: both 0.15 / 0.22 voxel (particles 1 / 2), per-particle affines 0.13 / 0.16, global 0.72 / 0.67
    # (the B-spline, smoothed along 5 energies, may add a little where there is no deformation to find)
    for k in (1, 2):
        assert err[k]["both"] < 0.6 * err[k]["global"] and err[k]["both"] < err[k]["particle"] + 0.1, err


def test_deformable_on_a_dask_cluster_stores_the_workers_coefficients(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    from gpureg.synth.scan import simulate

    path = simulate(tmp_path / "in.h5", size=24, energies=[6500.0, 6540.0, 6555.0, 6570.0, 6600.0], n_angles=24,
                    seed=1, deformation=3.0, noise=0.0)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        res = run(path, tmp_path / "dask.h5", report=False, device="cpu", deformable=True, spacing=6.0,
                  scheduler=cl.scheduler_address)
    with h5py.File(res.output) as h5:
        raw = h5["registration/bspline_coefficients_raw"][...]
        mse_affine = h5["registration/bspline_mse_affine"][...]
        assert np.abs(raw[-1]).max() == 0 and np.abs(raw[0]).max() > 0.1  # reference (highest): identity
        assert np.all(h5["registration/bspline_min_jacobian"][...] > 0)
        assert np.isfinite(h5["aligned"][...]).all()
    # energy 0 (farthest from the reference, largest warp): the deformation lowers the MSE beyond the affine
    assert res.mse_after[0] < mse_affine[0]


def test_watch_with_deformable_refines_the_rereferenced_affines(tmp_path):
    from gpureg.pipeline.watch import watch_folder
    from gpureg.synth.scan import simulate

    energies = [6500.0, 6540.0, 6552.0, 6570.0, 6600.0]
    scan = simulate(tmp_path / "scan.h5", size=24, n_angles=24, energies=energies, seed=2, deformation=3.0,
                    noise=0.0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with gpureg.open_input(scan) as r:
        for i, e in enumerate(r.energies):
            write_dataexchange(inbox / f"e{i:02d}.h5", data=[r.projections(i)], data_white=[r.flat(i)],
                               data_dark=r.dark(), theta=r.theta, energy=[e])
    res = watch_folder(inbox, tmp_path / "out.h5", expect=len(energies), poll=0, settle=0, report=False,
                       device="cpu", deformable=True, spacing=6.0)
    with h5py.File(res.output) as h5:
        reg = h5["registration"]
        # the affines are the watch's re-referenced fits, applied as given (not smoothed); the B-spline refines them
        np.testing.assert_array_equal(reg["matrix"][...], reg["matrix_raw"][...])
        assert np.abs(reg["bspline_coefficients"][0]).max() > 0.1 and np.all(reg["bspline_min_jacobian"][...] > 0)
    assert res.mse_after[0] < res.mse_before[0]
    shutil.rmtree(inbox)
