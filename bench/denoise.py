"""Does ``--denoise-spectra auto`` make simulated edge-energy maps better, and does the sigma map cover the error?

Issue 26: on simulated experiments with Poisson noise, spectral denoising (truncated PCA,
:mod:`gpureg.xanes.denoise`) must lower the edge-energy RMS against the truth by >= 30 % without
moving the per-particle medians by more than 0.05 eV, and ``/xanes/edge_energy_sigma`` must cover the
true error at its nominal rate (68 % within 1 sigma).

Per seed and dose (``photons``: mean flat-field counts per detector pixel and projection), one
``gpureg simulate`` scan (Mn K-edge, 29 energies, default motion) and the same scan without noise
(``noise=0``) run through the pipeline (``gpureg run``, CPU, affine registration); the edge map is then
computed from the stored aligned stack with ``denoise="auto"`` and ``None`` (exactly the pipeline's
``--denoise-spectra auto|off`` step, :func:`gpureg.xanes.stack.edge_energy_map`). Scored on the truth's
particle voxels (``labels > 0``) and on the same eroded by 2 voxels (interior: no partial volume), per row:
RMS and median |error| (eV), per-particle median shift of the map against the truth and between the two
maps, the share of voxels with |error| <= sigma and <= 2 sigma against the truth (total error; nominal 0.68
and 0.95) with the median sigma, the noise term of sigma alone (``model=False``) against the truth and against
the noise-free scan's map (noise error only), the per-voxel noise over the edge jump, and the error of the noise-free
scan (the floor that reconstruction, registration and resampling leave, which no spectral filter removes:
0.27 eV at 48^3; the exact attenuation volumes map at 0.13 eV, and blurred by a Gaussian of 0.7 voxel, about
what FBP and the trilinear resampling do, at 0.27 eV: it is spatial resolution, neighbouring spectra mixed).

Noise bias of the medians (``particle_noise_bias_ev``): the noise-free scan's reconstructions resampled with
the noisy run's own transforms are the noisy stack without its noise (same alignment); per particle, the median
of (map - truth) of the noisy stack minus this stack's, without and with denoising, for the real noise and for
white noise of the same per-energy level (2 draws). A median move of issue 26 that takes the map towards this
reference removes the noise's own bias rather than adding one.

Dose: ``gpureg simulate``'s particles absorb about 0.84 / um per unit edge jump (0.056 per 67 nm voxel); a
Mn oxide has ~0.14 / um, so a real scan with 30 nm voxels has a jump of ~0.004 per voxel. The per-voxel noise
of FBP (per voxel units) goes as ``1 / sqrt(angles x counts)``: with 721 angles and 10^4 counts per pixel
a real scan's per-voxel SNR equals this simulation's (181 angles) at ~230 photons. 1000 photons (noise 6 %
of the jump per voxel) is therefore a generous dose for a TXM-XANES scan; the default 10^4 (2 %) is not
noise-limited.

    python bench/denoise.py --photons 10000 1000 --seeds 0 1 [--energies fine] [--name denoise_dose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py
import numpy as np
from common import save
from scipy import ndimage as ndi

import gpureg
from gpureg import synth
from gpureg.pipeline import run
from gpureg.xanes.denoise import denoise_spectra
from gpureg.xanes.stack import edge_energy_map


def _simulated_run(tmp, seed, photons, noise, size, n_angles, energies=None):
    raw, out = Path(tmp) / f"raw{seed}_{photons}_{noise}.h5", Path(tmp) / f"out{seed}_{photons}_{noise}.h5"
    gpureg.simulate(raw, size=size, n_angles=n_angles, seed=seed, photons=photons, noise=noise, energies=energies)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run(raw, out, device="cpu", report=False)
    with h5py.File(out) as h5:
        d = {k: h5[k][...] for k in ("aligned", "energy", "truth/edge_energy", "truth/labels", "recon",
                                     "registration/matrix")}
    raw.unlink()
    out.unlink()
    return d


def _maps(d, e0=None):
    out = {}
    for den in (None, "auto"):
        info = {}
        m = edge_energy_map(d["aligned"], d["energy"], device="cpu", denoise=den, info=info, e0=e0)
        m["k"], m["e0"], m["scale"] = info["basis"].k, info["e0"], info["basis"].scale
        m["sigma_noise"] = edge_energy_map(d["aligned"], d["energy"], device="cpu", denoise=den, e0=e0,
                                           model=False)["edge_energy_sigma"]
        out[den] = m
    # the plain projection on the components (no residual restored), for its particle medians and RMS
    out["projection"] = edge_energy_map(d["aligned"], d["energy"], device="cpu", denoise="auto", e0=out[None]["e0"],
                                        sigma=False, residual_smoothing=0.0)
    return out


def _noise_matched_shift(den, off, clean, rng):
    """Median of ``den`` (errors, per voxel) with Gaussian noise added back to the spread of ``off`` (both against
    the noise-free scan's errors ``clean``, robust sd), minus the median of ``off``: the part of the median's move
    that is not the narrower noise (a median of a skewed error distribution depends on the noise width)."""
    def rsd(x):
        return 1.4826 * float(np.median(np.abs(x - np.median(x))))
    extra = np.sqrt(max(rsd(off - clean) ** 2 - rsd(den - clean) ** 2, 0.0))
    return float(np.mean([np.median(den + extra * rng.standard_normal(den.size)) for _ in range(100)])
                 - np.median(off))


def _noise_bias(d, d0, maps, realisations=2, seed=0):
    """How far noise alone moves each particle's median edge energy, with and without denoising.

    The noise-free scan's reconstructions resampled with the noisy run's own transforms (the same alignment,
    so the difference of the two stacks is the noise alone) are the reference: per particle, the median of
    (map - truth) of the noisy stack (``maps``, :func:`_maps` of ``d``) minus that of this noise-free stack,
    for the map without denoising and the denoised one; then the same with white Gaussian noise of the
    measured per-energy level added to the noise-free stack (``realisations`` draws, mean), which shows whether
    a move is this noise's or any noise's.
    """
    from gpureg.core.transform import apply_affine

    te, labels, e0 = d["truth/edge_energy"], d["truth/labels"], maps[None]["e0"]
    mats = d["registration/matrix"]
    same = np.stack([apply_affine(d0["recon"][i], mats[i], device="cpu") for i in range(mats.shape[0])])
    check = float(np.nanmax(np.abs(apply_affine(d["recon"][0], mats[0], device="cpu") - d["aligned"][0])))
    sd = np.array([np.nanstd(v[labels > 0]) for v in d["aligned"] - same])

    def edge_maps(stack, dens=(None, "auto")):
        return {den: edge_energy_map(stack, d["energy"], device="cpu", denoise=den, e0=e0, sigma=False)["edge_energy"]
                for den in dens}

    ref = edge_maps(same, (None,))[None]
    rng = np.random.default_rng(seed)
    draws = [{den: maps[den]["edge_energy"] for den in (None, "auto")}]
    draws += [edge_maps((same + sd[:, None, None, None] * rng.standard_normal(same.shape)).astype(np.float32))
              for _ in range(int(realisations))]
    sel = (labels > 0) & np.isfinite(te) & np.isfinite(ref)
    for dr in draws:
        for m in dr.values():
            sel &= np.isfinite(m)

    def bias(m):
        return [float(np.median((m - te)[sel & (labels == k)]) - np.median((ref - te)[sel & (labels == k)]))
                for k in (1, 2)]

    def r4(v):
        return [round(float(x), 4) for x in v]

    real = {key: bias(draws[0][den]) for key, den in (("off", None), ("auto", "auto"))}
    white = {key: np.mean([bias(dr[den]) for dr in draws[1:]], axis=0) for key, den in (("off", None), ("auto", "auto"))}
    return {"same_alignment_check_max_abs": round(check, 6), "noise_sd_over_particles": r4([sd.mean()]),
            "real_noise": {key: r4(v) for key, v in real.items()},
            "white_noise": {key: r4(v) for key, v in white.items()},
            "moves": {"real": r4(np.subtract(real["auto"], real["off"])),
                      "white": r4(np.subtract(white["auto"], white["off"]))}}


def _score(maps, clean, d):
    te, labels = d["truth/edge_energy"], d["truth/labels"]
    rows = {}
    for region, sel in (("particles", labels > 0), ("interior (eroded 2 voxels)",
                                                    ndi.binary_erosion(labels > 0, iterations=2))):
        both = (sel & np.isfinite(te) & np.isfinite(maps[None]["edge_energy"]) & np.isfinite(maps["auto"]["edge_energy"])
                & np.isfinite(maps["projection"]["edge_energy"]))
        row = {"voxels": int(both.sum())}
        for den, key in ((None, "off"), ("auto", "auto")):
            e, s, sn = maps[den]["edge_energy"], maps[den]["edge_energy_sigma"], maps[den]["sigma_noise"]
            err = (e - te)[both]
            c = clean[den]["edge_energy"]
            ok = both & np.isfinite(c)
            row[key] = {"rms_ev": round(float(np.sqrt(np.mean(err ** 2))), 4),
                        "median_abs_ev": round(float(np.median(np.abs(err))), 4),
                        "coverage_1sigma": round(float(np.mean(np.abs(err) <= s[both])), 3),
                        "coverage_2sigma": round(float(np.mean(np.abs(err) <= 2 * s[both])), 3),
                        "median_sigma_ev": round(float(np.median(s[both])), 4),
                        # the noise term alone (model=False) against the total error and the noise-only error
                        "noise_sigma_coverage_1sigma": round(float(np.mean(np.abs(err) <= sn[both])), 3),
                        "noise_only_rms_ev": round(float(np.sqrt(np.mean((e - c)[ok] ** 2))), 4),
                        "noise_only_coverage_1sigma": round(float(np.mean(np.abs(e - c)[ok] <= sn[ok])), 3),
                        "noise_free_scan_rms_ev": round(float(np.sqrt(np.mean((c - te)[ok] ** 2))), 4)}
        row["rms_reduction"] = round(1 - row["auto"]["rms_ev"] / row["off"]["rms_ev"], 3)
        rms_projection = float(np.sqrt(np.mean((maps["projection"]["edge_energy"] - te)[both] ** 2)))
        row["projection_rms_ev"] = round(rms_projection, 4)
        row["projection_rms_reduction"] = round(1 - rms_projection / row["off"]["rms_ev"], 3)
        # per-particle bias (median of map - truth) with denoising against the map without it (issue 26's move),
        # and each against the noise-free scan's map
        errs = {key: {k: (m - te)[both & (labels == k)] for k in (1, 2)}
                for key, m in (("off", maps[None]["edge_energy"]), ("auto", maps["auto"]["edge_energy"]),
                               ("projection", maps["projection"]["edge_energy"]),
                               ("clean", np.where(np.isfinite(clean[None]["edge_energy"]), clean[None]["edge_energy"],
                                                  maps[None]["edge_energy"])))}
        bias = {key: [float(np.median(v[k])) for k in (1, 2)] for key, v in errs.items()}
        row["particle_bias_shift_ev"] = [round(a - b, 4) for a, b in zip(bias["auto"], bias["off"])]
        row["projection_particle_bias_shift_ev"] = [round(a - b, 4) for a, b in zip(bias["projection"], bias["off"])]
        row["particle_bias_vs_noise_free_ev"] = {key: [round(a - b, 4) for a, b in zip(bias[key], bias["clean"])]
                                                 for key in ("off", "auto", "projection")}
        # the move once the noise that denoising removed is added back (see _noise_matched_shift)
        rng = np.random.default_rng(0)
        row["particle_bias_shift_noise_matched_ev"] = {
            key: [round(_noise_matched_shift(errs[key][k], errs["off"][k], errs["clean"][k], rng), 4) for k in (1, 2)]
            for key in ("auto", "projection")}
        row["particle_median_shift_ev"] = [round(float(np.median(maps["auto"]["edge_energy"][both & (labels == k)])
                                                       - np.median(maps[None]["edge_energy"][both & (labels == k)])), 4)
                                           for k in (1, 2)]
        rows[region] = row
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--angles", type=int, default=181)
    ap.add_argument("--photons", type=float, nargs="+", default=[1e4, 1e3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--energies", default=None, help="energy grid (gpureg simulate --energies: e.g. fine)")
    ap.add_argument("--name", default=None, help="JSON name (default: denoise, or denoise_<energies>)")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            grid = None if args.energies is None else synth.parse_energies(args.energies)
            d0 = _simulated_run(tmp, seed, 1e4, 0.0, args.size, args.angles, grid)
            for photons in args.photons:
                d = _simulated_run(tmp, seed, photons, 1.0, args.size, args.angles, grid)
                maps = _maps(d)
                clean = _maps(d0, e0=maps[None]["e0"])
                jump = maps[None]["edge_jump"][d["truth/labels"] > 0]
                # per-voxel noise level (residual of the raw spectra to the spectral basis) over the edge jump
                _, noise, _ = denoise_spectra(d["aligned"], mask=d["truth/labels"] > 0)
                ratio = float(np.nanmedian(noise[d["truth/labels"] > 0]) / np.nanmedian(jump))
                row = {"case": f"simulate {args.size}^3 x {d['energy'].size} energies, {args.angles} angles",
                       "energies": args.energies or "default",
                       "seed": seed, "photons": photons, "components_auto": maps["auto"]["k"],
                       "noise_over_jump_per_voxel": round(ratio, 4),
                       "noise_profile_sd": [round(float(v), 3) for v in maps["auto"]["scale"]],
                       **_score(maps, clean, d),
                       # per particle, median shift against the same stack without noise (same alignment)
                       "particle_noise_bias_ev": _noise_bias(d, d0, maps, seed=seed)}
                results.append(row)
                print(row, flush=True)
    name = args.name or ("denoise" if args.energies is None else f"denoise_{args.energies}")
    save(name, "cpu", results, extra={"conditions": "2-core CPU; pipeline defaults (affine, --ramp 3)"})


if __name__ == "__main__":
    main()
