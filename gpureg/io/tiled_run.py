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
frames within ``tolerance_ev``); a frame counts once both its image and its
event row (time, energy, angle) are in. An energy is **complete** when

- its planned number of projections is in (``angles``, or the start document's
  ``angles_per_energy``, ``num_angles`` or ``n_angles``, also looked up in its
  ``plan_args``; :data:`ANGLE_KEYS`), or a frame at another energy came after
  its projections, or the run has its stop document; and
- its open-beam frames are all in: a frame of another kind or energy came after
  them, or the planned number (``flats_per_energy``, ``num_bkg_images`` or
  ``num_flats``; :data:`FLAT_KEYS`) is in; and, for an energy completed by the
  planned count, dark frames at its energy are complete the same way, or dark
  frames were taken before its projections.

"Came after" is judged only from streams read no later than the stream it
completes: a re-read lists the streams one after another (each read retried
across a server outage), so the open-beam frames may be newer than the
projections read before them, and a next energy's frame there does not say the
older read had all of this energy's projections. When such newer frames say the
projection stream moved on, it is read again first (so an energy without a
planned count still completes as the next one's open-beam frames come in).

:meth:`BlueskyRun.refresh` re-reads the run (a handful of requests: the run,
its streams, each stream's parts, and only the event tables that grew) and
returns what became complete; images are read lazily, one energy's rows at a
time.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from .base import RADIANS, InputReader
from .files import InputError
from .tiled import TiledDataset, TiledGroup, family, parts, read_columns, translate_errors

__all__ = ["ANGLE_KEYS", "FLAT_KEYS", "BlueskyRun", "planned_counts"]

_log = logging.getLogger("gpureg")
FLAT_STREAMS = ("flat", "flats", "white", "bkg", "background")
DARK_STREAMS = ("dark", "darks")
ANGLE_KEYS = ("angles_per_energy", "num_angles", "n_angles")
FLAT_KEYS = ("flats_per_energy", "num_bkg_images", "num_flats")


def planned_counts(start, angles=None):
    """``(angles, flats, where)``: projections and open-beam frames planned per energy (None when not recorded).

    ``angles`` (e.g. ``gpureg watch --angles``) overrides the start document. Keys are looked up in the start
    document, then in its ``plan_args`` (:data:`ANGLE_KEYS`, :data:`FLAT_KEYS`).
    """
    def find(keys):
        for where, md in (("start", start), ("start.plan_args", start.get("plan_args") or {})):
            if not isinstance(md, dict):
                continue
            for k in keys:
                if md.get(k) is not None:
                    v = md[k]
                    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                            or v != int(v) or v < 1:
                        raise InputError(f"run start document: {where}['{k}'] = {v!r}; expected a positive whole "
                                         "number of frames per energy (gpureg watch --angles N overrides it)")
                    return int(v), f"{where}['{k}']"
        return None, None

    if angles is not None:
        if int(angles) < 1:
            raise InputError(f"--angles {angles}: expected a positive number of projections per energy")
        n_angles, where = int(angles), "--angles"
    else:
        n_angles, where = find(ANGLE_KEYS)
    n_flats, _ = find(FLAT_KEYS)
    return n_angles, n_flats, where


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
    planned_angles : int or None
        Projections per energy from ``angles`` or the start document (None: an energy
        completes when the next starts or the run stops).
    waiting : bool
        An energy has frames in but is not complete yet.
    nodes : dict
        Name -> Tiled client node of the run and of each stream's event table and detector images (what a
        streaming subscription follows: :class:`gpureg.io.tiled_stream.Wakeup`).
    """

    layout = "Bluesky run (TiledWriter)"
    kind = "projections"

    def __init__(self, node, uri, *, tolerance_ev: float = 0.5, angles: int | None = None):
        self._run, self.path, self.tol = node, str(uri).rstrip("/"), float(tolerance_ev)
        start = dict(node.metadata.get("start", {}))
        self.uid = str(start.get("uid", ""))
        self.attrs = {"run_uid": self.uid, "scan_id": start.get("scan_id"), "source": self.path}
        self.planned_angles, self.planned_flats, self.plan_source = planned_counts(start, angles)
        self.pixel_size_nm = None
        self.guessed = ("pixel size not in the run: unknown",)
        self.energies = np.zeros(0)
        self.theta, self.shape = None, (0, 0, 0)
        self.stopped = self.waiting = self._grew = self._side_wait = False
        self._prim = self._flats = self._darks = self._listed = None
        self.nodes = {"run": node}  # what a streaming subscription may follow: the run, each stream's table/images
        self.bad = {}
        self._segments = []  # complete energies, ascending
        self._cols = {}  # stream -> energy/time/angle columns read so far
        self._reads = itertools.count()  # each stream read is numbered: which of two reads is the newer
        self.acquired = []  # complete energies (eV), in acquisition order
        self.n_frames = 0  # frames seen so far, all streams
        self.refresh()

    # --- reading the run ----------------------------------------------------------------
    def refresh(self) -> list:
        """Re-read the run; returns the energies (eV) that became complete since the last call."""
        run = self._run
        if not self._grew:  # the stop document is read before the frames (it comes after the last of them)
            translate_errors(run.refresh, self.path)
            self.stopped = "stop" in run.metadata
        streams = self._listing()
        keys = streams.keys()
        if "primary" not in keys:
            return []
        before = 0 if self._prim is None else self._prim["time"].size
        prim = self._read(streams, "primary")
        self._grew = prim["time"].size != before
        if self.planned_angles is None or self._grew or self._side_wait or self.stopped or self._prim is None:
            # open-beam and dark frames matter once the projections moved on or an energy waits for them; read
            # later, they are only older (never a wrong completion: at worst one more wait)
            self._flats = next((self._read(streams, k) for k in FLAT_STREAMS if k in keys), None)
            self._darks = next((self._read(streams, k) for k in DARK_STREAMS if k in keys), None)
            if self._overtaken(prim):  # the projections read before them may miss some: read them again
                prim = self._read(streams, "primary")
                self._grew = prim["time"].size != before
        flats, darks, self._prim = self._flats, self._darks, prim
        self.n_frames = sum(st["energy"].size for st in (prim, flats, darks) if st is not None)
        self.waiting = self._side_wait = False
        e, t = prim["energy"], prim["time"]
        if not e.size:
            return []
        cuts = np.flatnonzero(np.abs(np.diff(e)) > self.tol) + 1
        bounds = np.r_[0, cuts, e.size]
        self._check_plan(bounds)
        known = {round(s["energy"], 3) for s in self._segments} | set(self.bad)
        new = []
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            energy = float(np.median(e[a:b]))
            if round(energy, 3) in known:
                continue
            by_plan = False
            if k == len(bounds) - 2 and not self.stopped and not self._moved_on(energy, t[b - 1]):
                if self.planned_angles is None or b - a < self.planned_angles:
                    self.waiting = True
                    break  # the scan may still add frames to this energy
                by_plan = True
            seg = {"energy": energy, "rows": (int(a), int(b)), "last_frame": float(t[b - 1]),
                   "first_frame": float(t[a]), "angle": prim["angle"][a:b]}
            reason = self._check(seg, flats, darks, by_plan)
            if reason == "wait":
                self.waiting = self._side_wait = True
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

    def _read(self, streams, name):
        """:meth:`_stream`, numbered (``"read"``): a stream read later holds every frame written before it."""
        st = self._stream(streams, name, need_angle=name == "primary")
        st["read"] = next(self._reads)
        return st

    def _overtaken(self, prim):
        """Frames of a stream read after the projections ``prim`` are at another energy than, and later than,
        its last projection: the scan may have added projections after ``prim`` was read."""
        e, t = prim["energy"], prim["time"]
        if not e.size:
            return False
        return any(st is not None and st["read"] > prim["read"]
                   and np.any((st["time"] > t[-1]) & (np.abs(st["energy"] - e[-1]) > self.tol))
                   for st in (self._flats, self._darks))

    def _listing(self):
        """The run's streams (one request), kept once the projection, open-beam and dark streams are all there."""
        if self._listed is not None:
            return self._listed
        streams = TiledGroup(self._run, self.path)
        keys = set(streams.keys())
        if "primary" in keys and keys & set(FLAT_STREAMS) and keys & set(DARK_STREAMS):
            self._listed = streams
        return streams

    def _check_plan(self, bounds):
        """Stop trusting the planned count once an energy has more projections than planned."""
        if self.planned_angles is None:
            return
        longest = int(np.max(np.diff(bounds)))
        if longest > self.planned_angles:
            _log.warning("gpureg: %s: an energy has %d projections, more than the %d planned (%s); from now on an "
                         "energy counts as complete only when the next one starts or the run stops", self.path,
                         longest, self.planned_angles, self.plan_source)
            self.planned_angles = None

    def _frames(self, upto):
        """``(stream, energy, time)`` columns of every stream read so far, read no later than read number ``upto``
        (a newer read may hold frames that came after what the older one missed)."""
        return [(name, st["energy"], st["time"]) for name, st in
                (("primary", self._prim), ("flat", self._flats), ("dark", self._darks))
                if st is not None and st["read"] <= upto]

    def _moved_on(self, energy, after):
        """A projection's ``energy`` is done: a frame at another energy (a stream read no later than the
        projections) came after time ``after``."""
        return any(np.any((t > after) & (np.abs(e - energy) > self.tol))
                   for _, e, t in self._frames(self._prim["read"]))

    def _settled(self, stream, energy, planned=None):
        """``stream``'s frames at ``energy`` are all in: the planned number, or a frame of another kind or energy
        came after the last of them (or the run stopped). None when there are none."""
        st = self._flats if stream == "flat" else self._darks
        if st is None:
            return None
        at = np.abs(st["energy"] - energy) <= self.tol
        if not at.any():
            return None
        if self.stopped or (planned is not None and at.sum() >= planned):
            return True
        last = st["time"][at].max()
        return any(np.any((t > last) & ((name != stream) | (np.abs(e - energy) > self.tol)))
                   for name, e, t in self._frames(st["read"]))

    def _check(self, seg, flats, darks, by_plan):
        """None (usable), ``"wait"`` (not yet: open-beam or dark frames still to come) or why it is bad."""
        flat_ok = self._settled("flat", seg["energy"], self.planned_flats)
        if flat_ok is None:
            if not self.stopped:
                return "wait"
            return "no open-beam frame (flat stream) at this energy"
        if not flat_ok:
            return "wait"
        if by_plan:  # early: the darks this energy will use must be final too
            dark_ok = self._settled("dark", seg["energy"])
            before = darks is not None and np.any(darks["time"] < seg["first_frame"])
            if dark_ok is False or (dark_ok is None and not before):
                return "wait"
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
        """Columns of one stream: energy (eV), time, angle (degrees), image dataset, frame shape. One listing of
        the stream's parts; its event table is read only when more images are in than rows were taken."""
        where = f"{self.path}/{name}"
        group = streams[name]
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
        cols = self._cols.setdefault(name, {"energy": np.zeros(0), "time": np.zeros(0), "angle": np.zeros(0)})
        found = parts(group.node, where)
        self.nodes.update({f"{name}/{k}": v for k, v in found.items() if k == image or family(v) == "table"})
        if image not in found:  # declared, not yet written
            return {**{k: v[:0] for k, v in cols.items()}, "image": None, "frame": tuple(dk[image]["shape"])}
        img = TiledDataset(found[image], f"{where}/{image}")
        have = cols["time"].size
        if img.shape[0] > have:
            fields = {"time": "time", "energy": energy, **({"angle": angle} if angle else {})}
            got = self._columns(found, list(fields.values()), where)
            n = min(img.shape[0], *(v.size for v in got.values()))
            e = got[energy][:n].astype(np.float64)
            units = str(dk[energy].get("units") or "").lower()
            if units == "kev" or (units != "ev" and e.size and np.nanmax(e) < 200.0):
                e = e * 1000.0
            cols["energy"], cols["time"] = e, got["time"][:n].astype(np.float64)
            if angle is not None:
                a = got[angle][:n].astype(np.float64)
                cols["angle"] = np.rad2deg(a) if str(dk[angle].get("units") or "").lower() in RADIANS else a
        return {**cols, "image": img, "frame": img.shape[1:]}

    @staticmethod
    def _columns(found, fields, where):
        """The scalar fields of a stream from its event table(s) (one request each) or 1D arrays."""
        out = {}
        for key, node in found.items():
            if family(node) == "table":
                want = [f for f in fields if f in node.structure().columns and f not in out]
                if want:
                    out.update(read_columns(node, f"{where}/{key}", want))
        for f in fields:
            if f not in out:
                if f not in found or family(found[f]) != "array":
                    raise InputError(f"{where}: no column '{f}' in the stream's event table; expected a stream "
                                     "written by TiledWriter")
                out[f] = np.asarray(TiledDataset(found[f], f"{where}/{f}")[:])
        return out

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
        """Dark frames at energy ``i``'s energy; else those taken before its first projection; else all (zeros
        when the run has none)."""
        d = self._darks
        if d is None or d["image"] is None or not d["energy"].size:
            return np.zeros((1, *self.shape[1:]), dtype=np.float32)
        if i is not None:
            seg = self._segments[self._index(i)]
            for pick in (np.abs(d["energy"] - seg["energy"]) <= self.tol, d["time"] < seg["first_frame"]):
                idx = np.flatnonzero(pick)
                if idx.size:
                    return np.asarray(d["image"][idx], dtype=np.float32)
        return np.asarray(d["image"][:], dtype=np.float32)


def _pick(data_keys, test):
    """The first field (name order) passing ``test``, set-points and readbacks of motors' settings excluded."""
    names = [k for k, v in sorted(data_keys.items())
             if "setpoint" not in k.lower() and not k.lower().endswith(("_velocity", "_acceleration")) and test(k, v)]
    return names[0] if names else None
