"""The command line: registration of two files, info, and one-line errors.

In-process (:func:`cli_run.run_cli`), except the one smoke test that starts ``python -m gpureg``.
"""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from cli_run import run_cli

import gpureg
from gpureg.cli import main
from gpureg.core import transform as tf


def _subprocess(*args):
    return subprocess.run([sys.executable, "-m", "gpureg", *args], capture_output=True, text=True, timeout=300)


_run = run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    shape = (40, 40, 40)
    m = tf.rotation_matrix(4, (1, 0, 1), tf.grid_center(shape))
    m[:3, 3] += [2.0, -1.0, 1.5]
    fixed, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    np.save(d / "fixed.npy", fixed)
    np.save(d / "labels.npy", labels)
    with h5py.File(d / "moving.h5", "w") as h5:
        h5["exchange/recon"] = gpureg.two_particle_phantom(shape, m)
    return d, m


def test_register_writes_matrix(pair):
    """The smoke test: a real ``python -m gpureg`` process (entry point, imports, exit code)."""
    d, truth = pair
    r = _subprocess("register", str(d / "fixed.npy"), str(d / "moving.h5"), "-o", str(d / "m.json"),
             "--aligned", str(d / "aligned.npy"), "--raw")
    assert r.returncode == 0, r.stderr
    doc = json.loads((d / "m.json").read_text())
    assert doc["binarize"] is False
    labels = np.load(d / "labels.npy")
    assert gpureg.displacement_error(np.array(doc["matrix"]), truth, mask=labels > 0)[0] < 0.1
    assert doc["mse_after"] < doc["mse_before"]
    assert np.load(d / "aligned.npy").shape == (40, 40, 40)


def test_register_binarizes_by_default_like_run(pair):
    """`gpureg register` registers Otsu-binarized volumes unless --raw (the same default as `gpureg run`)."""
    d, _ = pair
    r = _run("register", str(d / "fixed.npy"), str(d / "moving.h5"), "-o", str(d / "b.json"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads((d / "b.json").read_text())
    assert doc["binarize"] is True and "binarized" in r.stdout
    fixed, moving = np.load(d / "fixed.npy"), h5py.File(d / "moving.h5", "r")["exchange/recon"][...]
    binarized = gpureg.register_affine(fixed, moving, device="cpu").matrix
    grey = gpureg.register_affine(fixed, moving, device="cpu", prep=gpureg.Prep(binarize=False)).matrix
    assert np.abs(grey - binarized).max() > 1e-3          # the two modes differ on this pair...
    np.testing.assert_allclose(doc["matrix"], binarized, atol=1e-9)   # ...and the CLI default is the binarized one
    # (its accuracy is register_affine's, held to 0.05-0.2 voxel in tests/register/test_accuracy.py)


def test_version_and_plain_flags():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gpureg {gpureg.__version__}"
    for command in ("run", "register", "watch", "demo", "xanes", "validate"):
        out = _run(command, "--help").stdout
        rows = [line for line in out.splitlines() if "--help" not in line]   # typer's own --help row keeps it
        assert "--" in out and not any("<bool>" in line for line in rows), (command, out)


def test_one_option_name_per_choice():
    """--edge, --center, --device, --raw, --denoise, --smooth... mean the same wherever they appear."""
    helps = {c: _run(c, "--help").stdout for c in ("run", "watch", "demo", "recon", "xanes", "register")}
    for command in ("run", "watch"):
        for option in ("--reference", "--raw", "--denoise", "--smooth", "--model", "--center", "--filter", "--edge",
                       "--no-report", "--overwrite", "--device"):
            assert option in helps[command], (command, option)
    assert "--edge" in helps["xanes"] and "--method" not in helps["xanes"]
    for command in ("run", "watch", "demo", "recon"):
        assert "<column|auto>" in helps[command], command
    for option in ("--raw", "--denoise", "--smooth", "--model"):
        assert option in helps["register"], option


def test_info_runs():
    r = _run("info")
    assert r.returncode == 0 and "numpy" in r.stdout and "astra" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["register", "missing.npy", "missing.npy"], "missing.npy: file not found"),
    (["register", "{d}/fixed.npy", "{d}/fixed.npy", "--device", "gpu"], "--device gpu was requested"),
    (["register", "{d}/fixed.npy", "{d}/fixed.npy", "-o", "{d}/no/such/dir/m.json"], "does not exist"),
])
def test_errors_are_one_line(pair, args, message):
    d, _ = pair
    if "gpu" in args and gpureg.gpu_available():
        pytest.skip("a GPU is present")
    r = _run(*[a.format(d=d) for a in args])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpureg: error:") and message in lines[0], r.stderr


def test_bad_choice_is_a_usage_error(pair):
    """Choices are Enums: typer refuses an unknown one before the command runs, naming the option and the choices."""
    d, _ = pair
    r = _run("register", f"{d}/fixed.npy", f"{d}/fixed.npy", "--model", "rigidish")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("gpureg: error: Invalid value for '--model'")
    assert "'affine'" in lines[0] and "'translation'" in lines[0]
    r = _run("run", "--raw", "true", "in.h5", "out.h5")  # a flag takes no value
    assert r.returncode == 2 and r.stderr.startswith("gpureg: error: Got unexpected extra argument")


def test_ctrl_c_exits_130_with_one_line(pair, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during a command: exit code 130, one line saying so, no output file."""
    from gpureg.register import affine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(affine, "register_affine", interrupted)
    d, _ = pair
    with pytest.raises(SystemExit) as exc:
        main(["register", str(d / "fixed.npy"), str(d / "fixed.npy"), "-o", str(tmp_path / "m.json")])
    assert exc.value.code == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("gpureg: interrupted")
    assert not (tmp_path / "m.json").exists()


def test_not_hdf5(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    with pytest.raises(SystemExit) as exc:
        main(["register", str(bad), str(bad)])
    assert exc.value.code == 2


def test_register_refuses_a_nan_volume_naming_the_file(pair, tmp_path, capsys):
    d, _ = pair
    vol = gpureg.two_particle_phantom((40, 40, 40))
    vol[3, 4, 5] = np.nan
    np.save(tmp_path / "holes.npy", vol)
    with pytest.raises(SystemExit) as exc:
        main(["register", str(d / "fixed.npy"), str(tmp_path / "holes.npy"), "-o", str(tmp_path / "m.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"gpureg: error: {tmp_path / 'holes.npy'}: 1 of 64000 voxels are NaN or inf (a volume to register must be finite)"
    assert not (tmp_path / "m.json").exists()
