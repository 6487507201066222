"""When an energy of a live Bluesky run is complete, when the run's streams are read at different moments.

A re-read of the run lists each stream in turn (projections, then open-beam and dark frames); each read may
retry across a server outage, so the open-beam frames can be seconds newer than the projections read just
before them. A frame at the next energy in those newer streams must not make the last energy, whose remaining
projections the older read missed, complete and short (seen live: ``6570.00 eV left out: 1 projections, but 8``
after a restarted watcher's first read spanned an outage). Here the run is a scripted writer: ``_stream``
returns what was written up to the moment of each read, and the test decides how far the writer gets between
reads; no Tiled server, no timing.
"""

import numpy as np
import pytest

pytest.importorskip("httpx")  # the Tiled client's HTTP layer: a run's reads translate its errors (live-test extra)

from gpureg.io.tiled_run import BlueskyRun  # noqa: E402

ENERGIES = [6500.0, 6540.0, 6552.0, 6570.0, 6600.0]
N_ANGLES, N_FLAT, N_DARK = 8, 2, 2


def timeline(short=None, order=("flat", "primary")):
    """The scan's frames in write order, ``(stream, time, energy, angle)``: per energy its frames of each stream in
    ``order`` (darks once, first, unless ``order`` has them; as tests/bluesky_scan.tomo_plan by default); energy
    index ``short`` gets one projection only."""
    count = {"flat": N_FLAT, "dark": N_DARK}
    rows = [] if "dark" in order else [("dark", ENERGIES[0])] * N_DARK
    for k, e in enumerate(ENERGIES):
        for stream in order:
            rows += [(stream, e)] * (N_ANGLES if stream == "primary" and k != short else count.get(stream, 1))
    theta = np.linspace(0.0, 180.0, N_ANGLES, endpoint=False)
    out, j = [], 0
    for i, (stream, e) in enumerate(rows):
        angle = theta[j % N_ANGLES] if stream == "primary" else np.nan
        j = j + 1 if stream == "primary" else 0
        out.append((stream, 1000.0 + i, e, angle))
    return out


class _Node:
    def __init__(self, start):
        self.metadata = {"start": start}

    def refresh(self):
        return self


class ScriptedRun(BlueskyRun):
    """A run whose writer has written ``written`` frames of ``frames``; ``before_read(run, name)``, called before
    each stream is read, may let the writer go on."""

    def __init__(self, frames, written, before_read=None, plan=True, flats_planned=True):
        self.frames, self.written = frames, written
        self.before_read = before_read or (lambda run, name: None)
        start = {"uid": "scripted", **({"num_angles": N_ANGLES} if plan else {}),
                 **({"num_bkg_images": N_FLAT} if plan and flats_planned else {})}
        self.node = _Node(start)
        super().__init__(self.node, "scripted://run")

    def write(self, n=None):
        """The writer goes on by ``n`` frames (all of them: None; the stop document with the last)."""
        self.written = len(self.frames) if n is None else min(self.written + n, len(self.frames))
        if self.written == len(self.frames):
            self.node.metadata["stop"] = {"exit_status": "success"}

    def _listing(self):
        return {name: None for name in ("primary", "flat", "dark")}

    def _stream(self, streams, name, need_angle=False):
        self.before_read(self, name)
        rows = [r for r in self.frames[:self.written] if r[0] == name]
        col = lambda i: np.array([r[i] for r in rows], dtype=np.float64)
        image = np.stack([np.full((4, 4), r[1]) for r in rows]) if rows else None  # each frame: its time stamp
        return {"time": col(1), "energy": col(2), "angle": col(3), "image": image, "frame": (4, 4)}


def upto(frames, energy, n_primary):
    """Frames written up to ``n_primary`` projections of ``energy`` (its flats and all earlier energies)."""
    seen = 0
    for i, (stream, _, e, _) in enumerate(frames):
        if stream == "primary" and e == energy:
            seen += 1
            if seen == n_primary:
                return i + 1
    raise AssertionError("no such frame")


def outage_before(stream, resume_at):
    """``before_read``: the first read of ``stream`` waits (server outage) while the writer goes on to frame
    ``resume_at``: the streams read just before are older than it."""
    state = {"done": False}

    def hook(run, name):
        if name == stream and not state["done"]:
            state["done"] = True
            run.written = resume_at
    return hook


@pytest.mark.parametrize("plan", [True, False], ids=["planned", "unplanned"])
def test_projections_read_before_an_outage_do_not_make_the_growing_energy_final(plan):
    frames = timeline()
    first_of_6570 = upto(frames, 6570.0, 1)
    flats_of_6600 = upto(frames, 6570.0, N_ANGLES) + N_FLAT  # all of 6570, then 6600's open-beam frames
    run = ScriptedRun(frames, first_of_6570, outage_before("flat", flats_of_6600), plan=plan)
    # the projections were read with 1 of 6570's 8 in, the open-beam frames after all 8 and 6600's: 6570 is
    # not left out; the projections are read again, and 6570 is complete with its 8
    assert not run.bad and run.acquired == ENERGIES[:4]
    assert run.last_frame_time(run.index_of(6570.0)) == frames[flats_of_6600 - N_FLAT - 1][1]  # its 8th
    run.write()
    for _ in range(3):  # the stop document is read once a re-read finds no new projection (it follows them)
        run.refresh()
    assert run.stopped and sorted(run.acquired) == ENERGIES and not run.bad
    assert run.shape[0] == N_ANGLES


@pytest.mark.parametrize("plan", [True, False], ids=["planned", "unplanned"])
def test_an_energy_the_scan_left_short_is_still_left_out(plan):
    """The rule still holds where it should: the projections read after the next energy's open-beam frames show
    6570 with 1 projection, so it will not grow."""
    frames = timeline(short=3)
    run = ScriptedRun(frames, upto(frames, 6570.0, 1) + N_FLAT, plan=plan)
    assert run.bad == {6570.0: f"1 projections, but {N_ANGLES} at 6500.00 eV"}


def test_without_a_plan_the_next_energys_flats_complete_an_energy():
    """No planned count: 6540 is complete once 6552's open-beam frames are in, before 6552's first projection
    (the projections are read again when newer open-beam frames say so)."""
    frames = timeline()
    run = ScriptedRun(frames, upto(frames, 6540.0, N_ANGLES) + N_FLAT, plan=False)
    assert run.planned_angles is None
    assert run.acquired == [6500.0, 6540.0] and not run.bad and not run.waiting


def test_open_beam_frames_read_before_an_outage_are_not_final():
    """Per energy dark, projection and open-beam frames, no planned open-beam count: the open-beam frames read with
    1 of 6500's 2 in, the dark frames after 6540's (which would say 6500's open beam is done): 6500 waits for a
    read that has both, then uses both."""
    frames = timeline(order=("dark", "primary", "flat"))
    one_flat = upto(frames, 6500.0, N_ANGLES) + 1
    run = ScriptedRun(frames, one_flat, outage_before("dark", one_flat + 1 + N_DARK), flats_planned=False)
    assert run.planned_flats is None and run.acquired == [] and run.waiting and not run.bad
    run.write(1)  # 6540's first projection: 6500's open-beam frames are final
    run.refresh()
    assert run.acquired == [6500.0]
    np.testing.assert_array_equal(run.flat(0)[:, 0, 0], [t for s, t, e, _ in frames if s == "flat" and e == 6500.0])
