"""A scan whose energies cannot give an edge map (a quick check scan: 5 energies, 20 eV steps) still gives its
registration: the result is written without ``/xanes``, says why, and every reader of a result copes."""

import json

import h5py
import numpy as np
import pytest
from cli_run import run_cli

import gpureg
from gpureg.core import InputError
from gpureg.io import write_dataexchange
from gpureg.pipeline import run
from gpureg.pipeline.watch import watch_folder

SIZE = 32
COARSE = np.arange(6500.0, 6581.0, 20.0)  # 6500..6580 eV: Larch's ranges leave only 6540 eV between them


def _volumes(energies):
    """Two particles, an edge at 6550 eV, and a translation growing away from the highest energy."""
    shifts = [np.array([0.8, -0.6, 0.5]) * (energies.max() - e) / 80.0 for e in energies]
    vols = [gpureg.two_particle_phantom((SIZE,) * 3, _shift(s)) * (0.3 + 0.7 / (1 + np.exp(-(e - 6550.0) / 2.0)))
            for s, e in zip(shifts, energies)]
    return vols


def _shift(s):
    m = np.eye(4)
    m[:3, 3] = s
    return m


@pytest.fixture(scope="module")
def coarse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coarse")
    return write_dataexchange(folder / "recon.h5", recon=_volumes(COARSE), energy=COARSE)


@pytest.fixture(scope="module")
def cli_result(coarse, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "check.h5"
    return out, run_cli("run", coarse, out)


def test_cli_run_writes_the_registration_and_one_warning(cli_result):
    out, proc = cli_result
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "no edge maps" in line]
    assert len(warned) == 1 and "error" not in proc.stderr
    assert "no energy lies between" in warned[0] and str(out) in warned[0] and "--pre" in warned[0]
    with h5py.File(out) as h5:
        assert h5.attrs["complete"] and "xanes" not in h5 and "xanes_global" not in h5
        assert "no energy lies between" in h5.attrs["xanes_skipped"]
        assert h5["registration/done"][...].all() and h5["aligned"].shape == (5, SIZE, SIZE, SIZE)
        before, after = h5["registration/mse_before"][:-1], h5["registration/mse_after"][:-1]
        assert h5["entry"].attrs["default"] == "aligned"  # NeXus views of what is there
    # the registration is real: every moved energy's MSE to the reference (binarized) falls at least 3x (8-50x here)
    assert np.all(after * 3 < before)
    assert not out.with_name(out.name + ".partial").exists()


def test_report_and_info_of_a_result_without_maps(cli_result):
    out, _ = cli_result
    report = out.with_name(out.stem + "_report")
    summary = json.loads((report / "summary.json").read_text())
    assert "no energy lies between" in summary["xanes_skipped"] and summary["particles"] == {}
    assert "**no edge maps**" in (report / "report.md").read_text()
    assert "mse_per_energy.png" in summary["figures"]
    info = run_cli("info", out)
    assert info.returncode == 0 and "maps        none (skipped: no energy lies between" in info.stdout
    assert "no energy lies between" in json.loads(run_cli("info", out, "--json").stdout)["xanes_skipped"]
    again = run_cli("report", out, "--outdir", out.parent / "again")
    assert again.returncode == 0, again.stderr


def test_gpureg_xanes_on_it_names_the_grid_in_one_line(cli_result):
    out, _ = cli_result
    proc = run_cli("xanes", out, out.parent / "maps.h5")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no energy lies between" in proc.stderr and "--pre LO,HI and --post LO,HI" in proc.stderr
    # the fix it names: ranges that leave 6540 eV between them give a map; the crossing of a 2 eV-wide step
    # centred at 6550 eV, sampled at 6540 and 6560 eV, is at 6550 eV by symmetry (0.5 eV: interpolation)
    proc = run_cli("xanes", out, out.parent / "maps.h5", "--pre", "6500,6520", "--post", "6560,6580")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out.parent / "maps.h5") as h5:
        edge = h5["xanes/edge_energy"][...][h5["xanes/mask"][...].astype(bool)]
    assert edge.size > 100 and abs(np.median(edge) - 6550.0) < 0.5


