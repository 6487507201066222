"""Inputs read through a real Tiled server (issue 28): ``tiled serve directory`` over files of each layout.

Skipped without the ``live`` extra. The server runs on a free 127.0.0.1 port for
the module and is torn down after.
"""

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_run import run_cli

pytest.importorskip("tiled.client")
pytest.importorskip("tiled.server")

import gpureg
from gpureg.core.errors import InputError
from gpureg.io import open_input

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiled_servers
import tiled_servers
from tiled_servers import KEY

SIZE, N_ANGLES = 16, 21
ENERGIES = np.array([6500.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One scan as Data Exchange, FXI per-energy files and NXtomo (one entry per energy), served by Tiled."""
    folder = tmp_path_factory.mktemp("served")
    files = folder / "files"
    files.mkdir()
    scan = gpureg.simulate(files / "scan.h5", size=SIZE, energies=ENERGIES, n_angles=N_ANGLES, seed=5)
    with h5py.File(scan, "r") as h5:
        a = {k: h5["exchange"][k][()] for k in ("data", "data_white", "data_dark", "theta", "energy")}
    (files / "fxi").mkdir()
    for k, e in enumerate(a["energy"]):
        with h5py.File(files / "fxi" / f"fly_scan_id_{100 + k}.h5", "w") as h5:
            h5["img_tomo"], h5["img_bkg"], h5["img_dark"] = a["data"][k], a["data_white"][k], a["data_dark"]
            h5["angle"], h5["X_eng"], h5["Pixel Size"] = a["theta"], e / 1000.0, "21.3nm"
    with h5py.File(files / "nx.h5", "w") as h5:
        for k, e in enumerate(a["energy"]):
            g = h5.create_group(f"entry{k:04d}")
            g.attrs["NX_class"] = "NXentry"
            det = g.create_group("instrument/detector")
            det["data"] = np.concatenate([a["data_dark"], a["data_white"][k], a["data"][k]])
            det["image_key"] = np.repeat([2, 1, 0], [len(a["data_dark"]), len(a["data_white"][k]), N_ANGLES])
            g["sample/rotation_angle"] = np.concatenate([np.zeros(len(a["data_dark"]) + len(a["data_white"][k])),
                                                         a["theta"]])
            g["sample/rotation_angle"].attrs["units"] = "degree"
            g["instrument/monochromator/energy"] = e
            g["instrument/monochromator/energy"].attrs["units"] = "eV"
    server = tiled_servers.directory(files, folder / "tiled.log")
    os.environ["TILED_API_KEY"] = KEY
    try:
        yield {"uri": server.uri, "files": files, "folder": folder, "a": a}
    finally:
        os.environ.pop("TILED_API_KEY", None)
        server.stop()


def _displacement(m1, m2):
    """Largest distance (voxels) between where two affines send the grid's corners (bounds the whole grid)."""
    corners = np.array([[z, y, x, 1.0] for z in (0, SIZE - 1) for y in (0, SIZE - 1) for x in (0, SIZE - 1)])
    return float(np.max(np.linalg.norm(corners @ (np.asarray(m1) - np.asarray(m2)).T, axis=1)))


def test_run_on_a_served_file_equals_run_on_the_file(served, tmp_path):
    """The must-hold of issue 28: same matrices (1e-4 voxel) and edge map (1e-3 eV) through Tiled as from the file.

    Both read the same integer counts (the server sends the file's bytes), so the results are in fact identical;
    the tolerances are the issue's.
    """
    by_file = gpureg.run(served["files"] / "scan.h5", tmp_path / "file.h5", report=False)
    by_uri = gpureg.run(f"{served['uri']}/scan", tmp_path / "uri.h5", report=False)
    worst = max(_displacement(a, b) for a, b in zip(by_file.matrices, by_uri.matrices))
    assert worst <= 1e-4, f"registrations differ by {worst:.2e} voxel"
    with h5py.File(tmp_path / "file.h5") as f, h5py.File(tmp_path / "uri.h5") as u:
        ef, eu = f["xanes/edge_energy"][()], u["xanes/edge_energy"][()]
        assert u.attrs["input"] == f"{served['uri']}/scan"
    np.testing.assert_array_equal(np.isnan(ef), np.isnan(eu))
    assert np.nanmax(np.abs(ef - eu)) <= 1e-3


@pytest.mark.parametrize("path, layout", [("fxi", "FXI"), ("nx", "NXtomo"), ("scan", "Data Exchange")])
def test_each_layout_reads_the_same_through_tiled(served, path, layout):
    local = served["files"] / ("nx.h5" if path == "nx" else "scan.h5" if path == "scan" else path)
    with open_input(f"{served['uri']}/{path}") as r, open_input(local) as f:
        assert layout in r.layout and str(r.path) == f"{served['uri']}/{path}"
        np.testing.assert_allclose(r.energies, ENERGIES, atol=1e-6)
        np.testing.assert_array_equal(r.theta, f.theta)
        for i in (0, 3):
            np.testing.assert_array_equal(r.projections(i), f.projections(i))
            np.testing.assert_array_equal(r.flat(i), f.flat(i))
            np.testing.assert_array_equal(r.dark(i), f.dark(i))
        assert r.pixel_size_nm == f.pixel_size_nm


def test_short_uri_form_and_sub_node(served):
    host = served["uri"].split("/api/")[0].replace("http://", "tiled+http://")
    with open_input(f"{host}/fxi") as r:
        assert r.n_energy == len(ENERGIES)


def test_not_a_tomography_container_says_what_it_holds(served):
    shape = rf"\(7, {N_ANGLES}, {SIZE}, {SIZE}\)"
    with pytest.raises(InputError, match=rf"scan/exchange/data: holds an array of shape {shape}.*expected a "
                                         r"tomography container"):
        open_input(f"{served['uri']}/scan/exchange/data")
    with pytest.raises(InputError, match=r"scan/exchange: holds a container of .* entries \(.*data.*\); expected"):
        open_input(f"{served['uri']}/scan/exchange")


def test_credentials_and_unreachable_server(served, tmp_path, monkeypatch):
    from gpureg.io.tiled import use_api_key_file

    monkeypatch.delenv("TILED_API_KEY")
    with pytest.raises(InputError, match="requires an API key and none was given: set TILED_API_KEY or pass "
                                         "--api-key-file"):
        open_input(f"{served['uri']}/scan")
    monkeypatch.setenv("TILED_API_KEY", "not-the-key")
    with pytest.raises(InputError, match=r"refused the API key from TILED_API_KEY \(HTTP 401\)"):
        open_input(f"{served['uri']}/scan")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    use_api_key_file(key_file)
    try:
        with open_input(f"{served['uri']}/scan") as r:  # the file wins over the (wrong) variable
            assert r.n_energy == len(ENERGIES)
    finally:
        use_api_key_file(None)
    port = tiled_servers.free_port()
    with pytest.raises(InputError, match=f"Tiled server at 127.0.0.1:{port} unreachable"):
        open_input(f"http://127.0.0.1:{port}/api/v1/metadata/scan")


def test_cli_info_with_key_file_never_shows_the_key(served, tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    monkeypatch.setattr("gpureg.io.tiled._KEY_FILE", None)  # --api-key-file sets it for the process: restored after
    out = run_cli("info", f"{served['uri']}/fxi", "--api-key-file", key_file)
    assert out.returncode == 0, out.stderr
    assert "NSLS-II FXI 18-ID" in out.stdout and "energies    7:" in out.stdout
    assert KEY not in out.stdout + out.stderr


def test_a_server_without_streaming_refuses_the_subscription_and_releases_the_waiter(served):
    """``tiled serve directory`` has no streaming cache: the websocket is refused (HTTP 500 in Tiled 0.2.20); the
    wake-up says so and releases its waiter, and ``gpureg watch`` goes on polling."""
    import stamina
    from tiled.client import from_uri

    from gpureg.io.tiled_stream import Wakeup

    wake = Wakeup()
    try:
        with stamina.set_testing(True, attempts=1):  # the client's websocket retries, made immediate
            wake.follow("root", from_uri(served["uri"], api_key=KEY))
            assert wake.wait(60)  # a hang guard: the refusal releases it at once
        assert wake.refused and not wake.live
    finally:
        wake.close()
