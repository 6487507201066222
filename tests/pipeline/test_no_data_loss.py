"""Nothing lost (issue 24, items 2 and 3): an output that is the input (same file, also through a symlink or a
hard link) is refused by every command, even with --overwrite; an existing output is replaced only with
--overwrite; a symlinked output is written through to its target. CLI in-process; tiny inputs (16^3)."""

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.cli import main


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    return gpureg.simulate(folder / "in.h5", size=16, n_angles=25, energies=[6500.0, 6540.0, 6552.0, 6570.0, 6600.0])


def _digest(path):
    return hashlib.blake2b(Path(path).read_bytes()).hexdigest()


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.err


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("command", [["run", "--overwrite", "--no-report"], ["recon"], ["recon", "--overwrite"]])
def test_output_that_is_the_input_is_refused(scan, tmp_path, capsys, command, link):
    before = _digest(scan)
    if link == "same":
        target = scan
    else:
        target = tmp_path / "alias.h5"
        (os.symlink if link == "symlink" else os.link)(scan, target)
    code, err = _cli(capsys, command[0], scan, target, *command[1:])
    assert code == 2, err
    assert "is the input" in err and "writing it would destroy the input" in err and len(err.strip().splitlines()) <= 2
    assert _digest(scan) == before


def test_register_and_xanes_refuse_their_input_as_output(tmp_path, capsys):
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3:9, 3:9, 3:9] = 1
    np.save(tmp_path / "f.npy", vol)
    np.save(tmp_path / "m.npy", vol)
    before = _digest(tmp_path / "m.npy")
    code, err = _cli(capsys, "register", tmp_path / "f.npy", tmp_path / "m.npy", "-o", tmp_path / "m.json",
                     "--aligned", tmp_path / "m.npy", "--overwrite")
    assert code == 2 and "m.npy: is the input" in err
    assert _digest(tmp_path / "m.npy") == before


@pytest.mark.parametrize("command", [
    lambda scan, d: ["recon", scan, d / "existing.h5"],
    lambda scan, d: ["simulate", d / "existing.h5", "--size", "8", "--energies", "6500,6540,6552,6570,6600"],
    lambda scan, d: ["register", d / "f.npy", d / "m.npy", "-o", d / "new.json", "--aligned", d / "existing.h5"],
    lambda scan, d: ["register", d / "f.npy", d / "m.npy", "-o", d / "existing.json"],
])
def test_existing_output_needs_overwrite(scan, tmp_path, capsys, command):
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3:9, 3:9, 3:9] = 1
    np.save(tmp_path / "f.npy", vol)
    np.save(tmp_path / "m.npy", vol)
    for name in ("existing.h5", "existing.json"):
        (tmp_path / name).write_text("precious")
    code, err = _cli(capsys, *command(scan, tmp_path))
    assert code == 2, err
    assert "exists; pass --overwrite to replace it" in err
    assert (tmp_path / "existing.h5").read_text() == "precious" and (tmp_path / "existing.json").read_text() == "precious"
    assert not (tmp_path / "new.json").exists()


def test_symlinked_output_is_written_through(scan, tmp_path, capsys):
    target = tmp_path / "store" / "recon.h5"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "recon.h5"
    os.symlink(target, link)
    code, err = _cli(capsys, "recon", scan, link, "--overwrite", "--device", "cpu")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    with h5py.File(target) as h5:
        assert h5["exchange/recon"].shape[0] == 5


def test_input_checksum_is_the_content_hash_b2sum_prints(scan, tmp_path):
    import shutil
    import subprocess

    from gpureg.pipeline import file_checksum

    copy = tmp_path / "renamed copy.h5"
    shutil.copy(scan, copy)
    assert file_checksum(copy) == file_checksum(scan) == hashlib.blake2b(Path(scan).read_bytes()).hexdigest()
    if shutil.which("b2sum"):
        assert subprocess.run(["b2sum", str(scan)], capture_output=True, text=True).stdout.split()[0] == \
            file_checksum(scan)
