"""Do the registration modes improve the edge-energy maps? Each mode's map against the affine map and the truth.

Cases (``gpureg simulate``, Mn K-edge, ``--energies`` default: 29 energies, 3 eV across the edge; ``fine``:
34 energies, 1.5 eV across it; noise 1): ``per-particle``
on ``--relative-motion`` scans, ``deformable`` on ``--deformation 3`` scans,
one scan per seed. Each mode runs through the pipeline (``gpureg run
--per-particle`` / ``--deformable``, ``--device``, CPU by default) with the series smoothing of
``--windows`` (``RunOptions.series_window``). With a window > 0 the same run
also stores the affine-only alignment of its (identical, smoothed) global
affine, ``/xanes_global``: that is the affine map. Window 0 (each energy's own
fit, the behaviour before issue 27) runs the plain affine pipeline beside the
mode for its affine map.

Per row: median and 95th percentile of |edge energy - truth| (eV) over the
truth's particle voxels where both maps have a value (the same voxels for
both), the same per particle, the median edge energy of each particle (truth,
affine, mode), and at the contact between the particles (voxels within
``3 * size / 48`` voxels of both) the range of each map against the range of
the truth over both particles (how many outside it: all, in the particles, by
more than 1 eV, by more than twice the voxel's ``edge_energy_sigma``), and the voxels each map masks as having no single edge
(``edge_ambiguous``: at the contact, in the particles, in all). Per-particle rows also give each method's
transform error against the truth (``transform_errors``: translation and linear part, at the edge energies and
elsewhere, and how much the error changes from one edge energy to the next), and with ``--diagnose`` the maps
with every transform moved halfway to the truth (``toward_truth``), and for both modes the truth floor with the
true transforms jittered by 0.02 voxel per energy (``truth_jitter``: how finely the median can tell two
registrations apart). JSON under bench/results/.

    python bench/maps.py --modes per-particle --seeds 0 1 2
    python bench/maps.py --modes deformable --seeds 0 --windows 0 6
    python bench/maps.py --modes per-particle --seeds 0 1 2 3 4 --energies fine --diagnose
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py
import numpy as np
from common import save

MODES = {"per-particle": ({"relative_motion": True}, {"per_particle": True}),
         "deformable": ({"deformation": 3.0}, {"deformable": True})}


def map_errors(result, *, affine_result=None, size=48, arrays=None):
    """The comparison of one result file (module docstring); ``affine_result``: where the affine map is;
    ``arrays`` (dict): filled with the error volumes and the common voxels."""
    import hdf5plugin  # noqa: F401  (the result's compressed stacks)
    from scipy import ndimage

    flagged, sigma = {}, {}

    def read(h, group, name):
        if f"{group}/edge_ambiguous" in h:
            flagged[name] = h[f"{group}/edge_ambiguous"][...].astype(bool)
        if f"{group}/edge_energy_sigma" in h:
            sigma[name] = h[f"{group}/edge_energy_sigma"][...]
        return np.where(h[f"{group}/mask"][...], h[f"{group}/edge_energy"][...], np.nan)

    with h5py.File(result, "r") as h:
        truth, labels = h["truth/edge_energy"][...], h["truth/labels"][...]
        mode = read(h, "xanes", "mode")
        if affine_result is None:
            affine = read(h, "xanes_global", "affine")
    if affine_result is not None:
        with h5py.File(affine_result, "r") as h:
            affine = read(h, "xanes", "affine")
    err = {"affine": np.abs(affine - truth), "mode": np.abs(mode - truth)}
    common = (labels > 0) & np.isfinite(err["affine"]) & np.isfinite(err["mode"])
    if arrays is not None:
        arrays.update(err, common=common)
    out = {"voxels": int(common.sum())}
    for name, e in err.items():
        v = e[common]
        out[name] = {"median_ev": float(np.median(v)), "p95_ev": float(np.percentile(v, 95))}
    out["particles"] = {}
    for k in range(1, int(labels.max()) + 1):
        sel = common & (labels == k)
        if sel.any():
            out["particles"][k] = {"voxels": int(sel.sum()), "truth_median_ev": float(np.median(truth[sel])),
                                   **{f"{n}_median_ev": float(np.median(m[sel])) for n, m in (("affine", affine),
                                                                                               ("mode", mode))},
                                   **{f"{n}_abs_error_median_ev": float(np.median(e[sel])) for n, e in err.items()}}
    near = 3.0 * size / 48
    dist = [ndimage.distance_transform_edt(labels != k) for k in (1, 2)]
    contact = (dist[0] <= near) & (dist[1] <= near)
    lo, hi = float(np.nanmin(truth)), float(np.nanmax(truth))
    out["contact"] = {"radius_vox": near, "truth_range_ev": [lo, hi]}
    for name, m in (("affine", affine), ("mode", mode)):
        sel = contact & np.isfinite(m)
        v, outside = m[sel], sel & ((m < lo) | (m > hi))
        out["contact"][name] = {"voxels": int(v.size), "range_ev": [float(v.min()), float(v.max())] if v.size else None,
                                "outside_truth_range": int(outside.sum()),
                                "outside_in_particles": int((outside & (labels > 0)).sum()),
                                "outside_by_more_than_1_ev": int((sel & ((m < lo - 1) | (m > hi + 1))).sum())}
        if name in sigma:  # outside by more than twice the voxel's own 1-sigma error (edge_energy_sigma)
            s2 = 2 * sigma[name]
            out["contact"][name]["outside_by_more_than_2_sigma"] = int((sel & ((m < lo - s2) | (m > hi + s2))).sum())
        if name in flagged:  # masked as having no single edge (more than one 0.5 crossing)
            f = flagged[name]
            out["contact"][name]["flagged_ambiguous"] = int((f & contact).sum())
            out.setdefault("flagged_ambiguous", {})[name] = {"all": int(f.sum()), "in_particles": int((f & (labels > 0)).sum())}
    diff = mode - affine
    out["difference_mode_minus_affine_ev"] = {"median": float(np.nanmedian(diff[common])),
                                              "p95_abs": float(np.nanpercentile(np.abs(diff[common]), 95))}
    return out


def truth_floor(result, errors):
    """What perfect registration would give: the map of the reconstructions resampled with the TRUE transforms.

    Bench-side only (the truth never enters gpureg). Each reconstruction is resampled (trilinear, as the
    pipeline) with the truth's per-particle affines (``--relative-motion``: each particle's voxels from its own)
    or the truth's displacement field (``--deformation``), mapped as the pipeline maps (reference sample mask
    of the result), and compared on the voxels where all three maps have a value.
    """
    t = _truth_inputs(result)
    if t is None:
        return None
    rec, E, truth, labels, sample, pm, disp = t
    regions = _truth_regions(rec, labels, pm, disp)
    floor = _map_regions(regions, E, sample)
    e = np.abs(floor - truth)
    ok = errors["common"] & np.isfinite(e)
    out = {"voxels": int(ok.sum())}
    for name, err in (("floor", e), ("affine", errors["affine"]), ("mode", errors["mode"])):
        out[name] = {"median_ev": float(np.median(err[ok])), "p95_ev": float(np.percentile(err[ok], 95))}
    return out


def transform_errors(result, window_ev=10.0):
    """Per-particle runs: how far the mode's and the affine's (smoothed) transforms are from the truth's.

    Per particle and method, over the particle's voxels: the mean displacement error, split into its centroid's
    (translation) and the rest (the linear part: rotation, scale, shear), averaged over the **edge energies**
    (within ``window_ev`` of the truth's range of edge energies) and over the others; and the **inconsistency**
    at the edge energies, the RMS over voxels and edge energies of the error's deviation from its own mean over
    those energies. An error that is the same at every edge energy only moves the map (it costs at borders); one
    that changes from energy to energy distorts each voxel's spectrum where its edge energy is read
    (gpureg/register/consistency.py).
    """
    with h5py.File(result, "r") as h:
        if "truth/particle_matrices" not in h or "registration/particle_matrix" not in h:
            return None
        E, labels, truth = h["energy"][...], h["truth/labels"][...], h["truth/edge_energy"][...]
        true, found, glob = (h["truth/particle_matrices"][...], h["registration/particle_matrix"][...],
                             h["registration/matrix"][...])
    lo, hi = float(np.nanmin(truth)) - window_ev, float(np.nanmax(truth)) + window_ev
    edge = (E >= lo) & (E <= hi)
    out = {"edge_energies_ev": [lo, hi], "n_edge_energies": int(edge.sum())}
    for k in range(1, true.shape[1] + 1):
        pts = np.c_[np.argwhere(labels == k).astype(np.float64), np.ones(int((labels == k).sum()))]
        row = {}
        for name, mats in (("mode", found[:, k]), ("affine", glob)):
            d = np.einsum("vj,eij->evi", pts, (mats - true[:, k - 1])[:, :3, :])   # (energy, voxel, 3)
            trans = np.linalg.norm(d.mean(axis=1), axis=1)
            linear = np.sqrt(((d - d.mean(axis=1, keepdims=True)) ** 2).sum(axis=2).mean(axis=1))
            de = d[edge]
            row[name] = {"translation_edge_vox": round(float(trans[edge].mean()), 4),
                         "linear_edge_vox": round(float(linear[edge].mean()), 4),
                         "translation_other_vox": round(float(trans[~edge].mean()), 4),
                         "linear_other_vox": round(float(linear[~edge].mean()), 4),
                         "inconsistency_edge_vox": round(float(np.sqrt(((de - de.mean(axis=0)) ** 2).sum(axis=2)
                                                                       .mean())), 4)}
        out[str(k)] = row
    return out


def toward_truth(result, errors, alpha=0.5):
    """Per-particle runs: the map error (median / p95, eV) with each method's transforms moved ``alpha`` of the way
    to the truth's (``(1 - alpha) M + alpha T``, each particle from its own), for the mode and the affine: whether
    the map improves as the transforms approach the truth (bench-side only)."""
    import hdf5plugin  # noqa: F401

    with h5py.File(result, "r") as h:
        if "truth/particle_matrices" not in h or "registration/particle_matrix" not in h:
            return None
        rec, E = h["recon"][...], h["energy"][...]
        truth, labels = h["truth/edge_energy"][...], h["truth/labels"][...]
        sample = _sample(h)
        true, found, glob = (h["truth/particle_matrices"][...], h["registration/particle_matrix"][...],
                             h["registration/matrix"][...])
    out = {"alpha": alpha}
    methods = {"mode": found[:, 1:], "affine": np.repeat(glob[:, None], true.shape[1], axis=1)}
    maps = {name: _map_regions(_per_particle(rec, labels, (1 - alpha) * m + alpha * true), E, sample)
            for name, m in methods.items()}
    ok = errors["common"] & np.isfinite(maps["mode"]) & np.isfinite(maps["affine"])
    for name, m in maps.items():
        e = np.abs(m - truth)[ok]
        out[name] = {"median_ev": round(float(np.median(e)), 4), "p95_ev": round(float(np.percentile(e, 95)), 4)}
    return out


def truth_jitter(result, errors, amplitude=0.02, draws=4, seed=0):
    """How finely the median can tell registrations apart: the truth floor's map again with the TRUE transforms
    moved by a random translation of mean length ``amplitude`` voxel, drawn anew for every energy (and particle;
    the reference energy kept), ``draws`` times. Bench-side only. The spread of these medians is what transform
    errors far below the modes' own (0.04-0.08 voxel) do to the median; a mode-minus-affine difference inside it
    says nothing about which registration is better."""
    t = _truth_inputs(result)
    if t is None:
        return None
    rec, E, truth, labels, sample, pm, disp = t
    rng, ref = np.random.default_rng(seed), int(np.argmax(E))
    n_parts = 1 if pm is None else pm.shape[1]
    # a 3-vector of independent normals with sd s has mean length s * sqrt(8 / pi)
    scale = amplitude / np.sqrt(8.0 / np.pi)
    medians, p95s = [], []
    for _ in range(draws):
        d = rng.standard_normal((E.size, n_parts, 3)) * scale
        d[ref] = 0.0
        regions = _truth_regions(rec, labels, pm, disp, shift=d)
        e = np.abs(_map_regions(regions, E, sample) - truth)
        ok = errors["common"] & np.isfinite(e)
        medians.append(float(np.median(e[ok])))
        p95s.append(float(np.percentile(e[ok], 95)))
    return {"amplitude_vox": amplitude, "draws": draws, "median_ev": [round(v, 4) for v in medians],
            "p95_ev": [round(v, 4) for v in p95s], "median_sd_ev": round(float(np.std(medians, ddof=1)), 4),
            "p95_sd_ev": round(float(np.std(p95s, ddof=1)), 4)}


def _truth_inputs(result):
    """``(recon, energy, truth edge energy, truth labels, sample mask, truth per-particle matrices or None,
    truth displacement or None)`` of a simulated result, or None when it has neither kind of truth motion."""
    import hdf5plugin  # noqa: F401

    with h5py.File(result, "r") as h:
        pm = h["truth/particle_matrices"][...] if "truth/particle_matrices" in h else None
        disp = h["truth/displacement"][...] if "truth/displacement" in h else None
        if pm is None and disp is None:
            return None
        return (h["recon"][...], h["energy"][...], h["truth/edge_energy"][...], h["truth/labels"][...], _sample(h),
                pm, disp)


def _truth_regions(rec, labels, pm, disp, shift=None):
    """The reconstructions resampled with the true motion (:func:`_map_regions`'s regions): each particle with
    its own matrices, or the particles through the displacement field; ``shift`` (n_energy, n_parts, 3): a
    translation added to each energy's (and particle's) true motion."""
    from scipy import ndimage

    if pm is not None:
        if shift is not None:
            pm = pm.copy()
            pm[..., :3, 3] += shift
        return _per_particle(rec, labels, pm)
    grid = np.indices(labels.shape, dtype=np.float32)
    vols = []
    for i in range(rec.shape[0]):
        at = grid + disp[i]
        if shift is not None:
            at = at + shift[i, 0].astype(np.float32)[:, None, None, None]
        vols.append(ndimage.map_coordinates(rec[i], at, order=1))
    return [(labels > 0, np.stack(vols))]


def _sample(h):
    """A result's sample mask: its valid voxels and those masked only as ambiguous."""
    return h["xanes/mask"][...] | (h["xanes/edge_ambiguous"][...] if "xanes/edge_ambiguous" in h else False)


def _per_particle(rec, labels, matrices):
    """``[(voxels of particle k, the reconstructions resampled with its matrices (n, K, 4, 4)[:, k - 1])]``."""
    from gpureg.core.transform import apply_affine

    return [(labels == k + 1, np.stack([apply_affine(rec[i], matrices[i, k], device="cpu")
                                        for i in range(rec.shape[0])])) for k in range(matrices.shape[1])]


def _map_regions(regions, E, sample):
    """One edge-energy map from ``regions`` ``[(voxels, stack)]``: each region's voxels from its own stack's map
    (mapped as the pipeline maps, in the result's sample mask; NaN elsewhere)."""
    from gpureg.xanes.stack import edge_energy_map

    out = np.full(sample.shape, np.nan, np.float32)
    for sel, st in regions:
        m = edge_energy_map(st, E, device="cpu", mask=sample, sigma=False)
        out[sel] = np.where(m["mask"], m["edge_energy"], np.nan)[sel]
    return out


def run_case(mode, seed, size, window, folder, device="cpu", reuse=False, energies="default", diagnose=False):
    """Simulate (cached in ``folder``), run the mode (and the affine for window 0; ``reuse``: results already
    in ``folder`` are not run again), compare the maps."""
    from gpureg.pipeline import run
    from gpureg.synth import parse_energies
    from gpureg.synth.scan import simulate

    sim_kw, mode_kw = MODES[mode]
    grid = parse_energies(energies)
    tag = "" if energies == "default" else f"-{energies}"
    raw = Path(folder) / f"{mode}-{seed}-{size}{tag}.h5"
    if not raw.exists():
        simulate(raw, size=size, seed=seed, energies=grid, **sim_kw)
    row = {"registration_mode": mode, "seed": seed, "size": size, "series_window": window, "device": device,
           "energies": energies, "n_energies": int(grid.size), "fine_step_ev": float(np.diff(grid).min())}
    t0 = time.perf_counter()
    out = Path(folder) / f"{mode}-{seed}-{size}{tag}-w{window}.h5"
    affine = Path(folder) / f"affine-{mode}-{seed}-{size}{tag}.h5" if window == 0 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not (reuse and out.exists()):
            run(raw, out, overwrite=True, report=False, device=device, series_window=window, **mode_kw)
            row["mode_seconds"] = time.perf_counter() - t0
        if affine is not None and not (reuse and affine.exists()):
            t0 = time.perf_counter()
            run(raw, affine, overwrite=True, report=False, device=device, series_window=0)
            row["affine_seconds"] = time.perf_counter() - t0
    arrays = {}
    row.update(map_errors(out, affine_result=affine, size=size, arrays=arrays))
    row["truth_floor"] = truth_floor(out, arrays)
    if mode == "per-particle":
        row["transform_errors"] = transform_errors(out)
        if diagnose:
            row["toward_truth"] = toward_truth(out, arrays)
    if diagnose:
        row["truth_jitter"] = truth_jitter(out, arrays)
    row["mode_better"] = bool(row["mode"]["median_ev"] < row["affine"]["median_ev"]
                              and row["mode"]["p95_ev"] < row["affine"]["p95_ev"])
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--windows", nargs="+", type=int, default=[6])
    p.add_argument("--folder", default=None, help="Keep the simulated scans and results here (default: a temp dir).")
    p.add_argument("--name", default="maps")
    p.add_argument("--reuse", action="store_true", help="Compare the results already in --folder (no new runs).")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--diagnose", action="store_true",
                   help="Also the maps with every transform halfway to the truth's (per-particle: toward_truth) and "
                        "with the true transforms jittered by 0.02 voxel (truth_jitter).")
    p.add_argument("--energies", default="default",
                   help="Simulated grid: 'default' (29 energies, 3 eV across the edge) or 'fine' (34, 1.5 eV).")
    a = p.parse_args(argv)
    load0, rows = _load(), []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for mode in a.modes:
            for seed in a.seeds:
                for window in a.windows:
                    row = run_case(mode, seed, a.size, window, folder, a.device, a.reuse, a.energies, a.diagnose)
                    print(f"{mode} seed {seed} window {window}: affine {row['affine']['median_ev']:.3f}/"
                          f"{row['affine']['p95_ev']:.3f} eV, mode {row['mode']['median_ev']:.3f}/"
                          f"{row['mode']['p95_ev']:.3f} eV (median/p95), contact outside truth range: affine "
                          f"{row['contact']['affine']['outside_truth_range']}, mode "
                          f"{row['contact']['mode']['outside_truth_range']} (in particles "
                          f"{row['contact']['affine']['outside_in_particles']}, "
                          f"{row['contact']['mode']['outside_in_particles']}); flagged ambiguous "
                          f"{row.get('flagged_ambiguous')}; perfect registration (truth transforms) "
                          f"{_floor(row)}", flush=True)
                    rows.append(row)
    save(a.name, a.device, rows, extra={"threads": "default", "note": "edge-energy map error vs simulated truth",
                                        "load_average_start_end": [load0, _load()]})


def _floor(row):
    f = row.get("truth_floor")
    return "n/a" if f is None else f"{f['floor']['median_ev']:.3f}/{f['floor']['p95_ev']:.3f} eV"


def _load():
    """1/5/15-minute load averages (the machine is shared), or None."""
    path = Path("/proc/loadavg")
    return [float(v) for v in path.read_text().split()[:3]] if path.exists() else None


if __name__ == "__main__":
    main()
