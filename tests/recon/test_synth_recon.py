"""Synthetic Mn K-edge experiment -> normalisation -> FBP, against the stored ground truth.

Tolerances: noise-free FBP of the 40^3 phantom (181 angles, strip/line
forward model vs linear-interpolation back-projection) correlates with the
true attenuation at r > 0.99 in practice; the issue's contract is r > 0.95 and
an RMSE below 5% of the volume's maximum attenuation. Aligning with the truth
matrices adds one trilinear interpolation (r drops by < 0.005).
"""

import sys
import warnings

import numpy as np
import pytest
from cli_run import run_cli

from gpureg import recon, synth
from gpureg.core.backend import GPUUnavailableError
from gpureg.core.transform import apply_affine, displacement_error, grid_center, invert, rotation_matrix
from gpureg.io import open_input
from gpureg.recon import fbp, flatfield, project
from gpureg.synth.phantom import particle_fields, two_particle_phantom
from gpureg.xanes import synthetic_spectra

SIZE = 40
ENERGIES = np.array([6485.0, 6545.0, 6551.0, 6557.0, 6710.0])  # far pre-edge, near-edge, reference (highest)


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _interior(shape, margin=5):
    m = np.zeros(shape, dtype=bool)
    m[margin:-margin, margin:-margin, margin:-margin] = True
    return m


@pytest.fixture(scope="module")
def clean_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "clean.h5"
    return synth.simulate(path, size=SIZE, energies=ENERGIES, noise=0.0, seed=1)


@pytest.fixture(scope="module")
def noisy_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "noisy.h5"
    return synth.simulate(path, size=SIZE, energies=ENERGIES, noise=1.0, seed=1)


# ---------------------------------------------------------------- model


def test_energy_grid_is_realistic():
    e = synth.mn_energy_grid()
    steps = np.diff(e)
    assert e[0] == pytest.approx(6485.0) and e[-1] == pytest.approx(6710.0)
    assert np.all(steps > 0)
    near = (e[:-1] >= 6530) & (e[1:] <= 6578)
    np.testing.assert_allclose(steps[near], 3.0)
    np.testing.assert_allclose(steps[(e[1:] <= 6530) | (e[:-1] >= 6590)], 15.0)
    lo, hi = synth.MN_EDGE_RANGE
    assert e[0] < lo - 30 and e[-1] > hi + 100  # pre- and post-edge regions to normalise on
    np.testing.assert_allclose(synth.parse_energies("6540:6546:3"), [6540, 6543, 6546])
    with pytest.raises(ValueError, match="energies must be"):
        synth.parse_energies("65x0")


def test_fine_grid_and_what_the_grid_step_costs_the_edge_energy():
    fine = synth.parse_energies("fine")
    np.testing.assert_array_equal(fine, synth.mn_fine_energy_grid())
    steps = np.diff(fine)
    assert fine.size == 34 and fine[0] == 6485.0 and fine[-1] == 6710.0
    np.testing.assert_allclose(steps[(fine[:-1] >= 6538) & (fine[1:] <= 6562)], 1.5)
    # The 0.5 crossing gpureg reads from noise-free model spectra against the model's own crossing
    # (synth.edge_offsets, 0.005 eV grid), over edge positions spanning the simulated range (27 positions,
    # more than a grid step) and white lines 0.3-1.4. Measured: 1.5 eV steps at most 0.054 eV (RMS 0.030);
    # the default grid's 3 eV steps -0.25..+0.14 eV (RMS 0.14), the limit of the default scan's maps.
    from gpureg.xanes import edge_energy

    e0 = np.linspace(*synth.MN_EDGE_RANGE, 27)
    worst = {}
    for name, grid in (("fine", fine), ("default", synth.mn_energy_grid())):
        err = []
        for wl in (0.3, 0.6, 1.0, 1.4):
            mu = synthetic_spectra(grid, e0, white_line=np.full(e0.size, wl), **synth.MN_SPECTRUM)
            half, _ = synth.edge_offsets(np.full(e0.size, wl))
            err.append(np.asarray(edge_energy(mu, grid, min_jump=0)["edge_energy"], np.float64) - (e0 + half))
        worst[name] = float(np.abs(np.concatenate(err)).max())
    assert worst["fine"] <= 0.06 and worst["default"] >= 0.2, worst


