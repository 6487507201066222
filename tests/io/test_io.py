"""Data Exchange I/O: round trips (single file, per-energy HDF5 and TIFF stacks), validation, atomic writes."""

import os

import h5py
import numpy as np
import pytest

from gpureg.core.errors import InputError
from gpureg.io import open_input, write_dataexchange

N_E, N_A, NY, NX = 3, 5, 6, 7


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 5000, size=(N_E, N_A, NY, NX)).astype(np.uint16)
    white = rng.integers(4000, 6000, size=(N_E, 2, NY, NX)).astype(np.uint16)
    dark = rng.integers(90, 110, size=(3, NY, NX)).astype(np.uint16)
    theta = np.linspace(-90, 90, N_A)
    energy = np.array([6540.0, 6550.0, 6560.0])
    return data, white, dark, theta, energy


def _write_raw(path, **datasets):
    """A hand-made HDF5 file (for malformed inputs)."""
    with h5py.File(path, "w") as h5:
        for name, value in datasets.items():
            h5[name] = value
    return path


def _valid_raw(path, **override):
    data, white, dark, theta, energy = _arrays()
    parts = {"exchange/data": data, "exchange/data_white": white, "exchange/data_dark": dark,
             "exchange/theta": theta, "exchange/energy": energy}
    parts.update(override)
    return _write_raw(path, **{k: v for k, v in parts.items() if v is not None})


def test_round_trip_single_file(tmp_path):
    data, white, dark, theta, energy = _arrays()
    truth = {"matrices": np.repeat(np.eye(4)[None], N_E, 0), "labels": np.ones((4, 4, 4), np.uint8),
             "note": "hello"}
    out = write_dataexchange(tmp_path / "scan.h5", data=data, data_white=white, data_dark=dark, theta=theta,
                             energy=energy, truth=truth, attrs={"parameters": {"a": 1}, "who": "test"})
    with open_input(out) as r:
        assert r.kind == "projections" and r.n_energy == N_E and r.shape == (N_A, NY, NX)
        assert r.recon_shape == (NY, NX, NX)
        np.testing.assert_array_equal(r.energies, energy)
        np.testing.assert_array_equal(r.theta, theta)
        for i in range(N_E):
            p = r.projections(i)
            assert p.dtype == np.float32 and p.shape == (N_A, NY, NX)
            np.testing.assert_array_equal(p, data[i])
            np.testing.assert_array_equal(r.flat(i), white[i])
        np.testing.assert_array_equal(r.dark(), dark)
        t = r.truth()
        np.testing.assert_array_equal(t["matrices"], truth["matrices"])
        assert t["matrices"].dtype == np.float64
        np.testing.assert_array_equal(t["labels"], truth["labels"])
        assert t["note"] == "hello"
        assert r.attrs["parameters"] == {"a": 1} and r.attrs["who"] == "test"
        assert r.attrs["creator"] == "gpureg" and "gpureg_version" in r.attrs and "created" in r.attrs
        with pytest.raises(InputError, match="not reconstructed volumes"):
            r.recon(0)
        with pytest.raises(IndexError):
            r.projections(N_E)
    with h5py.File(out, "r") as h5:  # chunked per projection, units on disk
        assert h5["exchange/data"].chunks == (1, 1, NY, NX)
        assert h5["exchange/theta"].attrs["units"] == "degrees"
        assert h5["exchange/energy"].attrs["units"] == "eV"


@pytest.mark.parametrize("order", [[2, 1, 0], [1, 2, 0]], ids=["descending", "acquisition-order"])
def test_energies_are_presented_ascending(tmp_path, order):
    data, white, dark, theta, energy = _arrays()
    out = write_dataexchange(tmp_path / "d.h5", data=data[order], data_white=white[order], data_dark=dark,
                             theta=theta, energy=energy[order])
    with open_input(out) as r:
        np.testing.assert_array_equal(r.energies, energy)
        for i in range(N_E):
            np.testing.assert_array_equal(r.projections(i), data[i])
            np.testing.assert_array_equal(r.flat(i), white[i])


def test_generator_data_and_recon_kind(tmp_path):
    data, white, dark, theta, energy = _arrays()
    out = write_dataexchange(tmp_path / "g.h5", data=(d for d in data), data_white=white[0], data_dark=None,
                             theta=theta, energy=energy)
    with open_input(out) as r:
        np.testing.assert_array_equal(r.projections(2), data[2])
        np.testing.assert_array_equal(r.flat(1), white[0])  # shared flats
        np.testing.assert_array_equal(r.dark(), np.zeros((1, NY, NX)))  # no darks: zeros
    vols = np.random.default_rng(1).random((N_E, 4, NY, NX))
    out = write_dataexchange(tmp_path / "r.h5", recon=vols, energy=energy)
    with open_input(out, kind="recon") as r:
        assert r.kind == "recon" and r.theta is None and r.shape == (4, NY, NX) and r.recon_shape == (4, NY, NX)
        got = r.recon(1)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, vols[1], rtol=1e-6)
        with pytest.raises(InputError, match="not projections"):
            r.projections(0)
    with pytest.raises(InputError, match="projections were required"):
        open_input(out, kind="projections")


