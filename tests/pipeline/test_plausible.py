"""Physically implausible inputs stop the run with one line (issue 24, item 4): one or two projection angles,
angles covering under 180 degrees (parallel beam), energies in keV labelled eV; `--allow-limited-angles`
reconstructs anyway. Refused before anything is written. Tiny scans (16^3)."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.cli import main
from gpureg.pipeline import run

ENERGIES = [6500.0, 6540.0, 6552.0, 6570.0, 6600.0]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return gpureg.simulate(tmp_path_factory.mktemp("scan") / "in.h5", size=16, n_angles=25, energies=ENERGIES)


def _variant(scan, folder, edit):
    path = Path(folder) / "variant.h5"
    shutil.copy(scan, path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def _angles(keep=None, theta=None):
    def edit(h5):
        data = h5["exchange/data"][...]
        th = h5["exchange/theta"][...] if theta is None else np.asarray(theta, float)
        idx = np.arange(th.size) if keep is None else np.asarray(keep)
        del h5["exchange/data"], h5["exchange/theta"]
        h5["exchange/data"] = data[:, idx]
        h5["exchange/theta"] = th[idx]
        h5["exchange/theta"].attrs["units"] = "degrees"
    return edit


@pytest.mark.parametrize("edit, says", [
    (_angles(keep=[12]), r"1 projection angle for a \d+-pixel-wide detector \(at least \d+ needed\)"),
    (_angles(keep=[0, 12]), r"2 projection angles for a \d+-pixel-wide detector"),
    (_angles(theta=np.linspace(-45.0, 45.0, 25)), r"the angles cover 94 degrees \(parallel beam needs 180\)"),
])
def test_too_few_angles_or_limited_range_refused(scan, tmp_path, edit, says):
    path = _variant(scan, tmp_path, edit)
    with pytest.raises(ValueError, match=f"variant.h5: {says}.*allow_limited_angles=True") as exc:
        run(path, tmp_path / "out.h5", report=False)
    assert len(str(exc.value).splitlines()) == 1
    assert not list(tmp_path.glob("out.h5*"))


def test_allow_limited_angles_reconstructs_with_a_warning(scan, tmp_path, capsys):
    path = _variant(scan, tmp_path, _angles(theta=np.linspace(-45.0, 45.0, 25)))
    with pytest.raises(SystemExit) as exc:
        main(["recon", str(path), str(tmp_path / "r.h5")])
    assert exc.value.code == 2 and "--allow-limited-angles" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["recon", str(path), str(tmp_path / "r.h5"), "--allow-limited-angles", "--device", "cpu"])
    assert exc.value.code == 0
    assert "the angles cover 94 degrees (parallel beam needs 180); continuing" in capsys.readouterr().err


def test_kev_energies_labelled_ev_refused(scan, tmp_path):
    def edit(h5):
        e = h5["exchange/energy"][...] / 1000.0
        del h5["exchange/energy"]
        h5["exchange/energy"] = e
        h5["exchange/energy"].attrs["units"] = "eV"

    path = _variant(scan, tmp_path, edit)
    with pytest.raises(ValueError, match=r"/exchange/energy: energies 6\.5\.\.6\.6 eV \(units: ev\) are outside "
                                         r"100 eV - 100 keV; these look like keV"):
        run(path, tmp_path / "out.h5", report=False)
    assert not list(tmp_path.glob("out.h5*"))
