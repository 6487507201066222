"""Publishing a result into a Tiled container (``gpureg watch ... --publish URI``).

Into the container at ``URI`` a new container ``gpureg_<run uid[:8]>`` (``_2``,
``_3``... when taken) is written with

- ``edge_energy`` ``(nz, ny, nx)`` float32, eV (the per-voxel edge-energy map; absent when the energies
  could not give maps, metadata ``xanes_skipped`` says why);
- ``aligned`` ``(n_energy, nz, ny, nx)`` float32 (the grey tomograms on the reference grid), when kept;
- ``registration``: a table, one row per energy: ``energy_ev``, ``mse_before``, ``mse_after``,
  and the 12 affine entries ``m00`` ... ``m23`` (``moving_from_reference``, voxels ``(z, y, x)``);

and metadata linking it to the run: ``run_uid``, ``source`` (the run's URI),
``energies_ev``, ``reference_ev``, ``excluded`` (energy -> reason), ``xanes_skipped`` (None, or why no maps),
``gpureg_version``, ``convention``.
"""

from __future__ import annotations

import numpy as np

from .tiled import connect, family, translate_errors

__all__ = ["publish_result"]


def publish_result(result, uri: str, *, run_uid: str = "", source: str = "") -> str:
    """Write a finished result's maps, aligned stack and registration table into the Tiled container ``uri``.

    Parameters
    ----------
    result : str or Path
        A finished result HDF5 (``gpureg run``/``watch``).
    uri : str
        A writable Tiled container.
    run_uid, source : str
        The Bluesky run's uid and URI, recorded in the metadata.

    Returns
    -------
    str
        The URI of the new container.
    """
    import h5py

    from ..core.version import __version__
    from .results import read_result

    summary = read_result(result)
    node = connect(uri)
    if family(node) != "container":
        raise ValueError(f"{uri}: --publish needs a container, got a {family(node)}")
    base = f"gpureg_{run_uid[:8]}" if run_uid else "gpureg"
    taken = set(translate_errors(lambda: list(node), uri))
    key = base if base not in taken else next(f"{base}_{k}" for k in range(2, 10_000) if f"{base}_{k}" not in taken)
    energies = np.asarray(summary.energies, dtype=np.float64)
    md = {"run_uid": run_uid, "source": source, "energies_ev": energies.tolist(),
          "reference_ev": float(energies[summary.reference_index]), "gpureg_version": __version__,
          "convention": "moving_from_reference, voxel indices (z, y, x)", "result_file": str(result),
          "excluded": {f"{e:g}": str(r) for e, r in (summary.excluded or {}).items()},
          "xanes_skipped": summary.xanes_skipped}
    out = translate_errors(lambda: node.create_container(key=key, metadata=md), uri)
    where = f"{uri.rstrip('/')}/{key}"
    with h5py.File(result, "r") as h5:
        if "xanes/edge_energy" in h5:  # absent when the energies could not give maps (summary.xanes_skipped)
            edge = np.asarray(h5["xanes/edge_energy"][()], dtype=np.float32)
            translate_errors(lambda: out.write_array(edge, key="edge_energy", metadata={
                "units": "eV", "axes": "z:y:x", "run_uid": run_uid}), where)
        if "aligned" in h5:
            aligned = np.asarray(h5["aligned"][()], dtype=np.float32)
            translate_errors(lambda: out.write_array(aligned, key="aligned", metadata={
                "axes": "energy:z:y:x", "energies_ev": energies.tolist(), "run_uid": run_uid}), where)
    m = np.asarray(summary.matrices, dtype=np.float64)
    table = {"energy_ev": energies, "mse_before": np.asarray(summary.mse_before, dtype=np.float64),
             "mse_after": np.asarray(summary.mse_after, dtype=np.float64)}
    for r in range(3):
        for c in range(4):
            table[f"m{r}{c}"] = m[:, r, c]
    import pandas as pd

    translate_errors(lambda: out.write_dataframe(pd.DataFrame(table), key="registration",
                                                 metadata={"run_uid": run_uid}), where)
    return where