def test_units_are_converted(tmp_path):
    data, white, dark, theta, energy = _arrays()
    path = _valid_raw(tmp_path / "u.h5", **{"exchange/theta": np.deg2rad(theta), "exchange/energy": energy / 1000})
    with h5py.File(path, "a") as h5:
        h5["exchange/theta"].attrs["units"] = "rad"
        h5["exchange/energy"].attrs["units"] = "keV"
    with open_input(path) as r:
        np.testing.assert_allclose(r.theta, theta)
        np.testing.assert_allclose(r.energies, energy)


def test_per_energy_hdf5_folder_and_glob(tmp_path):
    data, white, dark, theta, energy = _arrays()
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in (2, 0, 1):  # written out of order
        write_dataexchange(folder / f"scan_{i}.h5", data=data[i:i + 1], data_white=white[i], data_dark=dark,
                           theta=theta, energy=energy[i:i + 1])
    for source in (folder, str(folder / "scan_*.h5")):
        with open_input(source) as r:
            assert r.n_energy == N_E and r.kind == "projections"
            np.testing.assert_array_equal(r.energies, energy)
            for i in range(N_E):
                np.testing.assert_array_equal(r.projections(i), data[i])
                np.testing.assert_array_equal(r.flat(i), white[i])
            np.testing.assert_array_equal(r.dark(1), dark)
    # one file whose theta differs is named
    write_dataexchange(folder / "scan_9.h5", data=data[:1], data_white=white[0], data_dark=dark, theta=theta + 1,
                       energy=[6600.0])
    with pytest.raises(InputError, match=r"scan_9\.h5.*theta"):
        open_input(folder)


def test_tiff_series(tmp_path):
    import tifffile

    data, white, dark, theta, energy = _arrays()
    folder = tmp_path / "tiffs"
    folder.mkdir()
    for i, e in enumerate(energy):
        if i < 2:
            tifffile.imwrite(folder / f"proj_{e:.1f}eV.tif", data[i], photometric="minisblack")
        else:  # a sub-folder of single-page TIFFs for this energy
            sub = folder / f"proj_{e:.1f}eV"
            sub.mkdir()
            for k in range(N_A):
                tifffile.imwrite(sub / f"p_{k:03d}.tif", data[i, k], photometric="minisblack")
        tifffile.imwrite(folder / f"flat_{e:.1f}eV.tif", white[i], photometric="minisblack")
    tifffile.imwrite(folder / "dark.tif", dark, photometric="minisblack")
    np.savetxt(folder / "theta.txt", theta)
    with open_input(folder) as r:
        assert r.kind == "projections" and r.n_energy == N_E
        np.testing.assert_array_equal(r.energies, energy)
        np.testing.assert_array_equal(r.theta, theta)
        for i in range(N_E):
            np.testing.assert_array_equal(r.projections(i), data[i])
            np.testing.assert_array_equal(r.flat(i), white[i])
        np.testing.assert_array_equal(r.dark(), dark)
    vols = tmp_path / "vols"
    vols.mkdir()
    for i, e in enumerate(energy):
        tifffile.imwrite(vols / f"recon_{e / 1000:.3f}keV.tiff", data[i].astype(np.float32),
                         photometric="minisblack")
    with open_input(vols) as r:
        assert r.kind == "recon"
        np.testing.assert_allclose(r.energies, energy)
        np.testing.assert_array_equal(r.recon(0), data[0])


