"""Per-projection alignment (issue 25): shifts recovered against simulated truth, fallbacks, the pipeline option."""

import warnings

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.recon import AlignmentWarning, align_projections, forward_project, reconstruct_fbp
from gpureg.recon.align import com_shifts, shift_projections, unobservable_part, wobble_estimate
from gpureg.synth.jitter import apply_jitter, projection_jitter
from gpureg.synth.scan import sample_volumes

SIZE, ANGLES = 32, 91
THETA = np.linspace(-90.0, 90.0, ANGLES)


def _noisy(line, photons, seed):
    """Line integrals through Poisson counts at ``photons`` per pixel (the simulated detector, without flats)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(photons * np.exp(-line.astype(np.float64)))
    return (-np.log(np.maximum(counts, 1) / photons)).astype(np.float32)


@pytest.fixture(scope="module")
def scan():
    """One energy of the two-particle sample above the edge: clean line integrals, 2 px jitter truth, noisy data."""
    vol = sample_volumes((SIZE,) * 3, [6560.0], seed=0)[0]
    line = forward_project(vol, THETA, projector="line")
    truth = projection_jitter(1, THETA, 2.0, seed=3)[0]
    return {"line": line, "truth": truth, "jittered": _noisy(apply_jitter(line, truth), 1e4, 1),
            "still": _noisy(line, 1e4, 1)}


def test_shift_projections_round_trip_and_sign():
    rng = np.random.default_rng(0)
    p = np.zeros((3, 24, 24), np.float32)
    p[:, 8:16, 6:14] = rng.random((3, 8, 8)) + 1.0
    s = np.array([[1.0, -2.0], [0.5, 0.25], [-1.5, 3.0]])
    moved = apply_jitter(p, s)  # measured(r, c) = ideal(r - dr, c - dc)
    # An integer shift moves the block by exactly that many pixels.
    assert np.allclose(moved[0, 9:17, 4:12], p[0, 8:16, 6:14], atol=1e-4)
    # Sub-pixel shifts of smooth (band-limited) content that stays in the field invert each other.
    r, c = np.mgrid[0:24, 0:24]
    blob = np.exp(-((r - 11.0) ** 2 + (c - 12.5) ** 2) / 6.0).astype(np.float32)[None].repeat(3, axis=0)
    back = shift_projections(apply_jitter(blob, s), s)
    assert np.abs(back - blob).max() < 1e-3
    # ... and the sign: the blob's centre of mass moves by +shift.
    com = (apply_jitter(blob, s)[2] * c).sum() / blob[2].sum()
    assert abs(com - (12.5 + 3.0)) < 1e-3


def test_unobservable_part_is_a_projection():
    t = np.deg2rad(THETA)
    gauge = np.stack([np.full_like(t, 0.7), 1.0 + 2.0 * np.cos(t) - 0.5 * np.sin(t)], axis=1)
    assert np.allclose(unobservable_part(gauge, THETA), gauge)
    jit = projection_jitter(2, THETA, 1.5, seed=1)
    for s in jit:
        assert np.allclose(unobservable_part(s, THETA), 0.0, atol=1e-10)
        assert np.allclose(np.sqrt((s ** 2).mean(axis=0)), 1.5)  # exactly the RMS asked for, per axis
    assert not np.allclose(jit[0], jit[1])  # independent per energy
    assert np.array_equal(projection_jitter(2, THETA, 1.5, seed=1), jit)  # seeded


def test_centre_of_mass_start(scan):
    # Noise-free data: the centre of mass gives the jitter almost exactly (the particles stay in the field).
    s = com_shifts(apply_jitter(scan["line"], scan["truth"]), THETA)
    assert np.sqrt(((s - scan["truth"]) ** 2).mean()) < 0.1
    w = wobble_estimate(scan["jittered"], THETA)
    assert 1.5 < w["row_rms"] < 2.3 and 1.5 < w["column_rms"] < 2.3
    assert wobble_estimate(scan["still"], THETA)["column_rms"] < 0.2
    cut = scan["line"].copy()
    cut[::2, :, :12] = 0.0  # half the projections lose a third of the sample: totals no longer agree
    assert com_shifts(cut, THETA) is None


def test_recovers_shifts_on_noisy_data(scan):
    res = align_projections(scan["jittered"], THETA, device="cpu")
    assert res.status == "aligned" and res.applied and res.converged
    err = np.sqrt(((res.shifts - scan["truth"]) ** 2).mean(axis=0))
    # Issue 25: within 0.2 px RMS (measured here: about 0.03 rows, 0.05 columns at 32^3, 91 angles, Poisson 1e4).
    assert err.max() < 0.2, err
    assert res.error_after < 0.5 * res.error_before
    plain = reconstruct_fbp(scan["jittered"], THETA, device="cpu")
    clean = reconstruct_fbp(scan["line"], THETA, device="cpu")
    # The aligned reconstruction is closer to the jitter-free one than the plain FBP of the wobbling data.
    assert np.abs(res.volume - clean).mean() < 0.5 * np.abs(plain - clean).mean()


def test_issue_claim_64_cubed_181_angles_3px():
    """Issue 25's bound at its size: 64^3, 181 angles, Poisson noise, 3 px RMS jitter (the largest asked)."""
    theta = np.linspace(-90.0, 90.0, 181)
    line = forward_project(sample_volumes((64,) * 3, [6552.0], seed=0)[0], theta, projector="line")
    truth = projection_jitter(1, theta, 3.0, seed=7)[0]
    res = align_projections(_noisy(apply_jitter(line, truth), 1e4, 2), theta, device="cpu")
    err = np.sqrt(((res.shifts - truth) ** 2).mean(axis=0))
    # Within 0.2 px RMS per axis (measured: about 0.02 rows, 0.06 columns; bench/align.py, jitter 1-3 px).
    assert res.status == "aligned" and err.max() < 0.2, err


