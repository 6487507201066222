"""The model error in the edge-energy uncertainty (issue 26): interpolation between energies and spatial resolution.

Truths: the Mn model spectra's own 0.5 crossing (:func:`gpureg.synth.edge_offsets`, 0.005 eV grid) for the
interpolation term; for the resolution term, a volume with a sharp chemical boundary whose spectra are mixed
by a Gaussian of :data:`~gpureg.xanes.uncertainty.PSF_VOXELS`, against the crossings of the unmixed spectra.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from gpureg import synth, xanes
from gpureg.core.backend import to_host
from gpureg.core.errors import ParameterError
from gpureg.xanes.uncertainty import PSF_VOXELS, model_terms


@pytest.mark.parametrize("grid, cover_lo, rms_hi", [("default", 0.65, 0.25), ("fine", 0.65, 0.08)])
def test_grid_term_covers_the_interpolation_error(grid, cover_lo, rms_hi):
    # 27 edge positions over the simulated range (more than a grid step) x 4 white lines, noise-free. The
    # crossing's error is 0.139 eV RMS on the default grid's 3 eV steps, 0.026 on the fine grid's 1.5 eV; the
    # term (|PCHIP - linear crossing|) is 0.183 and 0.062 eV RMS and covers 0.71 and 0.82 of the errors
    E = synth.parse_energies(grid)
    e0 = np.linspace(*synth.MN_EDGE_RANGE, 27)
    rng = xanes.edge_ranges(E, e0=6552.0)
    err, term = [], []
    for wl in (0.3, 0.6, 1.0, 1.4):
        mu = xanes.synthetic_spectra(E, e0, white_line=np.full(e0.size, wl), **synth.MN_SPECTRUM)
        half, _ = synth.edge_offsets(np.full(e0.size, wl))
        err.append(np.asarray(xanes.edge_energy(mu, E, min_jump=0, e0=6552.0)["edge_energy"]) - (e0 + half))
        term.append(model_terms(np, mu.astype(np.float32), None, E, rng)["grid"])
    err, term = np.abs(np.concatenate(err)), np.concatenate(term)
    assert np.mean(err <= term) >= cover_lo
    assert np.sqrt(np.mean(term ** 2)) <= rms_hi                  # not uselessly large


def test_resolution_term_measures_the_mixing_at_a_chemical_boundary():
    # 6546 | 6551 eV halves of a 20^3 volume, spectra mixed by a Gaussian of PSF_VOXELS (what FBP and the
    # resampling do), little noise (0.3 % of the jump). At the boundary (2 planes each side) the mixing moves the
    # crossing by 0.38 eV (median); the sigma map with the resolution term has median 0.381 eV there, without it
    # (psf=0: noise and interpolation only) 0.087. Far from the boundary (> 4 planes) the mixing changes nothing
    # and sigma stays at the interpolation term (0.11 eV on 3 eV steps, errors 0.017)
    E = xanes.scan_energies()
    n = 20
    x = np.arange(n)
    e0 = np.where(x < n // 2, 6546.0, 6551.0)[None, None, :] * np.ones((n, n, n))
    clean = xanes.synthetic_spectra(E, e0).astype(np.float32)
    truth = xanes.edge_energy(clean, E, min_jump=0, e0=6548.5)["edge_energy"]
    mixed = np.stack([ndi.gaussian_filter(v, PSF_VOXELS, mode="nearest") for v in clean])
    noisy = (mixed + 0.003 * np.random.default_rng(0).standard_normal(mixed.shape)).astype(np.float32)
    boundary = np.broadcast_to(np.abs(x - n / 2 + 0.5) < 2, (n, n, n))
    far = np.broadcast_to(np.abs(x - n / 2 + 0.5) > 4, (n, n, n))
    med = {}
    for psf in (PSF_VOXELS, 0.0):
        m = xanes.edge_energy_map(noisy, E, device="cpu", e0=6548.5, psf=psf)
        err, s = np.abs(m["edge_energy"] - truth), m["edge_energy_sigma"]
        assert np.isfinite(s[boundary | far]).all()
        med[psf] = [float(np.median(v[sel])) for v in (err, s) for sel in (boundary, far)]
    err_b, err_f, sig_b, sig_f = med[PSF_VOXELS]
    assert err_b > 0.25 and err_f < 0.05                          # the mixing's error sits at the boundary
    assert 0.7 * err_b <= sig_b <= 1.5 * err_b, med               # and the resolution term measures it
    assert med[0.0][2] < 0.4 * err_b, med                          # which noise + interpolation alone miss
    assert err_f <= sig_f <= 0.2, med


def test_psf_must_not_be_negative():
    E = xanes.scan_energies()
    stack = xanes.synthetic_spectra(E, np.full((4, 4, 4), 6548.0)).astype(np.float32)
    with pytest.raises(ParameterError, match="psf must be >= 0"):
        xanes.edge_energy_map(stack, E, device="cpu", psf=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("denoise", [None, "auto"])
def test_sigma_map_on_the_gpu_matches_the_cpu(denoise):
    # The whole map step as the pipeline runs it on a GPU (CuPy: the PSF blur, the residual restoration, the
    # model terms) against the CPU on the same stack: edges shifting 6547 -> 6551 eV along x, 3 % noise. float32
    # arithmetic in another order: the crossing agrees to 2e-3 eV, sigma (a difference of crossings, then a
    # square root) to 1e-2 eV; the masks agree exactly
    rng = np.random.default_rng(5)
    E = xanes.scan_energies()
    _, _, x = np.indices((16, 12, 12))
    clean = xanes.synthetic_spectra(E, 6547.0 + 4.0 * x / 11).astype(np.float32)
    noisy = (clean + 0.03 * rng.standard_normal(clean.shape)).astype(np.float32)
    cpu = xanes.edge_energy_map(noisy, E, device="cpu", denoise=denoise)
    gpu = xanes.edge_energy_map(noisy, E, device="gpu", denoise=denoise)
    np.testing.assert_array_equal(to_host(gpu["mask"]), cpu["mask"])
    np.testing.assert_allclose(to_host(gpu["edge_energy"]), cpu["edge_energy"], atol=2e-3, equal_nan=True)
    np.testing.assert_allclose(to_host(gpu["edge_energy_sigma"]), cpu["edge_energy_sigma"], atol=1e-2,
                               equal_nan=True)
