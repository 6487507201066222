"""A synthetic TXM-XANES experiment at the Mn K-edge, with exact ground truth.

The sample is the two-particle phantom of :mod:`gpureg.synth.phantom` (same
geometry, same seed) given a Mn chemistry: particle 1 has a core-shell
gradient of oxidation state (edge energy about 6555.5 eV in the core falling
to 6549 eV at the surface), particle 2 a gentle linear gradient around
6551.5 eV. Every voxel's absorption follows the spectrum model of
:func:`gpureg.xanes.synthetic_spectra` with the Mn parameters of
:data:`gpureg.synth.spectra.MN_SPECTRUM`, scaled by the particle's density
and texture.

Per energy the sample moves (drift, small tilt, magnification, shear;
optionally one particle relative to the other); the motion is exact (the
phantom is a continuous function, sampled without interpolation), the
highest energy is the reference (identity). Parallel-beam projections over
-90..90 degrees come from ASTRA's forward projector (:func:`gpureg.recon.forward_project`),
with a non-uniform, energy-dependent beam, flat and dark frames, Poisson
photon noise plus Gaussian read noise, and optional dead/hot pixels.

Units: attenuation in 1 / voxel (what FBP of ``-log`` transmission returns),
energies in eV, angles in degrees. Truth matrices follow DESIGN.md:
``apply_affine(recon[e], truth["matrices"][e])`` is the unmoved sample at
energy ``e`` on the reference grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.energies import check_energies
from ..core.errors import InputError, ParameterError
from ..core.transform import grid_center, rotation_matrix
from ..xanes.model import synthetic_spectra
from .jitter import apply_jitter, projection_jitter
from .mixtures import COMPOUNDS, fraction_from_e0, mixture_edge_offsets, mixture_spectra, write_references
from .phantom import PARTICLES, particle_fields
from .spectra import MN_EDGE_RANGE, MN_SPECTRUM, edge_offsets, mn_energy_grid

__all__ = ["check_simulation", "default_motion", "deformation_truth", "sample_truth", "sample_volumes", "simulate"]

# Attenuation of unit density at unit normalised absorption, in 1 / (min(shape) voxels): a line
# integral of about 0.8 through particle 1 above the edge, 1.2 on the white line.
_MU_PER_VOXEL_AT_1 = 2.7
_DARK_COUNTS = 100.0  # detector offset (counts)
_READ_NOISE = 2.0  # Gaussian read noise (counts, at noise=1)
_SATURATION = 65535  # 16-bit detector


def sample_volumes(shape, energies, moving_from_reference=None, *, per_particle=None, seed: int = 0,
                   mixture: bool = False) -> np.ndarray:
    """Attenuation volumes of the (moved) synthetic sample at the given energies.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid ``(Z, Y, X)``.
    energies : (n_energy,) array_like
        eV.
    moving_from_reference : (4, 4) array_like, optional
        Motion of the sample (identity: the reference position).
    per_particle : dict {label: (4, 4)}, optional
        Motion of single particles (1, 2), replacing the sample motion for them.
    seed : int
        Particle geometry seed (as :func:`gpureg.two_particle_phantom`).
    mixture : bool
        Voxels are MnO/Mn2O3 mixtures (:mod:`gpureg.synth.mixtures`) instead
        of single spectra with a shifted edge.

    Returns
    -------
    (n_energy, Z, Y, X) ndarray of float32
        Attenuation in 1 / voxel; ``volume[e]`` is exactly what FBP of the
        noise-free projections at energy ``e`` approximates.
    """
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    f = particle_fields(shape, moving_from_reference, per_particle=per_particle, seed=seed)
    out = np.zeros((e.size, *f["occupancy"].shape[1:]), dtype=np.float32)
    mu_unit = _MU_PER_VOXEL_AT_1 / min(f["occupancy"].shape[1:])
    for k in range(f["occupancy"].shape[0]):
        weight = f["level"][k] * f["occupancy"][k] * f["texture"][k]
        sel = weight > 1e-7
        e0, wl = _composition(f["coords"][k][sel], k)
        spectra = (mixture_spectra(e, fraction_from_e0(e0)) if mixture
                   else synthetic_spectra(e, e0, white_line=wl, **MN_SPECTRUM))
        out[:, sel] += (mu_unit * weight[sel] * spectra).astype(np.float32)
    return out


def sample_truth(shape, *, seed: int = 0, mixture: bool = False) -> dict:
    """Ground-truth maps of the unmoved sample on the reference grid.

    With ``mixture`` (see :func:`sample_volumes`) also ``fractions`` (2, Z, Y, X)
    float32 (MnO, Mn2O3; NaN outside particles), ``e0`` is the
    fraction-weighted edge position and the edge/white-line energies are the
    mixtures'.

    Returns
    -------
    dict
        ``labels`` (Z, Y, X) uint8 (0 background, particles 1 and 2; occupancy > 0.5);
        ``e0`` (Z, Y, X) float32, model edge position (eV, NaN outside particles);
        ``edge_energy`` (Z, Y, X) float32, energy where the normalised spectrum
        first crosses 0.5 (eV, NaN outside; DESIGN.md's definition);
        ``white_line_energy`` (Z, Y, X) float32 (eV, NaN outside);
        ``density`` (Z, Y, X) float32, absorber amount (edge jump in 1 / voxel).
    """
    f = particle_fields(shape, None, seed=seed)
    grid = f["occupancy"].shape[1:]
    labels = np.zeros(grid, dtype=np.uint8)
    e0_map = np.full(grid, np.nan, dtype=np.float32)
    half_map = np.full(grid, np.nan, dtype=np.float32)
    peak_map = np.full(grid, np.nan, dtype=np.float32)
    density = np.zeros(grid, dtype=np.float32)
    fractions = np.full((2, *grid), np.nan, dtype=np.float32) if mixture else None
    mu_unit = _MU_PER_VOXEL_AT_1 / min(grid)
    for k in range(f["occupancy"].shape[0]):
        inside = f["occupancy"][k] > 0.5
        labels[inside] = k + 1
        e0, wl = _composition(f["coords"][k][inside], k)
        if mixture:
            frac = fraction_from_e0(e0)
            fractions[0][inside], fractions[1][inside] = 1.0 - frac, frac
            half_map[inside], peak_map[inside] = mixture_edge_offsets(frac)
            lo, hi = (c["e0"] for c in COMPOUNDS.values())
            e0_map[inside] = lo + frac * (hi - lo)
        else:
            half, peak = edge_offsets(wl)
            e0_map[inside] = e0
            half_map[inside] = e0 + half
            peak_map[inside] = e0 + peak
        density += (mu_unit * f["level"][k] * f["occupancy"][k] * f["texture"][k]).astype(np.float32)
    out = {"labels": labels, "e0": e0_map, "edge_energy": half_map, "white_line_energy": peak_map,
           "density": density}
    if mixture:
        out["fractions"] = fractions
    return out


def default_motion(energies, shape, *, seed: int = 0, reference: int | None = None,
                   amplitude: float = 1.0) -> np.ndarray:
    """Smooth per-energy sample motion with jitter, identity at the reference energy.

    Drift up to 5% of the grid (about 2.4 voxels at 48^3) plus 0.3-voxel jitter,
    a tilt of up to 2 degrees about a random axis, isotropic magnification
    within 0.985-1.015 (the zone plate refocusing with energy) and shear up to
    0.015; each grows with the distance in energy from the reference, so the
    sample stays well inside the field of view.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    shape : tuple of 3 int
        Grid ``(Z, Y, X)``.
    seed : int
        Motion seed.
    reference : int, optional
        Index of the reference energy (default: the highest energy).
    amplitude : float
        Scales every component (0: no motion).

    Returns
    -------
    (n_energy, 4, 4) ndarray of float64
        ``moving_from_reference`` per energy, about the grid centre.
    """
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    ref = int(np.argmax(e)) if reference is None else int(reference)
    if not 0 <= ref < e.size:
        raise ParameterError(f"reference index {reference} out of range for {e.size} energies")
    n = min(int(s) for s in shape)
    c = grid_center(shape)
    rng = np.random.default_rng([int(seed), 7101])
    span = max(float(np.ptp(e)), 1e-9)
    t = np.abs(e - e[ref]) / span  # 0 at the reference, 1 at the far end
    drift = rng.normal(size=3)
    drift *= 0.05 * n / np.linalg.norm(drift)
    wobble = rng.normal(size=3) * 0.01 * n
    axis = rng.normal(size=3)
    tilt = rng.uniform(1.0, 2.0) * rng.choice([-1.0, 1.0])
    mag = rng.uniform(0.008, 0.015) * rng.choice([-1.0, 1.0])
    shear = rng.uniform(-0.015, 0.015, size=3)
    out = np.empty((e.size, 4, 4))
    for i, ti in enumerate(t):
        if i == ref:
            out[i] = np.eye(4)
            continue
        s = amplitude * (ti * drift + np.sin(np.pi * ti) * wobble + rng.normal(scale=0.3, size=3))
        rot = rotation_matrix(amplitude * ti * tilt, axis)[:3, :3]
        h = np.eye(3)
        h[0, 1], h[0, 2], h[1, 2] = amplitude * ti * shear
        a = rot @ ((1.0 + amplitude * ti * mag) * h)
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = c - a @ c + s
        out[i] = m
    return out


def simulate(path, *, size: int = 48, energies=None, n_angles: int = 181, noise: float = 1.0,
             salt_pepper: float = 0.0, relative_motion: bool = False, seed: int = 0, motion="default",
             photons: float = 1e4, n_flat: int = 5, n_dark: int = 5, store_attenuation: bool | None = None,
             deformation: float = 0.0, progress=None, mixture: bool = False, jitter: float = 0.0) -> Path:
    """Simulate a TXM-XANES spectro-tomography scan and write it as Data Exchange HDF5.

    Parameters
    ----------
    path : str or Path
        Output ``.h5`` (written atomically).
    size : int
        Grid ``size^3``; detector ``size x size``.
    energies : array_like, optional
        eV; default :func:`mn_energy_grid` (29 energies, 6485-6710 eV).
    n_angles : int
        Projection angles, evenly over -90..90 degrees inclusive.
    noise : float
        Noise scale: 1 is Poisson statistics of ``photons`` per pixel in the
        flat plus 2 counts of Gaussian read noise; 0 is noise-free (counts are
        still rounded to integers); ``k`` scales the noise standard deviation by ``k``.
    salt_pepper : float
        Fraction of projection pixels replaced by dead (0) or saturated
        (65535) values, half each.
    relative_motion : bool
        Particle 2 also turns (up to about 4 degrees) and shifts (up to 3 voxels at
        64^3, scaled with the size) relative to particle 1; ``/truth/matrices`` then follow particle 1 and
        ``/truth/particle_matrices`` hold both.
    seed : int
        Everything (geometry, motion, noise) is deterministic per seed.
    motion : "default", "none" or (n_energy, 4, 4) array_like
        Sample motion (``moving_from_reference``); see :func:`default_motion`.
    photons : float
        Mean flat-field counts per pixel at the first energy.
    n_flat, n_dark : int
        Flat frames per energy and dark frames.
    store_attenuation : bool, optional
        Store the unmoved attenuation volume of every energy in
        ``/truth/attenuation`` (default: when ``size <= 96``).
    deformation : float
        Also deform the sample smoothly (:class:`gpureg.synth.deform.SmoothWarp`,
        the same seeded modes at every energy): at most this many voxels at
        64^3 (scaled with the size) at the energy farthest from the reference,
        growing linearly with the distance in energy, on top of ``motion``.
        ``/truth/deformation_amplitude`` (voxels per energy) and
        ``/truth/deformation_seed`` then define the exact warps
        (:func:`deformation_truth`); with ``size <= 64`` the dense truth field
        ``/truth/displacement`` ``(n_energy, 3, Z, Y, X)`` (float32, reference
        voxel ``p`` lies at ``p + displacement[e][:, p]`` at energy ``e``) is stored too.
        Not combined with ``relative_motion``.
    progress : callable, optional
        ``progress(i, n_energy, energy_ev)`` after each energy.
    mixture : bool
        Voxels are mixtures of two reference compounds (MnO, Mn2O3) with known
        fractions (``/truth/fractions``), and the references are written as
        text files ``<stem>_references/MnO.txt`` and ``Mn2O3.txt`` beside
        ``path`` (listed in the ``references`` attribute), for
        linear-combination fitting against truth. Default off (the output is
        then unchanged).
    jitter : float
        Per-projection shifts, RMS pixels per component (rows, columns), random
        per energy and angle, only their observable part
        (:func:`gpureg.synth.jitter.projection_jitter`); stored as
        ``/truth/projection_shifts`` ``(n_energy, n_angles, 2)``. Default 0 (off).

    Returns
    -------
    Path
        ``path``; ``/exchange/data`` uint16 ``(n_energy, n_angles, size, size)``,
        ``data_white`` ``(n_energy, n_flat, size, size)``, ``data_dark``,
        ``theta``, ``energy``, and ``/truth``: ``matrices``, ``edge_energy``,
        ``e0``, ``white_line_energy``, ``labels``, ``density``,
        ``reference_index``, optionally ``attenuation`` and ``particle_matrices``.
    """
    from ..io.dataexchange import write_dataexchange
    from ..recon.project import forward_project

    size = int(size)
    e = check_simulation(size=size, energies=energies, n_angles=n_angles, noise=noise, photons=photons,
                         salt_pepper=salt_pepper, n_flat=n_flat, n_dark=n_dark, deformation=deformation,
                         relative_motion=relative_motion)
    _check_resources(path, size, int(n_angles), e.size, int(n_flat), int(n_dark))
    shape = (size, size, size)
    ref = int(np.argmax(e))
    matrices = _motion(motion, e, shape, seed)
    particle = _relative(matrices, e, shape, seed, ref) if relative_motion else None
    shifts = projection_jitter(e.size, np.linspace(-90.0, 90.0, int(n_angles)), float(jitter), seed=seed)
    amplitudes = float(deformation) * size / 64 * np.abs(e - e[ref]) / max(float(np.ptp(e)), 1e-9)
    warps = [_warp(shape, a, m, seed) for a, m in zip(amplitudes, matrices)] if deformation > 0 else None
    theta = np.linspace(-90.0, 90.0, int(n_angles))
    ss = np.random.SeedSequence([int(seed), 20240])
    rng_flat, rng_data = (np.random.default_rng(s) for s in ss.spawn(2))
    beam = _beam_profile(size) * photons  # (ny, nx) counts at flux 1
    flux = (1.0 - 0.08 * (e - e.min()) / max(np.ptp(e), 1e-9)) * (1.0 + 0.01 * rng_flat.normal(size=e.size))
    brightest = float(beam.max() * flux.max()) * (1 + 5 / np.sqrt(photons)) + _DARK_COUNTS
    if brightest > _SATURATION:
        raise ParameterError(f"photons={photons:g} saturates the simulated 16-bit detector (open beam up to "
                         f"{brightest:.0f} > {_SATURATION} counts); use photons <= {0.8 * photons * _SATURATION / brightest:.0f}")
    dark = _counts(rng_flat, np.full((n_dark, size, size), 0.0), noise)
    white = np.stack([_counts(rng_flat, np.broadcast_to(beam * flux[i], (n_flat, size, size)), noise)
                      for i in range(e.size)])

    mix = {"mixture": True} if mixture else {}

    def projections():
        for i, energy in enumerate(e):
            per = None if particle is None else {1: particle[i, 0], 2: particle[i, 1]}
            motion_i = matrices[i] if warps is None else warps[i]
            vol = sample_volumes(shape, [energy], motion_i, per_particle=per, seed=seed, **mix)[0]
            line = forward_project(vol, theta, projector="line")  # (n_angles, size, size)
            if jitter > 0:
                line = apply_jitter(line, shifts[i])
            counts = _counts(rng_data, beam * flux[i] * np.exp(-line.astype(np.float64)), noise)
            if salt_pepper > 0:
                hit = rng_data.random(counts.shape) < salt_pepper
                counts[hit] = np.where(rng_data.random(int(hit.sum())) < 0.5, 0, _SATURATION).astype(np.uint16)
            yield counts
            if progress is not None:
                progress(i, e.size, float(energy))

    truth = sample_truth(shape, seed=seed, **mix)
    truth["matrices"] = matrices
    truth["reference_index"] = np.int64(ref)
    truth["convention"] = ("matrices: moving_from_reference per energy, voxel indices (z, y, x); "
                           "apply_affine(recon[e], matrices[e]) ~ unmoved sample at energy e; "
                           "attenuation in 1/voxel; energies in eV; edge_energy: first 0.5 crossing of the "
                           "normalised spectrum")
    if particle is not None:
        truth["particle_matrices"] = particle
    if jitter > 0:
        truth["projection_shifts"] = shifts
    if warps is not None:
        truth["deformation_amplitude"] = amplitudes
        truth["deformation_seed"] = np.int64(seed)
        if size <= 64:
            truth["displacement"] = np.stack([w.displacement_field() for w in warps])
    if store_attenuation if store_attenuation is not None else size <= 96:
        truth["attenuation"] = sample_volumes(shape, e, None, seed=seed, **mix)
    params = {"size": size, "n_angles": int(n_angles), "noise": float(noise), "salt_pepper": float(salt_pepper),
              "relative_motion": bool(relative_motion), "seed": int(seed),
              "motion": motion if isinstance(motion, str) else "custom", "photons": float(photons),
              "n_flat": int(n_flat), "n_dark": int(n_dark)}
    if deformation > 0:
        params["deformation"] = float(deformation)
    if jitter > 0:
        params["jitter"] = float(jitter)
    attrs = {"synthetic": "gpureg.synth.simulate: Mn K-edge TXM-XANES, two particles",
             "parameters": json.dumps(params), "voxel_size_nm": 3200.0 / size}
    if mixture:
        params["mixture"] = True
        attrs["parameters"] = json.dumps(params)
        refs = write_references(Path(path).with_name(Path(path).stem + "_references"))
        attrs["references"] = json.dumps([str(p) for p in refs])
        truth["reference_names"] = ",".join(COMPOUNDS)
    return write_dataexchange(path, data=projections(), data_white=white, data_dark=dark, theta=theta, energy=e,
                              truth=truth, attrs=attrs)


def check_simulation(*, size: int = 48, energies=None, n_angles: int = 181, noise: float = 1.0, photons: float = 1e4,
                     salt_pepper: float = 0.0, n_flat: int = 5, n_dark: int = 5, deformation: float = 0.0,
                     relative_motion: bool = False) -> np.ndarray:
    """Refuse arguments :func:`simulate` cannot use (one line each), before any work; returns the energies (eV)."""
    if int(size) < 16:
        raise ParameterError(f"size must be at least 16, got {size}")
    if int(n_angles) < 2:
        raise ParameterError(f"n_angles must be at least 2, got {n_angles}")
    if noise < 0 or not np.isfinite(noise):
        raise ParameterError(f"noise must be >= 0, got {noise}")
    if not 0.0 <= salt_pepper < 0.5:
        raise ParameterError(f"salt_pepper must be in [0, 0.5), got {salt_pepper}")
    if photons < 10 or n_flat < 1 or n_dark < 1:
        raise ParameterError(f"need photons >= 10, n_flat >= 1, n_dark >= 1; got {photons}, {n_flat}, {n_dark}")
    e = mn_energy_grid() if energies is None else check_energies(np.reshape(energies, -1), increasing=True)
    if not np.isfinite(deformation) or deformation < 0:
        raise ParameterError(f"deformation must be >= 0 voxels, got {deformation}")
    if deformation > 0 and relative_motion:
        raise ParameterError("deformation and relative_motion cannot be combined")
    return e


def _check_resources(path, size, n_angles, n_energy, n_flat, n_dark):
    """Refuse a simulation that cannot fit, before any work (one line with the numbers)."""
    from ..core.resources import check_fits
    from ..io.files import check_file_target

    check_file_target(path)
    vol, frame = float(size) ** 3, float(size) ** 2
    # Host: ~8 float32 volumes (sample, labels, density, truth maps, one energy's attenuation) + projections
    # of one energy in float64 (line integrals, counts) + every flat frame.
    memory = 4 * 8 * vol + 8 * 3 * n_angles * frame + 2 * n_energy * n_flat * frame
    # Disk: uint16 projections and frames of every energy + the truth volumes.
    disk = 2 * (n_energy * (n_angles + n_flat) + n_dark) * frame + 4 * 6 * vol
    check_fits(f"a simulated scan of size {size} ({n_energy} energies x {n_angles} angles)", memory=memory, disk=disk,
               folder=Path(path).parent if str(Path(path).parent) else Path("."))


def deformation_truth(truth, index):
    """The exact warp of energy ``index`` of a simulated scan with ``deformation``.

    Parameters
    ----------
    truth : dict
        The ``/truth`` group (``open_input(path).truth`` or the dict written).
    index : int
        Energy index.

    Returns
    -------
    SmoothWarp
        ``moving_from_reference(points)`` gives the true positions in the moving volume.
    """
    if "deformation_amplitude" not in truth:
        raise InputError("this scan was simulated without deformation (no /truth/deformation_amplitude)")
    matrices = np.asarray(truth["matrices"])
    size = int(np.asarray(truth["labels"]).shape[0])
    return _warp((size,) * 3, float(np.asarray(truth["deformation_amplitude"])[index]), matrices[index],
                 int(np.asarray(truth["deformation_seed"])))


def _warp(shape, amplitude, matrix, seed):
    from .deform import SmoothWarp

    return SmoothWarp(shape, amplitude, matrix=matrix, seed=seed)


def _composition(coords, k):
    """Edge position (eV) and white-line height from reference-frame particle coordinates (..., 3)."""
    lo, hi = MN_EDGE_RANGE
    if k == 0:  # core-shell: oxidised core, reduced surface
        r = np.sqrt((coords.astype(np.float64) ** 2).sum(axis=-1))
        s = np.clip((r - 0.35) / 0.4, 0.0, 1.0)
        s = s * s * (3.0 - 2.0 * s)
        e0 = hi - (hi - lo) * s
    else:  # gentle gradient across the particle
        direction = np.array([0.3, -0.5, 0.81])
        g = np.clip(coords.astype(np.float64) @ (direction / np.linalg.norm(direction)), -1.2, 1.2) / 1.2
        e0 = 6551.5 + 1.0 * g
    wl = 0.35 + 0.06 * (e0 - lo)
    return e0, wl


def _motion(motion, e, shape, seed):
    if isinstance(motion, str):
        if motion == "default":
            return default_motion(e, shape, seed=seed)
        if motion == "none":
            return np.repeat(np.eye(4)[None], e.size, axis=0)
        raise ParameterError(f"motion must be 'default', 'none' or an (n_energy, 4, 4) array, got {motion!r}")
    m = np.asarray(motion, dtype=np.float64)
    if m.shape != (e.size, 4, 4):
        raise ParameterError(f"motion must have shape ({e.size}, 4, 4), got {m.shape}")
    return m


def _relative(base, e, shape, seed, ref):
    """Per-energy matrices of both particles: particle 1 follows the sample, particle 2 also turns and shifts."""
    rng = np.random.default_rng([int(seed), 7102])
    half = min(shape) / 2.0
    c2 = grid_center(shape) + np.asarray(PARTICLES[1]["center"]) * half
    # Up to about 4 degrees and 3 voxels (at 64^3) far from the reference: enough that one
    # global affine cannot align both particles (the reference study's case).
    angle = rng.uniform(3.5, 4.5)
    axis = rng.normal(size=3)
    shift = rng.normal(size=3)
    shift *= 3.0 * min(shape) / 64 / np.linalg.norm(shift)
    t = np.abs(e - e[ref]) / max(float(np.ptp(e)), 1e-9)
    out = np.empty((e.size, 2, 4, 4))
    for i, ti in enumerate(t):
        rel = rotation_matrix(ti * angle, axis, center=c2)
        rel[:3, 3] += ti * shift
        out[i, 0] = base[i]
        out[i, 1] = base[i] @ rel
    return out


def _beam_profile(n):
    """Smooth non-uniform illumination (about +-8%), mean 1."""
    y, x = np.mgrid[0:n, 0:n] / max(n - 1, 1)
    prof = 1.0 + 0.06 * np.exp(-((x - 0.4) ** 2 + (y - 0.55) ** 2) / 0.18) - 0.04 * x + 0.02 * np.sin(3.0 * y)
    return prof / prof.mean()


def _counts(rng, expected, noise):
    """Detector counts: dark level + photon counts (Poisson, scaled by ``noise``) + read noise, as uint16."""
    expected = np.asarray(expected, dtype=np.float64)
    if noise > 0:
        k = noise * noise
        signal = rng.poisson(expected / k) * k
        signal = signal + rng.normal(0.0, _READ_NOISE * noise, size=expected.shape)
    else:
        signal = expected
    return np.clip(np.rint(signal + _DARK_COUNTS), 0, _SATURATION).astype(np.uint16)