def test_mn_spectrum_edge_and_half_crossing():
    normalized = {**synth.MN_SPECTRUM, "victoreen": 0.0}  # no pre-edge background
    e0 = np.array([6549.0, 6555.5])
    wl = np.array([0.35, 0.74])
    far = synthetic_spectra([6300.0, 6548.0 - 30, 6555.5 + 60], e0, white_line=wl, **normalized)
    assert np.all(np.abs(far[:2]) < 0.06)  # below the edge: only the arctan tail and the pre-edge peak
    assert np.all(np.abs(far[2] - 1.0) < 0.1)  # unit edge jump above it
    half, peak = synth.edge_offsets(wl)
    at_half = [synthetic_spectra([e0[k] + half[k]], e0[k], white_line=wl[k], **normalized)[0] for k in range(2)]
    np.testing.assert_allclose(at_half, 0.5, atol=1e-3)
    assert np.all((peak > 4) & (peak < 8))  # white line a few eV above the edge
    raw = synthetic_spectra([6400.0, 6700.0], 6552.0, white_line=0.6, **synth.MN_SPECTRUM)
    assert raw[0] > 0.2  # absolute spectrum keeps the pre-edge background


def test_particle_fields_reproduce_the_phantom():
    shape = (24, 28, 32)
    m = rotation_matrix(4.0, (1, 0.5, 0), grid_center(shape))
    m[:3, 3] += [1.0, -0.5, 2.0]
    rel = rotation_matrix(-3.0, (0, 0, 1), grid_center(shape))
    for mm, per in ((None, None), (m, None), (m, {2: rel})):
        f = particle_fields(shape, mm, per_particle=per, seed=5)
        rebuilt = np.clip((f["level"][:, None, None, None] * f["occupancy"] * f["texture"]).sum(0), 0, 1)
        np.testing.assert_allclose(rebuilt, two_particle_phantom(shape, mm, per_particle=per, seed=5), atol=1e-6)


def test_sample_motion_is_exact_and_composition_is_core_shell():
    shape = (SIZE,) * 3
    m = synth.default_motion(ENERGIES, shape, seed=3)
    assert np.allclose(m[-1], np.eye(4))  # highest energy is the reference
    truth = synth.sample_truth(shape, seed=3)
    inside = truth["labels"] > 0
    mean_disp, max_disp = displacement_error(m[0], np.eye(4), mask=inside)
    assert 0.5 < mean_disp and max_disp < 0.1 * SIZE  # real, but inside the field of view
    moved = synth.sample_volumes(shape, [6557.0], m[0], seed=3)[0]
    ref = synth.sample_volumes(shape, [6557.0], None, seed=3)[0]
    sel = _interior(shape)
    assert _corr(apply_affine(moved, m[0])[sel], ref[sel]) > 0.99
    assert _corr(moved[sel], ref[sel]) < 0.9
    e0 = truth["e0"]
    lo, hi = synth.MN_EDGE_RANGE
    p1 = truth["labels"] == 1
    assert np.nanmax(e0[p1]) > hi - 0.5 and np.nanmin(e0[p1]) < lo + 0.5  # oxidised core, reduced shell
    p2 = truth["labels"] == 2
    assert 6550.0 <= np.nanmin(e0[p2]) and np.nanmax(e0[p2]) <= 6553.0
    assert np.all(np.isnan(e0[~inside])) and np.all(truth["edge_energy"][inside] < e0[inside])


# ---------------------------------------------------------------- simulate -> FBP round trip


def test_simulated_file_layout(clean_scan):
    with open_input(clean_scan) as r:
        assert r.kind == "projections" and r.shape == (181, SIZE, SIZE)
        np.testing.assert_allclose(r.energies, ENERGIES)
        np.testing.assert_allclose(r.theta, np.linspace(-90, 90, 181))
        t = r.truth()
        assert t["matrices"].shape == (len(ENERGIES), 4, 4) and int(t["reference_index"]) == len(ENERGIES) - 1
        assert t["attenuation"].shape == (len(ENERGIES), SIZE, SIZE, SIZE)
        for key in ("edge_energy", "e0", "labels", "white_line_energy", "density"):
            assert t[key].shape == (SIZE,) * 3
        flat = r.flat(0)
        assert flat.shape == (5, SIZE, SIZE) and 8000 < flat.mean() < 12000
        assert abs(float(r.dark().mean()) - 100.0) < 1.0