@pytest.mark.gpu
def test_gpu_matches_cpu(scan):
    """CuPy projections: shifts applied on the device, ASTRA-CUDA FBP and FP_CUDA; same answer as the CPU path."""
    from gpureg.core.backend import cupy_or_none
    from gpureg.recon import astra_cuda_available

    if not astra_cuda_available():
        pytest.skip("ASTRA without CUDA")
    cp = cupy_or_none()
    cpu = align_projections(scan["jittered"], THETA, device="cpu")
    gpu = align_projections(cp.asarray(scan["jittered"]), THETA, device="gpu")
    assert gpu.status == "aligned" and type(gpu.volume).__module__.startswith("cupy")
    # Both within 0.2 px of the truth, and within 0.05 px RMS of each other (the CUDA projectors
    # interpolate differently from ASTRA's CPU "linear" ones: not bit-identical).
    assert np.sqrt(((gpu.shifts - scan["truth"]) ** 2).mean(axis=0)).max() < 0.2
    assert np.sqrt(((gpu.shifts - cpu.shifts) ** 2).mean()) < 0.05
    v = cp.asnumpy(gpu.volume)
    assert np.abs(v - cpu.volume).mean() < 0.05 * np.abs(cpu.volume).mean()


def test_reference_start(scan):
    ref = reconstruct_fbp(scan["still"], THETA, device="cpu")
    res = align_projections(scan["jittered"], THETA, device="cpu", reference=ref, com_start=False)
    assert res.applied
    assert np.sqrt(((res.shifts - scan["truth"]) ** 2).mean()) < 0.2


def test_still_data_is_left_unchanged(scan):
    res = align_projections(scan["still"], THETA, device="cpu")
    assert res.status == "unchanged" and not res.applied and not np.any(res.shifts)
    assert np.array_equal(res.volume, reconstruct_fbp(scan["still"], THETA, device="cpu"))
    assert np.sqrt((res.estimated ** 2).mean()) < 0.1  # what it found is noise


def test_falls_back_with_a_warning(scan):
    with pytest.warns(AlignmentWarning, match="energy 6560 eV: projection alignment moves a projection"):
        res = align_projections(scan["jittered"], THETA, device="cpu", max_shift=1.0, name="energy 6560 eV")
    assert res.status == "fallback" and not res.applied and not np.any(res.shifts)
    assert np.array_equal(res.volume, reconstruct_fbp(scan["jittered"], THETA, device="cpu"))
    with pytest.warns(AlignmentWarning, match="did not converge"):
        align_projections(scan["jittered"], THETA, device="cpu", levels=[(1, 1)], tol=1e-6)


