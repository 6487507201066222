"""Reference spectra for linear-combination fitting: reading, checking, putting them on the scan's energies.

A reference is a named absorption spectrum ``mu(E)`` of a known compound.
They come from text files (XDI, Athena/Larch exports, plain columns: see
:func:`read_columns` for how the energy and ``mu`` columns are chosen by
name) or Athena project files (``.prj``, read through
xraylarch when it is installed), or directly as arrays. Before fitting they are
linearly interpolated onto the scan's energies and then normalised exactly like
the voxel spectra (:func:`gpureg.xanes.preedge.pre_edge`), so a voxel made of
one compound has that reference's normalised spectrum.

Bad input gives one-line ``ValueError``: a file that is not two numeric
columns, NaN values, repeated energies, a reference that does not cover the
scan's energy range (saying by how much), energies in keV against a scan in eV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError

__all__ = ["Reference", "check_reference", "load_references", "read_columns", "reference_matrix"]


@dataclass(frozen=True)
class Reference:
    """One reference spectrum: ``name``, ``energy`` (eV, increasing) and ``mu`` (same length)."""

    name: str
    energy: np.ndarray
    mu: np.ndarray


MU_NAMES = ("mu", "xmu", "mu_e", "mu(e)", "mutrans", "mu_trans", "mufluor", "mu_fluor", "mufl")
"""Column names taken as ``mu`` (case-insensitive), in this order."""
I0_NAMES = ("i0", "io", "izero")
IT_NAMES = ("it", "i1", "itrans", "i_t")
IF_NAMES = ("if", "ifluor", "i_f", "fluor", "ifl")
ENERGY_NAMES = ("energy", "energy_ev", "e", "ene")


def load_references(sources, names=None, *, column=None) -> list[Reference]:
    """Read reference spectra from files, arrays or :class:`Reference` objects.

    Parameters
    ----------
    sources : sequence
        Each a path (``.prj``: every group of the Athena project, through
        xraylarch; anything else: text with two numeric columns, energy eV and
        ``mu``), a ``(energy, mu)`` pair of arrays, or a :class:`Reference`.
        A mapping ``{name: (energy, mu)}`` is also accepted.
    names : sequence of str, optional
        Names for the references (default: file stem, Athena label, ``ref<k>``).
    column : str, optional
        Name (or 1-based number) of the ``mu`` column in text files; see
        :func:`read_columns`.

    Returns
    -------
    list of Reference
        Sorted by energy and checked (finite, distinct energies, >= 5 points).
    """
    if isinstance(sources, dict):
        names = list(sources) if names is None else names
        sources = list(sources.values())
    if isinstance(sources, (str, Path, Reference)):
        sources = [sources]
    refs = []
    for k, src in enumerate(sources):
        if isinstance(src, Reference):
            refs.append(check_reference(src.name, src.energy, src.mu))
        elif isinstance(src, (str, Path)):
            p = Path(src)
            if not p.is_file():
                raise InputError(f"reference file {p} does not exist")
            if p.suffix.lower() == ".prj":
                refs.extend(_read_athena(p))
            else:
                e, mu = read_columns(p, column)
                refs.append(check_reference(p.stem, e, mu, where=str(p)))
        else:
            try:
                e, mu = src
            except (TypeError, ValueError):
                raise InputError(f"reference {k}: expected a path, an (energy, mu) pair or a Reference, "
                                 f"got {type(src).__name__}") from None
            refs.append(check_reference(f"ref{k}", e, mu))
    if names is not None:
        names = list(names)
        if len(names) != len(refs):
            raise InputError(f"references: {len(names)} names given for {len(refs)} references")
        refs = [Reference(str(nm), r.energy, r.mu) for nm, r in zip(names, refs)]
    if not refs:
        raise InputError("references: none given")
    seen = set()
    for r in refs:
        if r.name in seen:
            raise InputError(f"references: two references are named {r.name!r} (pass names=)")
        seen.add(r.name)
    return refs


def check_reference(name, energy, mu, *, where=None) -> Reference:
    """A :class:`Reference` from arrays, sorted by energy; ValueError on NaN, repeats, shape or length.

    Parameters
    ----------
    name : str
    energy, mu : (n,) array_like
        eV and absorption.
    where : str, optional
        Where the data came from (file name), for messages.
    """
    label = where or repr(str(name))
    e = np.asarray(energy, dtype=np.float64).reshape(-1)
    m = np.asarray(mu, dtype=np.float64).reshape(-1)
    if e.size != m.size:
        raise InputError(f"reference {label}: energy ({e.size}) and mu ({m.size}) differ in length")
    if e.size < 5:
        raise InputError(f"reference {label}: needs at least 5 points, got {e.size}")
    bad = ~(np.isfinite(e) & np.isfinite(m))
    if bad.any():
        raise InputError(f"reference {label}: {int(bad.sum())} of {e.size} points are NaN/inf "
                         f"(first at energy index {int(np.flatnonzero(bad)[0])})")
    order = np.argsort(e, kind="stable")
    e, m = e[order], m[order]
    if (np.diff(e) <= 0).any():
        k = int(np.flatnonzero(np.diff(e) <= 0)[0])
        raise InputError(f"reference {label}: energy {e[k]:g} eV appears twice")
    return Reference(str(name), e, m)


def reference_matrix(refs, energies) -> np.ndarray:
    """Raw reference spectra interpolated onto the scan's energies: (n_energy, n_refs) float64.

    Parameters
    ----------
    refs : sequence of Reference
    energies : (n_energy,) array_like
        The scan's energies, eV, increasing.

    Raises
    ------
    ValueError
        A reference whose energies look like keV against a scan in eV (or the
        reverse), or that does not cover the scan's range (with the shortfall in eV).
    """
    E = np.asarray(energies, dtype=np.float64)
    lo, hi = float(E[0]), float(E[-1])
    cols = []
    for r in refs:
        r_lo, r_hi = float(r.energy[0]), float(r.energy[-1])
        ratio = float(np.median(E)) / float(np.median(r.energy)) if np.median(r.energy) > 0 else 0.0
        if 300 < ratio < 3000:
            raise InputError(f"reference {r.name!r}: energies {r_lo:g}-{r_hi:g} look like keV while the scan is in eV "
                             f"({lo:g}-{hi:g}); multiply the reference energies by 1000")
        if 1 / 3000 < ratio < 1 / 300:
            raise InputError(f"scan energies {lo:g}-{hi:g} look like keV while reference {r.name!r} is in eV "
                             f"({r_lo:g}-{r_hi:g}); energies must be in eV")
        tol = 1e-3
        short_lo, short_hi = r_lo - lo, hi - r_hi
        if short_lo > tol or short_hi > tol:
            parts = []
            if short_lo > tol:
                parts.append(f"{short_lo:.4g} eV below")
            if short_hi > tol:
                parts.append(f"{short_hi:.4g} eV above")
            raise InputError(f"reference {r.name!r} covers {r_lo:g}-{r_hi:g} eV but the scan spans {lo:g}-{hi:g} eV: "
                             f"short by {' and '.join(parts)}")
        cols.append(np.interp(E, r.energy, r.mu))
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------- helpers

def read_columns(path, column=None):
    """Energy and ``mu`` of a text spectrum, columns chosen by name: (energy, mu) float64.

    Column names come from XDI ``# Column.N: name`` lines, else from the last
    comment line with one word per data column (Athena, Larch and beamline
    exports), else they are ``1, 2, ...``. Energy: the column named
    ``energy`` (or ``e``, ``energy_ev``), else the first. ``mu``: the column
    ``column`` (a name or a 1-based number) when given; else the one named as
    in :data:`MU_NAMES`; else ``ln(I0/It)`` from I0 and It columns, or
    ``If/I0`` from I0 and If columns; else the second of exactly two columns.
    Anything else is ambiguous and refused with one line listing the columns.
    """
    text = Path(path).read_text(errors="replace").splitlines()
    comments, rows = [], []
    for line in text:
        t = line.strip()
        if not t:
            continue
        if t[0] in "#%!;":
            comments.append(t.lstrip("#%!; ").strip())
        else:
            rows.append(t)
    try:
        data = np.array([[float(v) for v in r.replace(",", " ").split()] for r in rows], dtype=np.float64)
    except ValueError:
        raise InputError(f"reference file {path}: expected numeric columns (energy in eV, mu), "
                         f"'#' for comments") from None
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise InputError(f"reference file {path}: expected at least two numeric columns (energy in eV, mu), "
                         f"got shape {data.shape}")
    ncol = data.shape[1]
    names = _column_names(comments, ncol)
    low = [n.lower() for n in names]

    def col(k):
        return data[:, k]

    ie = next((low.index(n) for n in ENERGY_NAMES if n in low), 0)
    listing = ", ".join(names)
    if column is not None:
        key = str(column).strip()
        if key.isdigit() and 1 <= int(key) <= ncol:
            return col(ie), col(int(key) - 1)
        if key.lower() in low:
            return col(ie), col(low.index(key.lower()))
        raise InputError(f"reference file {path}: no column {key!r}; columns: {listing}")
    for n in MU_NAMES:
        if n in low:
            return col(ie), col(low.index(n))
    i0 = next((low.index(n) for n in I0_NAMES if n in low), None)
    it = next((low.index(n) for n in IT_NAMES if n in low), None)
    i_f = next((low.index(n) for n in IF_NAMES if n in low), None)
    if i0 is not None and (it is None) != (i_f is None):
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.log(col(i0) / col(it)) if it is not None else col(i_f) / col(i0)
        return col(ie), mu
    if ncol == 2:
        return col(ie), col(1 - ie)
    raise InputError(f"reference file {path}: cannot tell which of its {ncol} columns is mu ({listing}); "
                     f"choose one with column=NAME (command line: --reference-column NAME)")


def _column_names(comments, ncol):
    """Column names from XDI ``Column.N`` lines or the last comment line with ``ncol`` words; else 1..ncol."""
    xdi = {}
    for c in comments:
        if c.lower().startswith("column."):
            key, _, val = c.partition(":")
            try:
                xdi[int(key.split(".")[1])] = val.split()[0] if val.split() else key
            except (ValueError, IndexError):
                continue
    if xdi and len(xdi) == ncol and sorted(xdi) == list(range(1, ncol + 1)):
        return [xdi[k] for k in range(1, ncol + 1)]
    for c in reversed(comments):
        words = c.replace(",", " ").split()
        if len(words) == ncol and not any(_is_number(w) for w in words):
            return words
    return [str(k) for k in range(1, ncol + 1)]


def _is_number(w):
    try:
        float(w)
    except ValueError:
        return False
    return True


def _read_athena(path):
    try:
        from larch.io import read_athena
    except ImportError:
        raise InputError(f"reference file {path}: reading Athena projects needs xraylarch "
                         f"(pip install xraylarch), or export the spectra as two-column text") from None
    try:
        proj = read_athena(str(path), do_preedge=False, do_bkg=False, do_fft=False)
    except Exception as exc:  # larch raises many kinds for a bad file
        raise InputError(f"reference file {path}: not a readable Athena project ({exc})") from None
    refs = []
    for label, grp in vars(proj).items():
        if label.startswith("_") or not hasattr(grp, "energy") or not hasattr(grp, "mu"):
            continue
        refs.append(check_reference(str(getattr(grp, "label", label)), grp.energy, grp.mu, where=f"{path}:{label}"))
    if not refs:
        raise InputError(f"reference file {path}: the Athena project holds no spectra")
    return refs
