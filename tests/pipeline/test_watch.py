"""Watch mode as a beamtime uses it (issue 15): writers' temp files, stray and unfinished files, restarts.

Everything is driven without sleeps: the files are in place before the watcher
scans, or are written from its ``on_energy`` callback (settle=0, poll=0).
"""

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.io import write_dataexchange
from gpureg.pipeline.watch import is_temporary, watch_folder as watch

ENERGIES = [6500.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0]


@pytest.fixture(scope="module")
def per_energy(tmp_path_factory):
    """One Data Exchange projection file per energy, split from a small simulated scan (24^3, 45 angles)."""
    folder = tmp_path_factory.mktemp("split")
    scan = gpureg.simulate(folder / "small.h5", size=24, n_angles=45, energies=ENERGIES)
    files = []
    with gpureg.open_input(scan) as r:
        for i, e in enumerate(r.energies):
            files.append(write_dataexchange(folder / f"e{i:02d}_{e:.0f}eV.h5", data=[r.projections(i)],
                                            data_white=[r.flat(i)], data_dark=r.dark(), theta=r.theta, energy=[e]))
    return files


def _deliver(src, inbox, *, keep_temp=False):
    """A careful writer: copy to a hidden temp name, rename when complete (optionally leaving a temp copy)."""
    tmp = inbox / f".{src.name}"
    shutil.copy(src, tmp)
    if keep_temp:
        shutil.copy(src, inbox / f"{src.name}.part")
        shutil.copy(tmp, inbox / f".{src.name}.keep")
    tmp.rename(inbox / src.name)


def test_temporary_names():
    assert all(is_temporary(n) for n in (".e01.h5", ".e01.h5.x12.tmp", "e01.h5.part", "~e01.h5", "e01.tmp"))
    assert not any(is_temporary(n) for n in ("e01.h5", "scan_6552eV.h5", "DONE"))


def test_watch_survives_temp_writers_stray_file_and_restart(per_energy, tmp_path, caplog):
    inbox, out = tmp_path / "inbox", tmp_path / "live.h5"
    inbox.mkdir()
    (inbox / "notes.h5").write_text("not an energy file")         # a stray file
    (inbox / "~scratch.h5").write_bytes(b"\0" * 64)
    for src in per_energy[:3]:
        _deliver(src, inbox, keep_temp=True)                       # temp copies of the same energies lie around

    class Crash(Exception):
        pass

    def crash_at_3(ev):
        if ev["count"] == 3:
            raise Crash

    caplog.set_level(logging.WARNING, logger="gpureg")
    with pytest.raises(Crash):
        watch(inbox, out, sentinel="DONE", poll=0, settle=0, report=False, on_energy=crash_at_3)
    state = sorted(p.name for p in (tmp_path / "live.h5.watch").glob("*.npz"))
    assert len(state) == 3
    for src in per_energy[3:]:
        _deliver(src, inbox, keep_temp=True)
    (inbox / "DONE").touch()
    seen = []
    res = watch(inbox, out, sentinel="DONE", poll=0, settle=0, report=False, on_energy=seen.append)  # restart
    assert sorted(ev["source"] for ev in seen) == sorted(p.name for p in per_energy[3:])  # each new one once
    np.testing.assert_array_equal(res.energies, ENERGIES)
    assert "skipping notes.h5" in caplog.text and "same energy" not in caplog.text
    with h5py.File(out) as h5:
        assert h5.attrs["complete"] and h5["xanes/edge_energy"].shape == (24, 24, 24)
    # --overwrite forgets the earlier watch's state and starts over
    seen.clear()
    res = watch(inbox, out, expect=len(ENERGIES), poll=0, settle=0, report=False, overwrite=True,
                on_energy=seen.append)
    assert len(seen) == len(ENERGIES) and not (tmp_path / "live.h5.lock").exists()


def test_unfinished_file_is_retried_not_fatal(per_energy, tmp_path, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for src in per_energy[1:]:
        shutil.copy(src, inbox / src.name)
    last = per_energy[0]  # scanned first
    data = last.read_bytes()
    (inbox / last.name).write_bytes(data[: len(data) // 3])   # a writer that does not use a temp name, mid-copy

    def finish_copy(ev):
        if ev["count"] == 2:                                  # later, the copy completes
            (inbox / last.name).write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="gpureg"):
        res = watch(inbox, tmp_path / "out.h5", expect=len(ENERGIES), poll=0, settle=0, report=False,
                    on_energy=finish_copy)
    assert f"skipping {last.name}" in caplog.text
    np.testing.assert_array_equal(res.energies, ENERGIES)


def test_watch_ends_on_idle_timeout_with_a_stray_file(per_energy, tmp_path, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for src in per_energy:
        shutil.copy(src, inbox / src.name)
    (inbox / "notes.h5").write_text("stray")
    with caplog.at_level(logging.WARNING, logger="gpureg"):
        res = watch(inbox, tmp_path / "out.h5", idle_timeout=0.0, poll=0, settle=0, report=False)
    assert len(res.energies) == len(ENERGIES)
    assert "no new energy for 0 s" in caplog.text and "skipping notes.h5" in caplog.text


def test_watch_interrupted_says_how_to_resume(per_energy, tmp_path, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(per_energy[0], inbox / per_energy[0].name)

    def interrupt(ev):
        raise KeyboardInterrupt

    with caplog.at_level(logging.WARNING, logger="gpureg"), pytest.raises(KeyboardInterrupt):
        watch(inbox, tmp_path / "out.h5", sentinel="DONE", poll=0, settle=0, report=False, on_energy=interrupt)
    assert "watch interrupted with 1 energies done" in caplog.text and "again to resume" in caplog.text
    assert not Path(tmp_path / "out.h5.lock").exists()


def test_a_file_of_another_detector_size_is_skipped_recorded_and_watch_goes_on(per_energy, tmp_path, caplog):
    """Issue 24 item 7: one bad file (32 x 31-like detector) no longer stops watch for good."""
    import json

    inbox, out = tmp_path / "inbox", tmp_path / "live.h5"
    inbox.mkdir()
    with gpureg.open_input(per_energy[0]) as r:  # another energy, one detector column fewer
        write_dataexchange(inbox / "e99_6560eV.h5", data=[r.projections(0)[..., :-1]],
                           data_white=[r.flat(0)[..., :-1]], data_dark=r.dark()[..., :-1], theta=r.theta, energy=[6560.0])
    for src in per_energy:
        _deliver(src, inbox)
    (inbox / "DONE").touch()
    caplog.set_level(logging.WARNING, logger="gpureg")
    res = watch(inbox, out, sentinel="DONE", poll=0, settle=0, report=True)
    np.testing.assert_array_equal(res.energies, ENERGIES)
    assert "skipping e99_6560eV.h5 for now (its volume is" in caplog.text
    with h5py.File(out) as h5:
        skipped = json.loads(h5.attrs["skipped_inputs"])
        assert list(skipped) == ["e99_6560eV.h5"] and "the first energy's" in skipped["e99_6560eV.h5"]
        assert h5.attrs["input"] == str(inbox)
    summary = json.loads((res.report_dir / "summary.json").read_text())
    assert list(summary["skipped_inputs"]) == ["e99_6560eV.h5"]
    assert "input file e99_6560eV.h5 left out" in (res.report_dir / "report.md").read_text()
    assert not (tmp_path / "live.h5.watch").exists()  # removed once the result is complete
