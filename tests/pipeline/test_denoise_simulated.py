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
    # issue 26: the sigma map covers the true error at its nominal rate, 68 % within 1 sigma (95 % within 2).
    # sigma = noise (per-voxel level from the residual to the spectral basis, the stack's noise profile,
    # propagated to the crossing) + model error in quadrature (gpureg.xanes.uncertainty: interpolation between
    # energies, the PSF's mixing of neighbouring spectra, and with denoising the change it made, all from the
    # data). ~3700 voxels whose errors are correlated over ~2 voxels (FBP, resampling): about 500 independent
    # ones, binomial sd 0.02. Measured here: 0.680 (2 sigma 0.946) without denoising, 0.663 (0.950) with it;
    # over 24 maps (seeds 0-2 x 1000 and 10^4 photons x default and fine grids x off/auto, the pipeline's
    # stacks as bench/denoise.py makes them) 0.62-0.77, 2 sigma 0.91-0.98. The noise term alone covered 0.614
    # and 0.351 here (the model error it leaves out: the same scan without noise maps at 0.26 eV RMS)
    sel = maps["sel"]
    for den, lo, hi in ((None, 0.62, 0.74), ("auto", 0.60, 0.76)):
        d = np.abs(maps[den]["edge_energy"] - maps["truth"])[sel]
        s = maps[den]["edge_energy_sigma"][sel]
        cover, cover2 = float(np.mean(d <= s)), float(np.mean(d <= 2 * s))
        record_property(f"coverage_{den or 'off'}", [cover, cover2])
        assert lo <= cover <= hi, (den, cover)
        assert 0.90 <= cover2 <= 0.99, (den, cover2)
        # not uselessly large: for normal errors median |error| = 0.674 sigma; measured median sigma 0.567 and
        # 0.316 eV against median |error| 0.386 and 0.219 (1.47x, 1.44x)
        assert np.median(s) <= 2.0 * np.median(d), (den, np.median(s), np.median(d))
