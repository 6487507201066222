"""Validation suite: a reduced sweep at 32^3 on the CPU, its ground truth, reports and CLI.

Tolerances. At 32^3 the particles are about 5 voxels in radius. Raw grey
registration (saturated voxels replaced on the noisy cases, ``denoise="impulse"``,
then gpureg's Gaussian sigma 1) recovers translation, rotation and scale within
0.1 voxel up to 10 % salt-and-pepper noise (measured 0.02-0.03; 0.02-0.09 with
the median filter used before issue 13, when the bound was 0.2). Binarized
registration (partial-volume ramp, issue 13) measured 0.05-0.26 voxel at 10 %
and 0.06-0.32 at 30 % noise at this size (0.25-0.55 with the hard binarization
and the median; 64^3: bench/results/validation-cpu-*.json), so binarized cases
are held to 0.5 voxel (was 0.75) and a lower MSE than before registration.
"""

import csv
import json

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

import gpureg
from gpureg import synth
from gpureg import validate as val
from gpureg.cli import app
from gpureg.validate.sitk import sitk_available

SIZE = 32
AFFINE = ("translation", "rotation", "scale")
DEFORM = (0.01, 0.03, 0.05)


@pytest.fixture(scope="module")
def raw_sweep():
    return gpureg.run_validation(
        None, size=SIZE, device="cpu", distortions=AFFINE + ("deformation",),
        magnitudes={"translation": (0.10,), "rotation": (15.0,), "scale": (1.15,), "deformation": DEFORM},
        noise=(0.0, 0.10), modes=("raw",), sitk=False, figures=False)


@pytest.fixture(scope="module")
def binarized_sweep():
    return gpureg.run_validation(
        None, size=SIZE, device="cpu", distortions=AFFINE + ("shear",),
        magnitudes={"translation": (0.10,), "rotation": (15.0,), "scale": (0.85,), "shear": (0.15,)},
        noise=(0.10, 0.30), modes=("binarized",), sitk=False, figures=False)


def test_no_case_crashes(raw_sweep, binarized_sweep):
    assert len(raw_sweep.rows) == (3 + len(DEFORM)) * 2
    assert len(binarized_sweep.rows) == 4 * 2
    for res in (raw_sweep, binarized_sweep):
        assert res.failures == []
        for r in res.rows:
            assert r["method"] == "gpureg" and r["device"] == "cpu" and r["size"] == SIZE
            assert np.isfinite([r["error_vox"], r["mse_after"], r["mse_clean_after"], r["seconds"]]).all()


@pytest.mark.parametrize("distortion", AFFINE)
def test_affine_distortions_recovered_within_0p1_voxel(raw_sweep, distortion):
    rows = raw_sweep.select(distortion=distortion)
    assert {r["noise"] for r in rows} == {0.0, 0.10}
    for r in rows:
        assert r["error_vox"] < 0.1, r
        assert r["mse_after"] < 0.5 * r["mse_before"], r
        assert r["mse_clean_after"] < 0.5 * r["mse_clean_before"], r
        assert r["filter"] == ("impulse" if r["noise"] > 0 else "none")


def test_error_grows_with_deformation_amplitude(raw_sweep):
    for level in (0.0, 0.10):
        rows = sorted(raw_sweep.select(distortion="deformation", noise=level), key=lambda r: r["magnitude"])
        assert [r["magnitude"] for r in rows] == list(DEFORM)
        err = [r["error_vox"] for r in rows]
        floor = [r["floor_vox"] for r in rows]
        assert err[0] < err[1] < err[2], err
        # The warp is fixed and only scaled, so the best affine's residual (floor)
        # grows with it and no affine does much better; the registration lands
        # near the best affine (measured at 32^3: within 0.07 voxel clean, 0.22 at 10 %).
        assert floor[0] < floor[1] < floor[2]
        margin = 0.12 if level == 0 else 0.35
        for e, f in zip(err, floor):
            assert f - 0.05 < e < f + margin, (err, floor)
        assert err[2] > 2 * err[0]


def test_binarized_subvoxel_under_noise(binarized_sweep):
    for r in binarized_sweep.rows:
        assert r["error_vox"] < 0.5, r
        assert r["mse_after"] < r["mse_before"], r


def test_summary_table(raw_sweep):
    summ = val.summarize(raw_sweep.rows, noise=0.10)
    by = {x["distortion"]: x for x in summ}
    assert set(by) == set(AFFINE) | {"deformation"}
    d = by["deformation"]
    errs = [r["error_vox"] for r in raw_sweep.select(distortion="deformation", noise=0.10)]
    assert d["cases"] == 3 and d["failed"] == 0
    assert d["error_mean_vox"] == pytest.approx(np.mean(errs))
    assert d["error_worst_vox"] == pytest.approx(max(errs))


def test_salt_and_pepper_fraction_and_seed():
    v = np.linspace(0.2, 0.8, 40 ** 3, dtype=np.float32).reshape(40, 40, 40)
    n = v.size
    for fraction in (0.02, 0.3):
        a = synth.salt_and_pepper(v, fraction, seed=3)
        sigma = np.sqrt(n * fraction / 2)
        assert abs(int((a == v.min()).sum()) - n * fraction / 2) < 5 * sigma + 1
        assert abs(int((a == v.max()).sum()) - n * fraction / 2) < 5 * sigma + 1
        changed = (a != v) & (v != v.min()) & (v != v.max())
        assert abs(int(changed.sum()) - n * fraction) < 5 * np.sqrt(2 * n * fraction)
        np.testing.assert_array_equal(a, synth.salt_and_pepper(v, fraction, seed=3))
        assert not np.array_equal(a, synth.salt_and_pepper(v, fraction, seed=4))
    np.testing.assert_array_equal(synth.salt_and_pepper(v, 0.0), v)
    with pytest.raises(ValueError, match="fraction"):
        synth.salt_and_pepper(v, 1.0)


