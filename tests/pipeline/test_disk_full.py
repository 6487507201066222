"""A full disk (issue 24, item 1): the run stops at once with one line, nothing is flagged done that was not
written, ``complete`` only after a verified close, and a rerun after freeing space resumes to the same bytes.

The disk is a small tmpfs mounted in the test's folder when this process may mount (root in a container); else
the free space the run sees is faked (the run's own checks, not HDF5's failure path, which needs a real disk).
Small simulated scan: 24^3, 31 angles, 7 energies (a run is a few seconds).
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.io.results import DiskFullError
from gpureg.io.results import store as store_mod
from gpureg.io.results.space import digest
from gpureg.pipeline import run

ENERGIES = [6500.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0]
ROOT = Path(__file__).resolve().parents[2]
STACKS = ("recon", "aligned", "registration/matrix", "registration/mse_after", "xanes/edge_energy", "xanes/mask")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    return gpureg.simulate(folder / "small.h5", size=24, n_angles=31, energies=ENERGIES)


@pytest.fixture(scope="module")
def clean(scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.h5"
    run(scan, out, report=False)
    return out


@contextlib.contextmanager
def _small_disk(folder, size_mb):
    """A tmpfs of ``size_mb`` MB at ``folder``; ``None`` when this process may not mount."""
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(folder)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder, leave):
    """Fill ``folder``'s file system up to ``leave`` bytes free (file ``filler``)."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


def _assert_same(a, b, names=STACKS):
    with h5py.File(a) as x, h5py.File(b) as y:
        for name in names:
            assert np.array_equal(x[name][...], y[name][...], equal_nan=True), name


def _assert_done_were_written(partial, clean):
    """Every energy flagged done in ``partial`` was written: its reconstruction and fit are the clean run's, and its
    aligned volume is the one its digest was taken of (the clean run's final /aligned went on through the series
    smoothing of the transforms, so it is not the per-energy one). Returns how many are flagged."""
    with h5py.File(partial) as p, h5py.File(clean) as c:
        done = p["registration/done"][...]
        assert not p.attrs["complete"]
        fits = c["registration/matrix_raw"] if "registration/matrix_raw" in c else c["registration/matrix"]
        for i in np.flatnonzero(done):
            assert np.array_equal(p["recon"][i], c["recon"][i]), i
            assert np.array_equal(p["registration/matrix"][i], fits[i]), i
            assert digest(p["recon"][i], p["aligned"][i]).encode() == p["registration/digest"][i], i
        return int(done.sum())


def test_full_disk_stops_with_one_line_and_resumes_bit_for_bit(scan, clean, tmp_path, monkeypatch):
    with _small_disk(tmp_path / "disk", 16) as disk:
        folder = disk or tmp_path / "disk"
        out = folder / "res.h5"
        state = {"n": 0}

        def progress(event):
            state["n"] = event["done"]
            if event["done"] == 3:
                if disk is not None:
                    _fill(folder, 200_000)  # someone else fills the disk: 0.2 MB left
                else:
                    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1))

        with pytest.raises(DiskFullError, match=r"^disk full: [\d.]+ MB needed, [\d.]+ MB free on .*disk") as exc:
            run(scan, out, report=False, progress=progress)
        assert len(str(exc.value).splitlines()) == 1
        assert not out.exists() and (folder / "res.h5.partial").exists()
        assert not list(folder.glob(".*reserve"))  # the reserve was given back
        assert _assert_done_were_written(folder / "res.h5.partial", clean) == 3
        if disk is not None:
            os.unlink(folder / "filler")
        else:
            monkeypatch.undo()
        res = run(scan, out, report=False)
        assert res.resumed == 3
        _assert_same(out, clean)
        with h5py.File(out) as h5:
            assert h5.attrs["complete"]


FAILING_WRITES = """
import sys
import gpureg
from gpureg.io.results import store
store.ResultStore._check_space = lambda self, upper: None   # let HDF5 itself hit the full disk
def progress(event):
    if event["done"] == 3:
        with open(sys.argv[3], "wb") as fh:
            import shutil
            fh.write(b"\\0" * (shutil.disk_usage(sys.argv[3].rsplit("/", 1)[0]).free - 30_000))
from gpureg.pipeline import run
try:
    run(sys.argv[1], sys.argv[2], report=False, progress=progress)
except gpureg.io.results.DiskFullError as exc:
    print("error:", exc, file=sys.stderr)
    sys.exit(2)
"""


def test_hdf5_write_failure_closes_cleanly_and_resumes(scan, clean, tmp_path):
    """HDF5's own failed write (no early check): exit 2 with one line, no crash, done flags true, resumable."""
    with _small_disk(tmp_path / "disk", 16) as disk:
        if disk is None:
            pytest.skip("needs a small file system (mount -t tmpfs), not permitted here")
        out, filler = disk / "res.h5", disk / "filler"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", FAILING_WRITES, str(scan), str(out), str(filler)],
                           capture_output=True, text=True, timeout=300, env=env, check=False)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "error: disk full:" in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
        done = _assert_done_were_written(disk / "res.h5.partial", clean)
        assert 3 <= done < len(ENERGIES)
        os.unlink(filler)
        res = run(scan, out, report=False)
        assert res.resumed == done
        _assert_same(out, clean)


def test_a_failed_close_never_leads_to_a_rename(scan, tmp_path, monkeypatch):
    """Issue 23 item 7: the old close swallowed every error and the run renamed the file anyway."""
    real = store_mod.ResultStore.close

    def failing(self, **kw):
        real(self, **kw)
        if kw.get("release") is False:  # the close of finish(): as if the last flush had failed
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod.ResultStore, "close", failing)
    with pytest.raises(OSError, match="Input/output error"):
        run(scan, tmp_path / "out.h5", report=False)
    assert not (tmp_path / "out.h5").exists() and (tmp_path / "out.h5.partial").exists()
    with h5py.File(tmp_path / "out.h5.partial") as h5:
        assert not h5.attrs["complete"]
    assert not list(tmp_path.glob(".*reserve"))
