"""A run you can trust (issue 15): bad energies, theta units, the output lock, the report, output
checks, file modes, the run log. Small simulated scans (24^3, 45 angles, 7 energies: a run is ~5 s)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_run import run_cli

import gpureg
from gpureg.io import write_dataexchange
from gpureg.io.results import ResultFile
from gpureg.pipeline import run
from gpureg.pipeline.files import sample_mask
from gpureg.xanes import edge_energy_map

ENERGIES = [6500.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    return gpureg.simulate(folder / "small.h5", size=24, n_angles=45, energies=ENERGIES)


def _variant(scan, folder, name, edit):
    path = Path(folder) / name
    shutil.copy(scan, path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def _zero_flat(h5):
    h5["exchange/data_white"][2] = 0  # 6548 eV


def _nan_data(h5):
    data = h5["exchange/data"][...].astype(np.float32)
    data[2] = np.nan
    del h5["exchange/data"]
    h5["exchange/data"] = data


def _edge_error(path):
    with h5py.File(path) as h5:
        e0, mask, truth = h5["xanes/edge_energy"][...], h5["xanes/mask"][...].astype(bool), h5["truth/edge_energy"][...]
    sel = mask & np.isfinite(truth) & np.isfinite(e0)
    return float(np.mean(np.abs(e0 - truth)[sel])), int(sel.sum()), int(np.isfinite(truth).sum())


_cli = run_cli  # in-process (the lock tests' first run is a real process)


# --- 3. bad energies and theta units -----------------------------------------------------

@pytest.mark.parametrize("edit, reason", [(_zero_flat, "flat field is zero"), (_nan_data, "projections are NaN")])
def test_bad_energy_stops_naming_energy_and_reason(scan, tmp_path, edit, reason):
    bad = _variant(scan, tmp_path, "bad.h5", edit)
    with pytest.raises(ValueError, match=f"6548 eV: {reason}.*skip_bad_energies=True") as exc:
        run(bad, tmp_path / "out.h5", report=False)
    assert len(str(exc.value).splitlines()) == 1
    assert not (tmp_path / "out.h5").exists()


def test_skip_bad_energies_excludes_records_and_warns(scan, tmp_path, caplog):
    bad = _variant(scan, tmp_path, "bad.h5", _zero_flat)
    with caplog.at_level("WARNING", logger="gpureg"):
        res = run(bad, tmp_path / "out.h5", skip_bad_energies=True)
    assert "leaving out 6548 eV" in caplog.text
    assert list(res.excluded) == [6548.0]
    with h5py.File(tmp_path / "out.h5") as h5:
        assert h5["registration/excluded"][...].tolist() == [e == 6548.0 for e in ENERGIES]
        assert "flat field is zero" in json.loads(h5["registration/excluded"].attrs["reasons"])["6548"]
    summary = json.loads((res.report_dir / "summary.json").read_text())
    assert summary["excluded_energies"] == [{"energy_ev": 6548.0, "reason": "flat field is zero (not above the dark)"}]
    assert "energy 6548 eV left out" in (res.report_dir / "report.md").read_text()
    # The maps are exactly those of the aligned stack without 6548 eV (the old code used the zero-flat energy:
    # 8.8 eV mean error; 3.0 eV without it, 0.57 eV with all 7 energies), and every particle voxel is mapped.
    with ResultFile(tmp_path / "out.h5") as rf:
        aligned, energies, e0 = rf.stack("aligned")[...], rf.energies(), rf.xanes()["edge_energy"]
    keep = energies != 6548.0
    # within the sample mask of the reference (the highest energy), as every run maps
    sample = sample_mask(aligned[int(np.argmax(energies))])
    np.testing.assert_array_equal(e0, edge_energy_map(aligned[keep], energies[keep], device="cpu",
                                                      mask=sample)["edge_energy"])
    _, mapped, particle = _edge_error(tmp_path / "out.h5")
    # every particle voxel inside the reference's sample mask is mapped: the Otsu mask leaves out a rim of
    # partial-volume voxels (8 of 467 truth voxels here, 1.7 %), nothing more
    assert mapped >= 0.97 * particle


@pytest.mark.parametrize("values, units, looks", [(np.deg2rad, "degrees", "radians"), (np.asarray, "rad", "degrees")])
def test_theta_units_checked_against_range(scan, tmp_path, values, units, looks):
    def edit(h5):
        th = np.linspace(-90.0, 90.0, 45)
        del h5["exchange/theta"]
        h5["exchange/theta"] = values(th)
        h5["exchange/theta"].attrs["units"] = units

    path = _variant(scan, tmp_path, "theta.h5", edit)
    with pytest.raises(ValueError, match=f"/exchange/theta is labelled '{units}'.*look like {looks}"):
        gpureg.open_input(path)


# --- 4. the output lock ------------------------------------------------------------------

HOLDER = """
import sys
import gpureg
def progress(event):
    if event["done"] == 2:
        print("holding", flush=True)
        sys.stdin.readline()
