"""The command line: registration of two files, info, and one-line errors."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.core import transform as tf
from gpureg.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "gpureg", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    shape = (40, 40, 40)
    m = tf.rotation_matrix(4, (1, 0, 1), tf.grid_center(shape))
    m[:3, 3] += [2.0, -1.0, 1.5]
    np.save(d / "fixed.npy", gpureg.two_particle_phantom(shape))
    with h5py.File(d / "moving.h5", "w") as h5:
        h5["exchange/recon"] = gpureg.two_particle_phantom(shape, m)
    return d, m


def test_register_writes_matrix(pair):
    d, truth = pair
    r = _run("register", str(d / "fixed.npy"), str(d / "moving.h5"), "-o", str(d / "m.json"),
             "--aligned", str(d / "aligned.npy"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((d / "m.json").read_text())
    _, labels = gpureg.two_particle_phantom((40, 40, 40), return_labels=True)
    assert gpureg.displacement_error(np.array(doc["matrix"]), truth, mask=labels > 0)[0] < 0.1
    assert doc["mse_after"] < doc["mse_before"]
    assert np.load(d / "aligned.npy").shape == (40, 40, 40)


def test_info_runs():
    r = _run("info")
    assert r.returncode == 0 and "numpy" in r.stdout and "astra" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["register", "missing.npy", "missing.npy"], "missing.npy: file not found"),
    (["register", "{d}/fixed.npy", "{d}/fixed.npy", "--device", "gpu"], "device='gpu' was requested"),
    (["register", "{d}/fixed.npy", "{d}/fixed.npy", "-o", "{d}/no/such/dir/m.json"], "does not exist"),
    (["register", "{d}/fixed.npy", "{d}/fixed.npy", "--model", "rigidish"], "model must be one of"),
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


def test_not_hdf5(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    with pytest.raises(SystemExit) as exc:
        main(["register", str(bad), str(bad)])
    assert exc.value.code == 2
