"""A Bluesky run in Tiled (as ``TiledWriter`` writes it) read as a multi-energy tomography scan.

Layout: a run container (spec ``BlueskyRun``; metadata ``start`` and, once
finished, ``stop``) with event streams. The ``primary`` stream holds the
projections: a 2D detector image field (an external array that grows as frames
are written), the monochromator energy and the rotation angle (scalar fields,
recognised by name: ``*energy*``; ``*angle*``/``*theta*``/``*rot*``; set-points
ignored; units from the data keys, keV below 200 when none). Open-beam frames
come from a stream named ``flat`` (or ``white``, ``bkg``, ``background``), dark
frames from ``dark``; each frame's energy is its own monochromator reading.

Frames are grouped into energies by the monochromator reading (consecutive
frames within ``tolerance_ev``). An energy is **complete** once a later energy
has started in the primary stream (or the run has its stop document) and it has
open-beam frames. :meth:`BlueskyRun.refresh` re-reads the run and returns what
became complete; images are read lazily, one energy's rows at a time.
"""

from __future__ import annotations

import itertools

import numpy as np

from .base import RADIANS, InputReader
from .files import InputError
from .tiled import TiledGroup, translate_errors

__all__ = ["BlueskyRun"]

FLAT_STREAMS = ("flat", "flats", "white", "bkg", "background")
DARK_STREAMS = ("dark", "darks")