@pytest.mark.parametrize("energy", [6485.0, 6551.0, 6710.0])
def test_fbp_matches_truth_noise_free(clean_scan, energy):
    with open_input(clean_scan) as r:
        i = int(np.flatnonzero(r.energies == energy)[0])
        vol = recon.reconstruct_energy(r, i, device="cpu")
        t = r.truth()
    assert vol.shape == (SIZE,) * 3 and vol.dtype == np.float32
    truth, m = t["attenuation"][i], t["matrices"][i]
    sel = _interior(vol.shape)
    aligned = apply_affine(vol, m)
    rmse = float(np.sqrt(np.mean((aligned[sel] - truth[sel]) ** 2)))
    assert _corr(aligned[sel], truth[sel]) > 0.95
    assert rmse < 0.05 * truth.max()
    # the stored transforms also reproduce the moved sample: truth resampled into the moving frame ~ recon
    assert _corr(apply_affine(truth, invert(m))[sel], vol[sel]) > 0.95
    if i != int(t["reference_index"]):  # and they are needed: the unaligned recon is clearly worse
        assert _corr(vol[sel], truth[sel]) < _corr(aligned[sel], truth[sel]) - 0.05


def test_fbp_noisy_within_bounds(noisy_scan):
    with open_input(noisy_scan) as r:
        t = r.truth()
        for i in (1, 4):
            vol = recon.reconstruct_energy(r, i, device="cpu")
            truth = t["attenuation"][i]
            sel = _interior(vol.shape)
            aligned = apply_affine(vol, t["matrices"][i])
            assert _corr(aligned[sel], truth[sel]) > 0.9
            assert float(np.sqrt(np.mean((aligned[sel] - truth[sel]) ** 2))) < 0.1 * truth.max()


def test_simulation_is_deterministic(tmp_path):
    kw = dict(size=16, energies=[6540.0, 6560.0], n_angles=19, salt_pepper=0.01)
    a = synth.simulate(tmp_path / "a.h5", seed=4, **kw)
    b = synth.simulate(tmp_path / "b.h5", seed=4, **kw)
    c = synth.simulate(tmp_path / "c.h5", seed=5, **kw)
    with open_input(a) as ra, open_input(b) as rb, open_input(c) as rc:
        for i in range(2):
            np.testing.assert_array_equal(ra.projections(i), rb.projections(i))
            np.testing.assert_array_equal(ra.flat(i), rb.flat(i))
        np.testing.assert_array_equal(ra.truth()["matrices"], rb.truth()["matrices"])
        assert not np.array_equal(ra.projections(0), rc.projections(0))
        p = ra.projections(0)
        bad = np.mean((p == 0) | (p == 65535))
        assert 0.005 < bad < 0.015  # salt and pepper at the requested fraction


def test_relative_motion_moves_particle_two(tmp_path):
    path = synth.simulate(tmp_path / "rel.h5", size=24, energies=[6540.0, 6710.0], n_angles=19,
                          relative_motion=True, seed=2)
    with open_input(path) as r:
        t = r.truth()
    pm = t["particle_matrices"]
    assert pm.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(pm[:, 0], t["matrices"])
    np.testing.assert_allclose(pm[1], np.repeat(np.eye(4)[None], 2, 0))  # nothing at the reference
    rel = invert(pm[0, 0]) @ pm[0, 1]  # particle 2 relative to the sample: a 3.5-4.5 degree turn and 3 voxels at 64^3
    angle = np.rad2deg(np.arccos(np.clip((np.trace(rel[:3, :3]) - 1) / 2, -1, 1)))
    assert 3.5 <= angle <= 4.5 and np.allclose(rel[:3, :3] @ rel[:3, :3].T, np.eye(3), atol=1e-9)
    # the sample matrix aligns particle 1 of the moved sample, but not particle 2
    shape = (24,) * 3
    moved = synth.sample_volumes(shape, [6540.0], per_particle={1: pm[0, 0], 2: pm[0, 1]}, seed=2)[0]
    ref = synth.sample_volumes(shape, [6540.0], seed=2)[0]
    aligned = apply_affine(moved, t["matrices"][0])
    err = [float(np.abs(aligned - ref)[t["labels"] == k].mean() / ref[t["labels"] == k].mean()) for k in (1, 2)]
    assert err[0] < 0.15 < 0.25 < err[1]  # 0.15: trilinear resampling of a 24^3 textured particle


