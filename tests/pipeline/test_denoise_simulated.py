"""Issue 26 on a simulated experiment: ``--denoise-spectra auto`` against the truth, and the sigma map's coverage.

Input: ``gpureg simulate`` (Mn K-edge, 29 energies, default motion, Poisson + read noise), 48^3, 181 angles,
1000 photons per detector pixel: per-voxel noise 6 % of the edge jump, the noise-dominated case of
``bench/denoise.py`` (which explains why this dose is realistic, on the generous side, for a TXM scan; at the
default 10^4 photons the map is limited by spatial resolution, 0.26 eV RMS without any noise, not by noise).
The scan runs through the pipeline (CPU); the maps with and without denoising come from the stored aligned
stack with :func:`gpureg.xanes.stack.edge_energy_map`, the pipeline's own XANES step.
"""

import warnings

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.pipeline import run
from gpureg.xanes.stack import edge_energy_map


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("den")
    gpureg.simulate(tmp / "raw.h5", size=48, n_angles=181, photons=1000.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run(tmp / "raw.h5", tmp / "out.h5", device="cpu", report=False)
    with h5py.File(tmp / "out.h5") as h5:
        d = {k: h5[k][...] for k in ("aligned", "energy", "truth/edge_energy", "truth/labels", "xanes/edge_energy")}
    out = {"truth": d["truth/edge_energy"], "labels": d["truth/labels"], "pipeline": d["xanes/edge_energy"]}
    for den in (None, "auto"):
        info = {}
        out[den] = edge_energy_map(d["aligned"], d["energy"], device="cpu", denoise=den, info=info)
        out[den]["k"] = info["basis"].k
    out["sel"] = ((out["labels"] > 0) & np.isfinite(out["truth"]) & np.isfinite(out[None]["edge_energy"])
                  & np.isfinite(out["auto"]["edge_energy"]))
    return out


def test_denoise_lowers_edge_error_without_moving_particle_medians(maps, record_property):
    sel, truth = maps["sel"], maps["truth"]
    assert sel.sum() > 3000
    # the pipeline's map (--denoise-spectra off) is the map computed here without denoising, where there is
    # sample: the pipeline masks its maps with the reference's Otsu mask (issue 27), which leaves out a few
    # partial-volume voxels at the particles' surfaces (2-3 % of the truth's particle voxels in bench/maps.py)
    inside = sel & np.isfinite(maps["pipeline"])
    assert inside.sum() >= 0.95 * sel.sum(), (inside.sum(), sel.sum())
    np.testing.assert_array_equal(maps["pipeline"][inside], maps[None]["edge_energy"][inside])
    err = {den: maps[den]["edge_energy"][sel] - truth[sel] for den in (None, "auto")}
    rms = {den: float(np.sqrt(np.mean(e ** 2))) for den, e in err.items()}
    record_property("rms_off_auto_ev", [rms[None], rms["auto"]])
    assert 2 <= maps["auto"]["k"] <= 6                             # measured 3
    # issue 26: >= 30 % lower. Measured 0.709 -> 0.346 eV (-51 %; seeds 1, 2 of bench/denoise.py: -36, -45 %);
    # the same scan without noise maps at 0.263
    assert rms["auto"] <= 0.7 * rms[None], rms
    labels = maps["labels"][sel]
    for k in (1, 2):
        # issue 26: per-particle medians (of map - truth: the particles' bias) move <= 0.05 eV. Measured
        # +0.033 and +0.043 eV; with ~2400 and ~1400 voxels of 0.3-0.9 eV error the medians' own standard error
        # is ~0.01-0.02 eV. Both maps without the voxels the map without denoising masks as having no single
        # edge (issue 27, edge_ambiguous: 73 particle voxels here). (Seed 1 of bench/denoise.py moves particle 1
        # by 0.092 eV, 0.125 with the basis from 16 planes: the map without denoising is 0.053 below the
        # noise-free scan's median there, the denoised one 0.039 above it.)
        shift = np.median(err["auto"][labels == k]) - np.median(err[None][labels == k])
        assert abs(shift) <= 0.05, (k, shift)


def test_sigma_covers_the_true_error(maps, record_property):
    # Without denoising, the map's error is mostly noise at this dose, and the sigma map (per-voxel noise level
    # from the residual to the spectral basis, the stack's per-energy noise profile, propagated to the crossing)
    # must cover it: nominal 68 % of the noise errors (measured 0.67-0.71 against the noise-free scan, 3 seeds);
    # the 0.26 eV that spatial resolution adds (not noise, so not in sigma) lowers the expected share of the
    # total error to ~0.63 (sigma ~0.5 eV). ~3700 voxels whose noise is correlated over ~2 voxels (FBP,
    # resampling): about 500 independent ones, binomial sd 0.02. Measured 0.614 (seeds 1, 2: 0.59, 0.59;
    # 0.57 with white noise assumed per voxel, before the noise profile).
    sel = maps["sel"]
    d = np.abs(maps[None]["edge_energy"] - maps["truth"])[sel]
    cover = float(np.mean(d <= maps[None]["edge_energy_sigma"][sel]))
    record_property("coverage_off", cover)
    assert 0.55 <= cover <= 0.76, cover
    # with denoising the noise error shrinks below the 0.27 eV that spatial resolution leaves (not noise: sigma
    # cannot see it), so only a lower share is covered: measured 0.35 (issue 26's coverage must-hold is not met
    # for the denoised map; bench/denoise.py: 0.31-0.40 of the true errors, 0.54-0.57 of the noise errors)
    assert np.isfinite(maps["auto"]["edge_energy_sigma"][sel]).all()