@pytest.mark.parametrize("case, message", [
    ("missing_theta", r"dataset /exchange/theta not found"),
    ("missing_white", r"/exchange/data_white \(flat fields\) not found"),
    ("missing_energy", r"dataset /exchange/energy not found"),
    ("missing_data", r"/exchange/data \(projections\) or /exchange/recon"),
    ("no_exchange", r"group /exchange not found"),
    ("wrong_rank", r"/exchange/data: expected 4 axes"),
    ("energy_count", r"/exchange/energy has 2 energies but /exchange/data has 3"),
    ("repeated_energy", r"/exchange/energy: repeated energies \[6550.0\] eV"),
    ("theta_count", r"/exchange/theta has 4 angles but /exchange/data has 5"),
    ("flat_shape", r"/exchange/data_white: expected \(n, 6, 7\)"),
    ("bad_dtype", r"/exchange/data: expected integer or float values"),
])
def test_bad_inputs_name_file_and_dataset(tmp_path, case, message):
    data, white, dark, theta, energy = _arrays()
    path = tmp_path / f"{case}.h5"
    if case == "no_exchange":
        _write_raw(path, **{"other/data": data})
    else:
        override = {
            "missing_theta": {"exchange/theta": None},
            "missing_white": {"exchange/data_white": None},
            "missing_energy": {"exchange/energy": None},
            "missing_data": {"exchange/data": None},
            "wrong_rank": {"exchange/data": data[0, 0]},
            "energy_count": {"exchange/energy": energy[:2]},
            "repeated_energy": {"exchange/energy": np.array([6540.0, 6550.0, 6550.0])},
            "theta_count": {"exchange/theta": theta[:4]},
            "flat_shape": {"exchange/data_white": white[:, :, :, :5]},
            "bad_dtype": {"exchange/data": data.astype(np.complex64)},
        }[case]
        _valid_raw(path, **override)
    with pytest.raises(InputError, match=message) as err:
        open_input(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text


def test_non_hdf5_and_missing_paths(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match=r"notes\.h5: not an HDF5 file"):
        open_input(bad)
    with pytest.raises(InputError, match="file or folder not found"):
        open_input(tmp_path / "absent.h5")
    with pytest.raises(InputError, match="no file matches"):
        open_input(str(tmp_path / "nothing_*.h5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no HDF5 .* or TIFF files"):
        open_input(tmp_path / "empty")
    tif = tmp_path / "one.tif"
    tif.write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="single TIFF holds one energy"):
        open_input(tif)
    (tmp_path / "noenergy").mkdir()
    import tifffile

    tifffile.imwrite(tmp_path / "noenergy" / "proj.tif", np.zeros((2, 3, 3), np.uint16),
                     photometric="minisblack")
    with pytest.raises(InputError, match="cannot read the energy from the file name"):
        open_input(tmp_path / "noenergy")


def test_unwritable_output_folder(tmp_path):
    data, white, dark, theta, energy = _arrays()
    kw = dict(data=data, data_white=white, data_dark=dark, theta=theta, energy=energy)
    with pytest.raises(InputError, match="does not exist"):
        write_dataexchange(tmp_path / "no" / "such" / "out.h5", **kw)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="does not exist"):
        write_dataexchange(blocker / "out.h5", **kw)


def test_write_validates_arguments(tmp_path):
    data, white, dark, theta, energy = _arrays()
    with pytest.raises(ValueError, match="exactly one of data"):
        write_dataexchange(tmp_path / "x.h5", energy=energy)
    with pytest.raises(ValueError, match="repeated energies"):
        write_dataexchange(tmp_path / "x.h5", data=data, data_white=white, theta=theta, energy=[1.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="theta has 4 angles"):
        write_dataexchange(tmp_path / "x.h5", data=data, data_white=white, theta=theta[:4], energy=energy)
    with pytest.raises(ValueError, match="2 energies given but energy has 3"):
        write_dataexchange(tmp_path / "x.h5", data=data[:2], data_white=white, theta=theta, energy=energy)
    assert not any(tmp_path.iterdir())  # nothing left behind by the failed writes


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    data, white, dark, theta, energy = _arrays()
    target = tmp_path / "scan.h5"

    def dying():
        yield data[0]
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a long simulation

    with pytest.raises(KeyboardInterrupt):
        write_dataexchange(target, data=dying(), data_white=white, data_dark=dark, theta=theta, energy=energy)
    assert os.listdir(tmp_path) == []
    # an existing good file survives a failed rewrite untouched
    write_dataexchange(target, data=data, data_white=white, data_dark=dark, theta=theta, energy=energy)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_dataexchange(target, data=dying(), data_white=white, data_dark=dark, theta=theta, energy=energy)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["scan.h5"]


def test_energy_from_instrument_record_or_file_name(tmp_path):
    data, white, dark, theta, energy = _arrays()
    path = _valid_raw(tmp_path / "mono.h5", **{"exchange/energy": None,
                                               "measurement/instrument/monochromator/energy": energy / 1000})
    with h5py.File(path, "a") as h5:
        h5["measurement/instrument/monochromator/energy"].attrs["units"] = "keV"
    with open_input(path) as r:
        np.testing.assert_allclose(r.energies, energy)
    folder = tmp_path / "named"
    folder.mkdir()
    for i, e in enumerate(energy):  # per-energy files without an energy dataset: read from the name
        _write_raw(folder / f"scan_{e:.1f}eV.h5", **{"exchange/data": data[i], "exchange/data_white": white[i],
                                                     "exchange/theta": theta})
    with open_input(folder) as r:
        np.testing.assert_array_equal(r.energies, energy)
        np.testing.assert_array_equal(r.projections(2), data[2])
