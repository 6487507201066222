"""Regenerate ``larch_outputs.json``: xraylarch's ``pre_edge`` and ``lincombo_fit`` on fixed inputs.

The Larch comparison in ``tests/xanes/test_real_spectra.py`` reads this file, so it runs in CI without
xraylarch installed (a 1.8 GB install). Inputs are the real Fe K-edge spectra beside this script
(``fe_*.xdi``), linearly interpolated onto (a) a uniform 0.5 eV grid over 7000-7400 eV and (b) the
TXM-like grid of the tests; mixtures for ``lincombo_fit`` are made from the references scaled by Larch's
own edge steps, with the fractions below. Run with a Python that has xraylarch::

    python tests/data/xanes/make_larch_outputs.py        # writes tests/data/xanes/larch_outputs.json
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
UNIFORM = np.arange(7000.0, 7400.0 + 1e-9, 0.5)
TXM = np.r_[np.arange(7005.0, 7100.0, 15.0), np.arange(7100.0, 7149.0, 1.5), np.arange(7160.0, 7280.0, 15.0)]
NAMES = ("fe2so4", "ferrihydrite", "foil", "goethite")
MIXTURES = ((("fe2so4", "goethite"), (0.3, 0.7)),
            (("fe2so4", "foil", "goethite"), (0.2, 0.5, 0.3)),
            (("fe2so4", "foil", "goethite"), (0.6, 0.1, 0.3)))


def spectrum(name, grid):
    e, mu = np.loadtxt(HERE / f"fe_{name}.xdi", unpack=True)
    return np.interp(grid, e, mu)


def main():
    import larch
    from larch import Group
    from larch.math import lincombo_fit
    from larch.xafs import pre_edge

    out = {"larch_version": larch.__version__, "uniform": [UNIFORM[0], UNIFORM[-1], 0.5], "txm": TXM.tolist(),
           "pre_edge": {}, "lincombo": []}
    groups = {}
    for name in NAMES:
        out["pre_edge"][name] = {}
        for gname, grid in (("uniform", UNIFORM), ("txm", TXM)):
            g = Group(energy=grid, mu=spectrum(name, grid))
            pre_edge(g)
            out["pre_edge"][name][gname] = {"e0": float(g.e0), "edge_step": float(g.edge_step),
                                            "norm": [float(v) for v in g.norm]}
            if gname == "uniform":
                groups[name] = g
    for comps, fracs in MIXTURES:
        mu = sum(f * groups[c].mu / groups[c].edge_step for c, f in zip(comps, fracs))
        g = Group(energy=UNIFORM, mu=mu)
        pre_edge(g)
        fit = lincombo_fit(g, [groups[c] for c in comps], sum_to_one=True)
        labels = list(fit.weights)
        out["lincombo"].append({"components": list(comps), "fractions": list(fracs), "mu": [float(v) for v in mu],
                                "weights": [float(fit.weights[k]) for k in labels]})
    (HERE / "larch_outputs.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