def test_bad_arguments(scan):
    with pytest.raises(ValueError, match="theta_deg must have one angle per projection"):
        align_projections(scan["still"], THETA[:-1])
    with pytest.raises(ValueError, match="reference must be a"):
        align_projections(scan["still"], THETA, reference=np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        projection_jitter(1, THETA, -1.0)


@pytest.fixture(scope="module")
def jittered_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("jitter") / "raw.h5"
    energies = [6500.0, 6535.0, 6545.0, 6550.0, 6555.0, 6565.0, 6620.0]
    gpureg.simulate(path, size=24, energies=energies, n_angles=61, jitter=1.5, seed=2)
    return path


def test_pipeline_stores_the_alignment(jittered_input, tmp_path):
    from gpureg.figures.alignment import alignment_figure
    from gpureg.io.results import ResultFile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # XANES edge ranges on this coarse grid
        gpureg.run(jittered_input, tmp_path / "out.h5", device="cpu", align_projections=True, report=False)
    with h5py.File(tmp_path / "out.h5") as h5:
        g = h5["alignment"]
        shifts, truth = g["projection_shifts"][...], h5["truth/projection_shifts"][...]
        assert shifts.shape == (7, 61, 2) and g["theta"].shape == (61,)
        assert [s.decode() for s in g["status"][...]] == ["aligned"] * 7
        assert np.all(g["error_after"][...] < g["error_before"][...]) and np.all(g["iterations"][...] >= 1)
        # 24^3, 61 angles, 1.5 px jitter: measured 0.06 px RMS; the issue's bound is 0.2 px.
        assert np.sqrt(((shifts - truth) ** 2).mean()) < 0.2
        assert '"align_projections": true' in h5.attrs["parameters"]
    with ResultFile(tmp_path / "out.h5") as rf:
        al = rf.alignment()
    png = alignment_figure(al["theta"], al["energies"], al["estimated"], al["error_before"], al["error_after"],
                           tmp_path / "a.png", status=al["status"])
    assert png.stat().st_size > 1000


def test_run_without_the_option_says_the_projections_wobble(jittered_input, tmp_path, caplog):
    import logging

    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="gpureg"):
        warnings.simplefilter("ignore", UserWarning)
        gpureg.run(jittered_input, tmp_path / "plain.h5", device="cpu", report=False)
    assert "wobble" in caplog.text and "--align-projections would remove it" in caplog.text
    with h5py.File(tmp_path / "plain.h5") as h5:
        assert "alignment" not in h5 and "align_projections" not in h5.attrs["parameters"]


def test_watch_aligns_and_stores_the_alignment(jittered_input, tmp_path):
    from gpureg.io import write_dataexchange
    from gpureg.pipeline.watch import watch

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with gpureg.open_input(jittered_input) as r:
        truth = r.truth()["projection_shifts"]
        for i, e in enumerate(r.energies):
            write_dataexchange(inbox / f"e{i:02d}.h5", data=[r.projections(i)], data_white=[r.flat(i)],
                               data_dark=r.dark(), theta=r.theta, energy=[e])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        watch(inbox, tmp_path / "live.h5", expect=len(truth), poll=0, settle=0, report=False, device="cpu",
              align_projections=True)
    with h5py.File(tmp_path / "live.h5") as h5:
        shifts = h5["alignment/projection_shifts"][...]
        assert [s.decode() for s in h5["alignment/status"][...]] == ["aligned"] * len(truth)
    assert np.sqrt(((shifts - truth) ** 2).mean()) < 0.2  # as in the batch run


def test_alignment_needs_projections(tmp_path):
    path = gpureg.write_dataexchange(tmp_path / "recon.h5", recon=[np.zeros((8, 8, 8), np.float32)] * 5,
                                     energy=[6500.0, 6540.0, 6550.0, 6560.0, 6600.0])
    with pytest.raises(ValueError, match="holds reconstructions; align_projections=True needs projections"):
        gpureg.run(path, tmp_path / "out.h5", align_projections=True)
    with pytest.raises(ValueError, match="not with scheduler"):
        gpureg.RunOptions(align_projections=True, scheduler="tcp://x:1")


def test_cli_simulate_jitter_and_info(jittered_input, tmp_path):
    from typer.testing import CliRunner

    from gpureg.cli import app

    raw = tmp_path / "j.h5"
    r = CliRunner().invoke(app, ["simulate", str(raw), "--size", "16", "--angles", "31", "--energies", "6540,6560",
                                 "--jitter", "2"])
    assert r.exit_code == 0, r.output
    with h5py.File(raw) as h5:
        assert h5["truth/projection_shifts"].shape == (2, 31, 2)
    r = CliRunner().invoke(app, ["info", str(jittered_input)])
    assert r.exit_code == 0 and "wobble" in r.output and "try --align-projections" in r.output, r.output
