"""The maps stage of a run: edge-energy maps and chemistry of the aligned stack (``/xanes``, ``/xanes_global``).

Run once every energy is registered (:func:`map_run`). When the energies cannot give an edge map (fewer than
:data:`~gpureg.xanes.spectra.MIN_ENERGIES` usable ones, or none between the pre- and post-edge fit ranges: an
:class:`~gpureg.core.EnergyGridError`, a property of the scan's grid), the run is not lost: the result is
written without the maps, the reason recorded (``xanes_skipped``, :mod:`gpureg.io.results`), and
:func:`no_maps_message` is the one warning line the run logs. Anything else raised here (NaN inputs, memory,
a bug) still stops the run.
"""

from __future__ import annotations

import json
import logging
import re

from ..core.backend import to_host
from ..core.errors import EnergyGridError

__all__ = ["map_run", "no_maps_message", "xanes_attrs"]

_log = logging.getLogger("gpureg")


def map_run(store, reference, options, devices) -> str | None:
    """Write the run's maps into ``store``, or record why the energies cannot give them.

    Parameters
    ----------
    store : gpureg.io.results.ResultStore
        The run's result, every energy done.
    reference : gpureg.register.prepare.PreparedReference
        Its ``mask`` (the reference's Otsu mask) bounds every map.
    options : RunOptions
    devices : Devices

    Returns
    -------
    str or None
        ``None`` when ``/xanes`` was written; else the one-line reason the maps were skipped (also stored as
        the root attribute ``xanes_skipped``).
    """
    from ..xanes.spectra import MIN_ENERGIES
    from .particles import per_particle_xanes

    used = store.used()
    if used.size < MIN_ENERGIES:
        left = store.energies[store.excluded]
        reason = (f"only {used.size} usable energies" if left.size else f"{used.size} energies") + \
            (f" (leaving out {', '.join(f'{e:g}' for e in left)} eV)" if left.size else "") + \
            f"; edge maps need at least {MIN_ENERGIES}"
    else:
        try:
            _xanes(store, reference, options, devices, used)
            reason = None
        except EnergyGridError as exc:
            reason = re.sub(r"^\w+: ", "", str(exc).splitlines()[0])  # without the function's name
    if reason is not None:
        store.skip_xanes(reason)
        return reason
    if options.per_particle or store.has_stack("aligned_global"):
        try:
            per_particle_xanes(store, options, devices, mask=reference.mask)
        except EnergyGridError as exc:  # the run's own map stands; only the comparison map is missing
            _log.warning("gpureg: no affine-only comparison map (/xanes_global): %s", str(exc).splitlines()[0])
    return None


def no_maps_message(output, reason: str, options, n_used: int) -> str:
    """The one warning line of a run that wrote no edge maps: why, where the registration is, how to get maps
    (``n_used``: the energies not left out)."""
    from ..xanes.spectra import MIN_ENERGIES

    chem = [name for name, on in (("--references", options.references), ("--clusters", options.clusters)) if on]
    skipped = f" nor {'/'.join(chem)} results" if chem else ""
    if n_used < MIN_ENERGIES:
        fix = f"scan at least {MIN_ENERGIES} energies (below, across and above the edge)"
    else:
        fix = (f"scan more energies across the edge, or map this result with fit ranges that leave energies "
               f"between them: gpureg xanes {output} MAPS.h5 --pre LO,HI --post LO,HI (eV)")
    return f"gpureg: no edge maps{skipped}: {reason}; the registration is in {output}; for maps, {fix}"


def xanes_attrs(info) -> dict:
    """``/xanes`` attributes of an edge map's ``info``: common E0, fit ranges, spectral basis (JSON)."""
    out = {"e0_common_ev": float(info["e0"]), "pre_ev": list(info["pre"]), "post_ev": list(info["post"]),
           "e0_rule": info["rule"]}
    if "psf" in info:
        out["psf_voxels"] = float(info["psf"])
    if info.get("basis") is not None:
        b = info["basis"].to_dict()
        b["applied"] = info.get("denoise") is not None
        b["residual_smoothing_voxels"] = float(info.get("residual_smoothing", 0.0))
        out["spectral_denoise"] = json.dumps(b)
    return out


# --- internals ---------------------------------------------------------------------------

def _xanes(store, reference, options, devices, used):
    from ..core.segment import particle_labels
    from ..xanes.stack import edge_energy_map

    info = {}
    # Maps only where there is sample: the reference's Otsu mask (the one registration uses), as the maps of
    # /xanes_global, so every mode's map covers the same voxels (README, "Edge-energy maps").
    maps = edge_energy_map(store.volumes("aligned", used), store.energies[used], device=devices.registration,
                           method=options.edge.value, denoise=options.denoise_spectra, info=info,
                           mask=reference.mask, psf=options.psf)
    labels, _ = particle_labels(reference.mask)
    chem = None
    if options.references or options.clusters:
        from ..xanes.chemmap import chemistry_map

        stack = store.stack("aligned") if used.size == store.energies.size else store.volumes("aligned", used)
        chem = chemistry_map(stack, store.energies[used], references=options.references or None,
                             k=options.clusters, mask=maps["mask"], device=devices.registration, e0=info["e0"],
                             denoise=info["basis"] if options.denoise_spectra is not None else None,
                             column=options.reference_column)
    store.write_xanes(maps, to_host(labels), chemistry=chem, attrs=xanes_attrs(info))
