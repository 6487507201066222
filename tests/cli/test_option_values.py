"""A bad option value is the user's error: one line, exit code 2, nothing written (found trying the CLI as a user).

In-process through :func:`gpureg.cli.main`; the values are refused before any registration runs.
"""

import numpy as np
import pytest

import gpureg
from tests.cli_run import run_cli

ENERGIES = np.array([6500.0, 6520.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0])
STEP = np.array([0.5, 0.5, 0.52, 0.6, 0.9, 1.0, 1.0, 1.0])  # an edge between 6540 and 6556 eV


def _recon(path, energies, scales):
    vols = [gpureg.two_particle_phantom((16, 16, 16), seed=1) * s for s in scales]
    gpureg.write_dataexchange(path, recon=vols, energy=energies)
    return path


@pytest.fixture(scope="module")
def recon_input(tmp_path_factory):
    return _recon(tmp_path_factory.mktemp("values") / "recon.h5", ENERGIES, STEP)


@pytest.mark.parametrize("option, expected", [
    (("--compression", "foo"), "compression must be one of"),
    (("--compression", "gzip:42"), "compression level of gzip must be in 1..9"),
    (("--compression", "none:3"), "compression 'none' takes no level"),
    (("--store-dtype", "int8"), "store_dtype must be one of float32, float16"),
    (("--denoise-spectra", "-3"), "denoise_spectra must be 'auto', 'off' or a number of components"),
    (("--reference", "9999"), "reference energy 9999.0 eV is not one of the energies"),
    (("--align-projections", "--scheduler", "tcp://localhost:1"),
     "--align-projections runs on one machine: not with --scheduler"),
    # as many components as energies: refused before the registration, not after it
    (("--denoise-spectra", "8"), "--denoise-spectra 8: more components than"),
])
def test_run_refuses_a_bad_value_in_one_line(recon_input, tmp_path, option, expected):
    out = tmp_path / "out.h5"
    r = run_cli("run", recon_input, out, "--device", "cpu", "--no-report", *option)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("gpureg: ") and "devices:" not in ln]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and errors[0].startswith("gpureg: error: ") and expected in errors[0], r.stderr
    assert "run:" not in r.stderr  # no energy was processed
    assert not list(tmp_path.iterdir())


def test_xanes_and_simulate_refuse_bad_values(recon_input, tmp_path):
    r = run_cli("xanes", recon_input, tmp_path / "x.h5", "--denoise-spectra", "100")
    assert r.returncode == 2 and "gpureg: error: " in r.stderr and "components must be 1..7" in r.stderr, r.stderr
    r = run_cli("simulate", tmp_path / "s.h5", "--size", "16", "--angles", "8", "--jitter", "-1")
    assert r.returncode == 2 and "gpureg: error: jitter must be >= 0 pixels" in r.stderr, r.stderr
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "s.h5").exists()


def test_warnings_are_one_line_each_and_the_pipeline_uses_no_deprecated_keyword(recon_input, tmp_path):
    # 16^3: both particles are under register_particles' min_voxels, so every energy warns that they are skipped
    r = run_cli("run", recon_input, tmp_path / "out.h5", "--device", "cpu", "--no-report", "--per-particle")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "gpureg: warning: register_particles: label 1 skipped" in r.stderr, r.stderr
    assert all(ln.startswith(("gpureg: ", "run: ", "result: ")) for ln in lines), r.stderr  # no source lines
    assert "deprecated" not in r.stderr, r.stderr


def test_help_shows_the_extra_and_no_bool_metavar_on_flags():
    r = run_cli("view", "--help")
    assert "pip install 'gpureg[viewer]'" in r.stdout, r.stdout  # not eaten as rich markup
    r = run_cli("info", "--help")
    assert "[[" not in r.stdout, r.stdout  # the optional argument bracketed once
    json_line = next(ln for ln in r.stdout.splitlines() if "--json" in ln)
    assert "<bool>" not in json_line, json_line


def test_a_result_given_as_input_is_named_as_such(tmp_path):
    import h5py

    result = tmp_path / "result.h5"
    with h5py.File(result, "w") as h5:  # what makes a file a result (gpureg.io.results.is_result)
        h5["energy"] = ENERGIES
        h5["registration/matrix"] = np.tile(np.eye(4), (ENERGIES.size, 1, 1))
    r = run_cli("run", result, tmp_path / "again.h5", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert f"gpureg: error: {result}: a result of gpureg (registration and maps), not projections" in r.stderr
    assert not (tmp_path / "again.h5").exists()


def test_overwrite_replaces_a_result_but_never_a_scan(recon_input, tmp_path):
    import shutil

    scan = tmp_path / "other_scan.h5"  # e.g. the output name mistyped as another scan's
    shutil.copy(recon_input, scan)
    before = scan.read_bytes()
    for command in (("run", recon_input, scan, "--device", "cpu", "--no-report"), ("xanes", recon_input, scan)):
        r = run_cli(*command, "--overwrite")
        assert r.returncode == 2, r.stderr
        assert f"gpureg: error: {scan}: exists and is not a gpureg result; not replaced" in r.stderr
        assert scan.read_bytes() == before


def test_psf_reaches_the_uncertainty_map_and_is_recorded(recon_input, tmp_path):
    # --psf: the resolution term of edge_energy_sigma (gpureg.xanes.uncertainty); 0 leaves it out, so the sigma
    # map can only shrink (the terms add in quadrature), and the run records what it used (issue 26).
    import h5py

    sig = {}
    for psf in ("0.7", "0"):
        out = tmp_path / f"psf{psf}.h5"
        r = run_cli("run", recon_input, out, "--device", "cpu", "--no-report", "--psf", psf)
        assert r.returncode == 0, r.stderr
        with h5py.File(out) as h5:
            assert h5["xanes"].attrs["psf_voxels"] == float(psf)
            sig[psf] = h5["xanes/edge_energy_sigma"][...]
            params = h5.attrs["parameters"]
        assert ('"psf"' in params) == (psf == "0"), params  # absent at the default: earlier results resume
    ok = np.isfinite(sig["0.7"]) & np.isfinite(sig["0"])
    assert ok.sum() > 100
    assert np.all(sig["0"][ok] <= sig["0.7"][ok] + 1e-6)
    assert np.any(sig["0"][ok] < sig["0.7"][ok] - 1e-5)  # uniform particles here: a small resolution term
    r = run_cli("xanes", recon_input, tmp_path / "x.h5", "--psf", "0")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "x.h5") as h5:
        assert h5["xanes"].attrs["psf_voxels"] == 0.0