class BlueskyRun(InputReader):
    """The complete energies of a Bluesky run (refreshable while the run is written).

    Attributes (besides :class:`InputReader`'s)
    -------------------------------------------
    uid : str
        The run's uid (start document).
    stopped : bool
        The stop document is in (the run ended).
    bad : dict
        Energy (eV) -> reason, for energies that cannot be used (no open-beam frame at
        the end of the run, another number of projections, a repeated energy).
    """

    layout = "Bluesky run (TiledWriter)"
    kind = "projections"

    def __init__(self, node, uri, *, tolerance_ev: float = 0.5):
        self._run, self.path, self.tol = node, str(uri).rstrip("/"), float(tolerance_ev)
        start = dict(node.metadata.get("start", {}))
        self.uid = str(start.get("uid", ""))
        self.attrs = {"run_uid": self.uid, "scan_id": start.get("scan_id"), "source": self.path}
        self.pixel_size_nm = None
        self.guessed = ("pixel size not in the run: unknown",)
        self.energies = np.zeros(0)
        self.theta, self.shape = None, (0, 0, 0)
        self.stopped = False
        self.bad = {}
        self._segments = []  # complete energies, ascending
        self._cols = {}  # stream -> energy/time/angle columns read so far
        self.acquired = []  # complete energies (eV), in acquisition order
        self.n_frames = 0  # frames seen so far, all streams
        self.refresh()

    # --- reading the run ----------------------------------------------------------------
    def refresh(self) -> list:
        """Re-read the run; returns the energies (eV) that became complete since the last call."""
        run = self._run
        translate_errors(run.refresh, self.path)
        self.stopped = "stop" in run.metadata
        streams = TiledGroup(run, self.path)  # one listing: every stream's node and metadata
        keys = streams.keys()
        if "primary" not in keys:
            return []
        prim = self._stream(streams, "primary", need_angle=True)
        flats = next((self._stream(streams, k) for k in FLAT_STREAMS if k in keys), None)
        darks = next((self._stream(streams, k) for k in DARK_STREAMS if k in keys), None)
        self._flats, self._darks, self._prim = flats, darks, prim
        self.n_frames = sum(st["energy"].size for st in (prim, flats, darks) if st is not None)
        e, t = prim["energy"], prim["time"]
        if not e.size:
            return []
        cuts = np.flatnonzero(np.abs(np.diff(e)) > self.tol) + 1
        bounds = np.r_[0, cuts, e.size]
        known = {round(s["energy"], 3) for s in self._segments} | set(self.bad)
        new = []
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            energy = float(np.median(e[a:b]))
            if round(energy, 3) in known:
                continue
            if k == len(bounds) - 2 and not self.stopped:
                break  # the scan may still add frames to this energy
            seg = {"energy": energy, "rows": (int(a), int(b)), "last_frame": float(t[b - 1]),
                   "angle": prim["angle"][a:b]}
            reason = self._check(seg, flats)
            if reason == "wait":
                break
            if reason:
                self.bad[round(energy, 3)] = reason
                continue
            self._segments.append(seg)
            self.acquired.append(energy)
            new.append(energy)
        if new:
            order = np.argsort([s["energy"] for s in self._segments], kind="stable")
            self._segments = [self._segments[i] for i in order]
            self.energies = np.array([s["energy"] for s in self._segments])
            first = self._segments[0]
            self.theta = first["angle"]
            self.shape = (first["rows"][1] - first["rows"][0], *prim["frame"])
        return new

    def _check(self, seg, flats):
        """None (usable), ``"wait"`` (not yet: open-beam frames still to come) or why it is bad."""
        if flats is None or not np.any(np.abs(flats["energy"] - seg["energy"]) <= self.tol):
            if not self.stopped:
                return "wait"
            return "no open-beam frame (flat stream) at this energy"
        n = seg["rows"][1] - seg["rows"][0]
        if self._segments:
            first = self._segments[0]
            n0 = first["rows"][1] - first["rows"][0]
            if n != n0:
                return f"{n} projections, but {n0} at {first['energy']:.2f} eV"
            spread = float(np.max(np.abs(seg["angle"] - first["angle"])))
            if spread > 0.5:
                return f"angles differ from those at {first['energy']:.2f} eV by up to {spread:.3g} degrees"
        return None

    def _stream(self, streams, name, need_angle=False):
        """Columns of one stream: energy (eV), time, angle (degrees), image dataset, frame shape (only rows not
        read before are fetched)."""
        where = f"{self.path}/{name}"
        group = streams[name]
        base = {"node": group.node}
        dk = dict(group.attrs.get("data_keys", {}))
        image = _pick(dk, lambda k, v: len(v.get("shape") or ()) == 2)
        energy = _pick(dk, lambda k, v: "energy" in k.lower() and not (v.get("shape") or ()))
        angle = _pick(dk, lambda k, v: any(w in k.lower() for w in ("angle", "theta", "rot"))
                      and not (v.get("shape") or ()))
        missing = [what for what, f in (("a 2D detector image", image), ("a monochromator energy (*energy*)", energy),
                                        ("a rotation angle (*angle*, *theta*, *rot*)", angle if need_angle else 1))
                   if f is None]
        if missing:
            raise InputError(f"{where}: stream has no {' and no '.join(missing)} among its fields "
                             f"{sorted(dk)}; expected a tomography scan")
        keys = group.keys()
        if image not in keys:  # declared, not yet written
            return {**base, "energy": np.zeros(0), "time": np.zeros(0), "angle": np.zeros(0), "image": None,
                    "frame": tuple(dk[image]["shape"])}
        img = group[image]
        n = min(img.shape[0], *(int(group[c].shape[0]) for c in (energy, "time") if c in keys))
        cols = self._cols.setdefault(name, {"energy": np.zeros(0), "time": np.zeros(0), "angle": np.zeros(0)})
        have = cols["time"].size
        if n > have:
            e = np.asarray(group[energy][have:n], dtype=np.float64)
            units = str(dk[energy].get("units") or "").lower()
            if units == "kev" or (units != "ev" and e.size and np.nanmax(e) < 200.0):
                e = e * 1000.0
            cols["energy"] = np.concatenate([cols["energy"], e])
            cols["time"] = np.concatenate([cols["time"], np.asarray(group["time"][have:n], dtype=np.float64)])
            if angle is not None:
                a = np.asarray(group[angle][have:n], dtype=np.float64)
                unit = str(dk[angle].get("units") or "").lower()
                cols["angle"] = np.concatenate([cols["angle"], np.rad2deg(a) if unit in RADIANS else a])
        return {**base, **{k: v[:n] for k, v in cols.items()}, "image": img,
                "frame": tuple(int(s) for s in img.shape[1:])}

    # --- InputReader ---------------------------------------------------------------------
    def index_of(self, energy) -> int:
        """Index (in :attr:`energies`) of a complete energy (eV)."""
        return int(np.argmin(np.abs(self.energies - float(energy))))

    def last_frame_time(self, i) -> float:
        """Time stamp (epoch s) of energy ``i``'s last projection."""
        return self._segments[self._index(i)]["last_frame"]

    def projections(self, i):
        a, b = self._segments[self._index(i)]["rows"]
        return np.asarray(self._prim["image"][a:b], dtype=np.float32)

    def flat(self, i):
        e = self._segments[self._index(i)]["energy"]
        idx = np.flatnonzero(np.abs(self._flats["energy"] - e) <= self.tol)
        return np.asarray(self._flats["image"][idx], dtype=np.float32)

    def dark(self, i=None):
        d = self._darks
        if d is None or d["image"] is None or not d["energy"].size:
            return np.zeros((1, *self.shape[1:]), dtype=np.float32)
        if i is not None:
            idx = np.flatnonzero(np.abs(d["energy"] - self._segments[self._index(i)]["energy"]) <= self.tol)
            if idx.size:
                return np.asarray(d["image"][idx], dtype=np.float32)
        return np.asarray(d["image"][:], dtype=np.float32)


def _pick(data_keys, test):
    """The first field (name order) passing ``test``, set-points and readbacks of motors' settings excluded."""
    names = [k for k, v in sorted(data_keys.items())
             if "setpoint" not in k.lower() and not k.lower().endswith(("_velocity", "_acceleration")) and test(k, v)]
    return names[0] if names else None