def test_distortion_matrices():
    shape = (40, 40, 40)
    c = gpureg.core.transform.grid_center(shape)
    t = synth.distortion_matrix("translation", 0.1, shape)
    assert np.linalg.norm(t[:3, 3]) == pytest.approx(4.0)
    np.testing.assert_allclose(t[:3, :3], np.eye(3))
    r = synth.distortion_matrix("rotation", 15.0, shape, index=1)
    np.testing.assert_allclose(r[:3, :3] @ r[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.degrees(np.arccos((np.trace(r[:3, :3]) - 1) / 2)) == pytest.approx(15.0)
    for m in (r, synth.distortion_matrix("scale", 0.85, shape), synth.distortion_matrix("shear", 0.15, shape)):
        np.testing.assert_allclose(m[:3, :3] @ c + m[:3, 3], c, atol=1e-12)  # about the grid centre
    np.testing.assert_allclose(np.diag(synth.distortion_matrix("scale", 0.85, shape))[:3], 0.85)
    with pytest.raises(ValueError, match="distortion"):
        synth.distortion_matrix("deformation", 0.1, shape)


def test_deformation_case_truth():
    """The sweep's deformation case: the moving phantom at the true positions is the reference; the best affine's
    residual grows in proportion to the amplitude (the floor the sweep reports)."""
    shape = (32, 32, 32)
    vol, labels = gpureg.two_particle_phantom(shape, edge_width=1.0, return_labels=True)
    p = np.argwhere(labels > 0).astype(float)
    moving, q, best = synth.distorted_phantom("deformation", 1.5 / 32, shape, p)
    peak = np.linalg.norm(q - p, axis=1).max()
    assert peak <= 1.5 + 1e-9  # max |w| over the grid is the amplitude; the particles hold most of it
    # Sampled at the true positions, the moving volume gives back the reference up to linear interpolation of
    # the textured phantom (0.022 mean here); at the unwarped positions it does not (0.062).
    back = ndimage.map_coordinates(moving, q.T, order=1)
    same = ndimage.map_coordinates(moving, p.T, order=1)
    ref = vol[labels > 0]
    assert np.abs(back - ref).mean() < 0.5 * np.abs(same - ref).mean()
    _, q_half, best_half = synth.distorted_phantom("deformation", 0.75 / 32, shape, p)
    err = [np.linalg.norm(t - (p @ m[:3, :3].T + m[:3, 3]), axis=1).mean() for t, m in ((q_half, best_half), (q, best))]
    assert err[1] / err[0] == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="too large"):
        synth.distorted_phantom("deformation", 0.5, shape, p)


@pytest.mark.parametrize("kwargs, match", [
    (dict(distortions=("twist",)), "distortions"),
    (dict(noise=(0.0, 1.0)), "noise"),
    (dict(modes=("grey",)), "modes"),
    (dict(size=16), "size"),
    (dict(denoise="bilateral"), "denoise"),
    (dict(smooth=-1.0), "smooth"),
    (dict(magnitudes={"twist": (1.0,)}), "unknown distortions"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gpureg.run_validation(None, device="cpu", sitk=False, **kwargs)


def test_sitk_required_but_missing(monkeypatch):
    monkeypatch.setattr("gpureg.validate.sitk.sitk_available", lambda: False)
    with pytest.raises(RuntimeError, match="SimpleITK is not installed"):
        gpureg.run_validation(None, device="cpu", sitk=True)


def test_reports_and_figures(tmp_path):
    use_sitk = sitk_available()
    res = gpureg.run_validation(tmp_path, size=SIZE, device="cpu", distortions=("scale",),
                                magnitudes={"scale": (1.15,)}, noise=(0.0,), modes=("binarized",), sitk=use_sitk)
    methods = ["gpureg"] + (["SimpleITK"] if use_sitk else [])
    assert [r["method"] for r in res.rows] == methods and res.failures == []
    with open(tmp_path / "validation.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == methods
    for t, r in zip(table, res.rows):
        assert float(t["error_vox"]) == pytest.approx(r["error_vox"], rel=1e-5)
        assert t["status"] == "ok"
    doc = json.loads((tmp_path / "validation.json").read_text())
    assert doc["settings"]["size"] == SIZE and len(doc["rows"]) == len(methods)
    md = (tmp_path / "summary.md").read_text()
    assert "## Noise 0 %" in md and "| scale | binarized |" in md
    if use_sitk:
        assert "SimpleITK error" in md and "time ratio SimpleITK/gpureg" in md
        assert res.rows[1]["error_vox"] < 1.0  # the reference registers the same arrays
    pngs = ["error_vs_magnitude_binarized.png", "time_binarized.png", "examples/scale_before.png",
            "examples/scale_after_gpureg.png"] + (["examples/scale_after_simpleitk.png"] if use_sitk else [])
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert tmp_path / name in res.files


def test_cli_validate(tmp_path):
    out = tmp_path / "v"
    r = CliRunner().invoke(app, ["validate", str(out), "--size", "32", "--distortions", "scale", "--noise", "0",
                                 "--modes", "raw", "--no-sitk", "--no-figures", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "3 registrations (0 failed)" in r.output
    with open(out / "validation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and {x["magnitude"] for x in rows} == {"0.85", "1.07", "1.15"}
    assert all(float(x["error_vox"]) < 0.2 for x in rows)


def test_cli_validate_bad_noise(tmp_path):
    r = CliRunner().invoke(app, ["validate", str(tmp_path), "--noise", "ten", "--no-sitk"])
    assert r.exit_code == 2
    assert "--noise must be percentages" in r.output