def test_viewer_loads_a_result_without_maps(cli_result):
    pytest.importorskip("dask")
    from gpureg.viewer.data import open_file, result_layers, voxel_spectrum

    out, _ = cli_result
    with open_file(out) as result:
        names = [kw["name"] for _, kw, _ in result_layers(result)]
        spectrum = voxel_spectrum(result, (SIZE // 2,) * 3)
    assert names[0] == "aligned" and not any("edge" in n for n in names)
    assert spectrum["mu"].shape == (5,) and np.isnan(spectrum["edge_energy"])


def test_too_few_energies_register_only(tmp_path):
    """(With --references/--clusters they are refused before any work: tests/pipeline/test_trust.py.)"""
    src = write_dataexchange(tmp_path / "three.h5", recon=_volumes(COARSE[::2]), energy=COARSE[::2])
    res = run(src, tmp_path / "out.h5", report=False)
    assert res.xanes_skipped == "3 energies; edge maps need at least 5" and res.mse_after.size == 3
    vols = _volumes(COARSE)
    vols[1][:] = np.nan  # 6520 eV reconstructs to NaN: left out, 4 usable energies remain
    src = write_dataexchange(tmp_path / "bad.h5", recon=vols, energy=COARSE)
    res = run(src, tmp_path / "skip.h5", report=False, skip_bad_energies=True)
    assert res.xanes_skipped == "only 4 usable energies (leaving out 6520 eV); edge maps need at least 5"


def test_rerun_after_the_old_failure_resumes_and_finishes(coarse, tmp_path, monkeypatch):
    """The bug's state: every energy registered, the maps failed, the .partial kept. A rerun resumes it. Other
    errors of the maps stage (here a stand-in for NaN input) still stop the run."""
    from gpureg.pipeline import runner

    def fails(*args, **kwargs):
        raise InputError("edge_energy_map: no voxel has a finite spectrum at every energy (all NaN/inf)")

    out = tmp_path / "out.h5"
    with monkeypatch.context() as m:
        m.setattr(runner, "map_run", fails)
        with pytest.raises(InputError, match="all NaN"):
            run(coarse, out, report=False)
    assert out.with_name("out.h5.partial").exists() and not out.exists()
    res = run(coarse, out, report=False)
    assert res.resumed == 5 and "no energy lies between" in res.xanes_skipped


def test_watch_finishes_the_series_without_maps(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for v, e in zip(_volumes(COARSE), COARSE):
        write_dataexchange(inbox / f"e_{e:.0f}.h5", recon=[v], energy=[e])
    res = watch_folder(inbox, tmp_path / "live.h5", expect=5, poll=0, settle=0, report=False)
    assert res.energies.size == 5 and "no energy lies between" in res.xanes_skipped
    with h5py.File(tmp_path / "live.h5") as h5:
        assert h5.attrs["complete"] and "xanes" not in h5 and "aligned" in h5



def test_published_without_maps_says_why(cli_result, monkeypatch):
    """``gpureg watch URI --publish``: the aligned stack and registration go to Tiled, no edge_energy, the reason
    in the metadata. The Tiled container is a recording stand-in (a real server: tests/pipeline/test_live.py)."""
    pytest.importorskip("pandas")
    pytest.importorskip("httpx")
    import gpureg.io.tiled_publish as tp

    class Node:
        structure_family = "container"

        def __init__(self, metadata=None):
            self.metadata, self.items = metadata, {}

        def __iter__(self):
            return iter(self.items)

        def create_container(self, key, metadata):
            self.items[key] = Node(metadata)
            return self.items[key]

        def write_array(self, array, key, metadata):
            self.items[key] = array

        write_dataframe = write_array

    root = Node()
    monkeypatch.setattr(tp, "connect", lambda uri: root)
    out, _ = cli_result
    assert tp.publish_result(out, "http://tiled/api/v1/metadata/x", run_uid="0123456789ab").endswith("gpureg_01234567")
    node = root.items["gpureg_01234567"]
    assert sorted(node.items) == ["aligned", "registration"]
    assert "no energy lies between" in node.metadata["xanes_skipped"]