gpureg.run(sys.argv[1], sys.argv[2], report=False, progress=progress)
print("finished", flush=True)
"""


def test_second_run_on_same_output_is_refused_two_processes(scan, tmp_path):
    out = tmp_path / "out.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(scan), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "holding"  # blocks until the first run holds 2 energies
        second = _cli("run", scan, out, "--no-report")
        assert second.returncode == 2
        assert f"out.h5 is being written by PID {first.pid} on {socket.gethostname()}" in second.stderr
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("gpureg: error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr
        assert (tmp_path / "out.h5.partial").exists()  # the first run's state was not touched...
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()  # ...and it finishes normally
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    with h5py.File(out) as h5:
        assert h5.attrs["complete"]
    assert not (tmp_path / "out.h5.lock").exists()


def test_stale_lock_of_killed_run_is_taken_over(scan, tmp_path):
    out = tmp_path / "out.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(scan), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert first.stdout.readline().strip() == "holding"
    first.kill()
    first.wait(timeout=60)
    assert str(first.pid) in (tmp_path / "out.h5.lock").read_text()  # left behind by the killed run
    r = _cli("run", scan, out, "--no-report")
    assert r.returncode == 0, r.stderr
    assert f"stale lock of PID {first.pid}" in r.stderr and "resuming" in r.stderr


# --- 5. the report ---------------------------------------------------------------------

def test_report_written_before_final_rename_and_rebuilt(scan, tmp_path, monkeypatch):
    from gpureg.pipeline import runner

    def killed(*a, **k):
        raise KeyboardInterrupt  # killed while writing the report

    monkeypatch.setattr(runner, "write_report", killed)
    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        run(scan, out)
    assert not out.exists()  # no finished result without its report
    monkeypatch.undo()
    res = run(scan, out)     # the rerun finishes it
    assert (res.report_dir / "report.md").exists()
    shutil.rmtree(res.report_dir)
    r = _cli("report", out)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in res.report_dir.iterdir()}
    assert {"report.md", "summary.json", "mse_per_energy.png", "edge_energy_slice.png"} <= names


# --- 6, 7. outputs and inputs checked before any work --------------------------------------

def test_existing_folder_as_output_refused_before_work(scan, tmp_path):
    folder = tmp_path / "result.h5"
    folder.mkdir()
    for args in (["run", scan, folder, "--overwrite"], ["simulate", folder, "--size", "16", "--energies",
                                                        "6500,6540,6550,6560,6600"]):
        r = _cli(*args)
        assert r.returncode == 2 and "is an existing folder" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.h5"]
    assert not any(folder.iterdir())


def test_fewer_than_five_energies_with_chemistry_refused_before_anything_is_created(tmp_path):
    """Fewer than 5 energies give no edge maps: a plain run registers them (tests/pipeline/test_no_edge_maps.py);
    asked for reference fits or clusters, which cannot run either, it is refused before any work."""
    src = tmp_path / "in"
    src.mkdir()
    vols = [gpureg.two_particle_phantom((16, 16, 16)) * (1 + 0.1 * k) for k in range(4)]
    path = write_dataexchange(src / "four.h5", recon=vols, energy=[6500.0, 6540.0, 6550.0, 6600.0])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="four.h5: has 4 energies; reference fits and clusters"):
        run(path, out / "r.h5", clusters=2)
    assert list(out.iterdir()) == []


# --- 8, 9. file modes, the run log -------------------------------------------------------

@pytest.fixture(scope="module")
def kept_recon_run(scan, tmp_path_factory):
    """One finished run (``keep=("recon",)``) and a simulated scan, both written under umask 022: shared by the
    file-mode and the storage/report tests below (one pipeline run instead of two)."""
    folder = tmp_path_factory.mktemp("kept")
    old = os.umask(0o022)
    try:
        sim = gpureg.simulate(folder / "sim.h5", size=16, n_angles=8, energies=ENERGIES[:5])
        res = run(scan, folder / "out.h5", keep=("recon",))
    finally:
        os.umask(old)
    return sim, res


def test_outputs_readable_by_group_and_others_under_umask_022(kept_recon_run):
    sim, res = kept_recon_run
    files = [sim, res.output, res.output.with_name("out.log"), *res.report_dir.iterdir()]
    assert len(files) > 6
    for f in files:
        assert f.stat().st_mode & 0o044 == 0o044, (f, oct(f.stat().st_mode))


def test_progress_lines_devices_and_log_when_not_a_tty(scan, tmp_path):
    r = _cli("run", scan, tmp_path / "out.h5", "--no-report")  # stderr is a pipe here
    assert r.returncode == 0, r.stderr
    assert re.search(r"devices: registration on (cpu|gpu), FBP on (cpu|gpu)", r.stderr), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if " eV: " in ln]
    assert len(lines) == len(ENERGIES), r.stderr
    assert all("load" in ln for ln in lines) and sum("register" in ln and "MSE" in ln for ln in lines) == 6
    log = (tmp_path / "out.log").read_text()
    assert re.search(r"devices: registration on (cpu|gpu), FBP on (cpu|gpu)", log) and "6548.0 eV" in log and "finished" in log


# --- 10. output names, bench folder, resource estimates ------------------------------------

def test_register_refuses_non_matrix_suffix_before_work(tmp_path):
    np.save(tmp_path / "a.npy", gpureg.two_particle_phantom((16, 16, 16)))
    r = _cli("register", tmp_path / "a.npy", tmp_path / "a.npy", "-o", tmp_path / "out.txt")
    assert r.returncode == 2 and "out.txt: -o/--output (the matrix) must be a .json / .h5" in r.stderr, r.stderr
    assert not (tmp_path / "out.txt").exists()


def test_simulate_too_big_is_refused_with_numbers(tmp_path):
    r = _cli("simulate", tmp_path / "big.h5", "--size", "2000")
    assert r.returncode == 2, r.stderr
    assert re.search(r"simulated scan of size 2000 .*needs about [\d.]+ GiB of memory, only [\d.]+ GiB is available",
                     r.stderr), r.stderr
    if not gpureg.gpu_available():
        assert "GPU" not in r.stderr
    assert not (tmp_path / "big.h5").exists()


def test_bench_writes_results_to_out(tmp_path, monkeypatch):
    import subprocess as sp

    from typer.testing import CliRunner

    from gpureg.cli import app

    calls = []
    monkeypatch.setattr(sp, "call", lambda args, env=None: calls.append(env["GPUREG_BENCH_OUT"]) or 0)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["bench", "xanes", "--quick"])
    assert r.exit_code == 0, r.output
    assert calls == [str(tmp_path.resolve())]  # default: the current folder, not bench/results of the source tree
    r = CliRunner().invoke(app, ["bench", "xanes", "--quick", "--out", str(tmp_path / "res")])
    assert r.exit_code == 0 and calls[-1] == str((tmp_path / "res").resolve())


# --- units, storage, figures ----------------------------------------------------------------

def test_voxel_size_compression_keep_and_report_statistic(kept_recon_run):
    _, res = kept_recon_run
    with h5py.File(res.output) as h5:
        assert h5.attrs["voxel_size_nm"] == pytest.approx(3200.0 / 24)   # simulate's voxel size, kept
        assert "aligned" not in h5 and json.loads(h5.attrs["dropped"]) == ["aligned"]
        assert h5["recon"].attrs["compression"] == "blosc2-zstd:1" and h5["recon"].chunks[0] == 1
        assert "xanes/edge_energy" in h5
    summary = json.loads((res.report_dir / "summary.json").read_text())
    report = (res.report_dir / "report.md").read_text()
    assert "voxel size 133.3 nm" in report
    # report.md and the MSE figure's title quote one statistic, computed once
    assert f"median over energies of MSE before/after: x{summary['mse_ratio_median']:.3g}" in report
    assert "binarized, smoothed volumes" in report


def test_maps_have_micrometre_axes_scale_bar_and_rows_per_particle(tmp_path):
    from matplotlib.image import imread
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from gpureg.figures import orthogonal_slices
    from gpureg.figures.common import new_figure, physical_axes

    fig, ax = new_figure((4, 4), 50)
    ax.imshow(np.zeros((24, 24)))
    physical_axes(ax, 3200.0 / 24, ("y", "x"))
    assert ax.get_xlabel() == "x (\u00b5m)" and ax.get_ylabel() == "y (\u00b5m)"
    assert any(isinstance(a, AnchoredSizeBar) for a in ax.artists)
    vol = np.full((24, 24, 24), np.nan)
    vol[4:9, 4:9, 4:9], vol[15:20, 15:20, 15:20] = 6550.0, 6552.0
    path = orthogonal_slices(vol, tmp_path / "o.png", center=[(6, 6, 6), (17, 17, 17)], dpi=50, voxel_nm=100.0)
    assert imread(path).shape[0] == round(2 * 4.4 * 50)  # one row through each particle's centre