# ---------------------------------------------------------------- normalisation


def test_normalize_exact_and_clipped(monkeypatch):
    flat = np.full((3, 4, 5), 1100.0)
    dark = np.full((2, 4, 5), 100.0)
    t = np.linspace(0.1, 1.0, 20).reshape(4, 5)
    proj = np.stack([100.0 + 1000.0 * t, 100.0 + 1000.0 * t * 0.5])
    np.testing.assert_allclose(recon.flatfield_correct(proj, flat, dark), -np.log(np.stack([t, t * 0.5])), rtol=1e-5)
    proj[0, 0, :3] = [0.0, 100.0, 50.0]  # dead pixels: at or below the dark
    monkeypatch.setattr(flatfield, "_WARNED", False)
    with pytest.warns(recon.NonPositiveTransmissionWarning, match="3 of 40"):
        out, n = recon.flatfield_correct(proj, flat, dark, return_count=True)
    assert n == 3 and np.all(np.isfinite(out)) and out.max() == pytest.approx(-np.log(1e-3), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process: the second time only logs
        recon.flatfield_correct(proj, flat, dark)
    with pytest.raises(ValueError, match="flat frames must be"):
        recon.flatfield_correct(proj, flat[:, :3], dark)


# ---------------------------------------------------------------- FBP options and geometry


def _phantom_projections(n=32, n_angle=121):
    vol = np.ascontiguousarray(two_particle_phantom((n, n, n), seed=2)[n // 2 - 3: n // 2 + 3]) * 0.05
    theta = np.linspace(-90, 90, n_angle)
    return vol, recon.forward_project(vol, theta, projector="line"), theta


def test_filters_and_validation():
    vol, proj, theta = _phantom_projections()
    ramlak = recon.reconstruct_fbp(proj, theta, device="cpu")
    hann = recon.reconstruct_fbp(proj, theta, filter="hann", device="cpu")
    assert _corr(ramlak, vol) > 0.95 and _corr(hann, vol) > 0.9
    assert not np.allclose(ramlak, hann)  # the option is honoured
    with pytest.raises(ValueError, match="filter must be one of"):
        recon.reconstruct_fbp(proj, theta, filter="wiener")
    with pytest.raises(ValueError, match="one angle per projection"):
        recon.reconstruct_fbp(proj, theta[:-1])
    with pytest.raises(ValueError, match=r"\(n_angle, nz, nx\)"):
        recon.reconstruct_fbp(proj[0], theta)
    with pytest.raises(ValueError, match="center must"):
        recon.reconstruct_fbp(proj, theta, center=1e3)
    if not recon.astra_cuda_available():
        with pytest.raises(GPUUnavailableError, match="ASTRA CUDA"):
            recon.reconstruct_fbp(proj, theta, device="gpu")


def test_off_centre_rotation_axis_is_estimated_and_corrected():
    from scipy import ndimage

    vol, proj, theta = _phantom_projections()
    nx = proj.shape[-1]
    assert recon.estimate_center(proj, theta) == pytest.approx((nx - 1) / 2, abs=0.05)
    offset = 2.3
    shifted = ndimage.shift(proj, (0, 0, offset), order=3, mode="constant")  # axis now at (nx-1)/2 + offset
    c = recon.estimate_center(shifted, theta)
    assert c == pytest.approx((nx - 1) / 2 + offset, abs=0.15)
    uncorrected = recon.reconstruct_fbp(shifted, theta, device="cpu")
    corrected = recon.reconstruct_fbp(shifted, theta, center="auto", device="cpu")
    assert _corr(corrected, vol) > 0.95 > _corr(uncorrected, vol) + 0.1
    # without a 180-degree pair the centre-of-mass sinusoid is used
    part = theta <= 60
    assert recon.estimate_center(shifted[part], theta[part]) == pytest.approx(c, abs=0.3)


def test_cuda_failure_falls_back_only_under_auto(monkeypatch):
    cpu_fbp = fbp._fbp_astra

    def broken(proj, theta, filt, *, cuda):
        if cuda:
            raise RuntimeError("no kernel image for this device")
        return cpu_fbp(proj, theta, filt, cuda=False)

    monkeypatch.setattr(fbp, "_astra_cuda_probe", lambda: (True, ""))
    monkeypatch.setattr(fbp, "set_astra_gpu", lambda index: None)
    monkeypatch.setattr(fbp, "_fbp_astra", broken)
    _, proj, theta = _phantom_projections(n=16, n_angle=31)
    with pytest.warns(RuntimeWarning, match="using the CPU"):
        out = recon.reconstruct_fbp(proj, theta, device="auto")
    np.testing.assert_allclose(out, recon.reconstruct_fbp(proj, theta, device="cpu"))
    with pytest.raises(RuntimeError, match="no kernel image"):
        recon.reconstruct_fbp(proj, theta, device="gpu")


@pytest.mark.gpu
def test_astra_cuda_matches_cpu():
    if not recon.astra_cuda_available():
        pytest.skip("ASTRA has no CUDA here")
    vol, proj, theta = _phantom_projections(n=64, n_angle=181)
    cpu = recon.reconstruct_fbp(proj, theta, device="cpu")
    for center in (None, 32.2):
        gpu = recon.reconstruct_fbp(proj, theta, device="gpu", center=center)
        ref = cpu if center is None else recon.reconstruct_fbp(proj, theta, device="cpu", center=center)
        assert gpu.shape == cpu.shape and gpu.dtype == np.float32
        assert _corr(gpu, ref) > 0.999
        assert np.abs(gpu - ref).max() < 0.02 * np.abs(ref).max()


# ---------------------------------------------------------------- files and CLI


def test_reconstruct_file_and_cli(tmp_path):
    raw = tmp_path / "raw.h5"
    r = run_cli("simulate", raw, "--size", "20", "--angles", "37", "--energies", "6540,6552,6600", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "rec.h5"
    r = run_cli("recon", raw, out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with open_input(out) as rec, open_input(raw) as src:
        assert rec.kind == "recon" and rec.shape == (20, 20, 20)
        np.testing.assert_array_equal(rec.energies, src.energies)
        np.testing.assert_array_equal(rec.truth()["matrices"], src.truth()["matrices"])  # truth travels along
        np.testing.assert_allclose(rec.recon(1), recon.reconstruct_energy(src, 1, device="cpu"), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(recon.reconstruct_energy(rec, 1), rec.recon(1))  # kind "recon": as stored
    r = run_cli("recon", raw, tmp_path / "x.h5", "--filter", "nope")
    assert r.returncode == 2 and r.stderr.strip().startswith("gpureg: error: Invalid value for '--filter'")


def test_simulate_refuses_saturating_photon_counts(tmp_path):
    from gpureg.synth import simulate

    with pytest.raises(ValueError, match="saturates the simulated 16-bit detector"):
        simulate(tmp_path / "x.h5", size=16, n_angles=8, photons=1e5)
    assert not (tmp_path / "x.h5").exists()


def test_astra_runs_on_the_device_of_the_data(monkeypatch):
    # On a multi-GPU node ASTRA must reconstruct on the GPU holding the projections (or CuPy's
    # current one), not on GPU 0: the index reaches astra.set_gpu_index, once per change.
    import types

    from gpureg.recon import fbp, project

    calls = []
    fake = types.SimpleNamespace(set_gpu_index=calls.append)
    monkeypatch.setitem(sys.modules, "astra", fake)
    monkeypatch.setattr(project, "_astra_gpu", [None])
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=2)))

    class OnGpu3:  # what array_device sees as a CuPy array on device 3
        __module__ = "cupy"
        device = types.SimpleNamespace(id=3)

    assert fbp.astra_gpu_index(None, np.zeros(3)) == 0
    assert fbp.astra_gpu_index(cp, np.zeros(3)) == 2
    assert fbp.astra_gpu_index(cp, OnGpu3()) == 3
    for index in (2, 2, 3, 3, 2):
        project.set_astra_gpu(index)
    assert calls == [2, 3, 2]
