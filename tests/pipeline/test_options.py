"""One frozen RunOptions/Prep for a run, and the devices resolved once per run (issue 11).

No GPU is needed: the CuPy and ASTRA-CUDA probes are monkeypatched, and the
reconstruction function is wrapped by a spy that records the device it is
asked for (and reconstructs on the CPU).
"""

import json
import pickle

import h5py
import numpy as np
import pytest
from cli_run import run_cli

import gpureg
from gpureg.core import backend
from gpureg.core.backend import GPUUnavailableError
from gpureg.io import open_input, write_dataexchange
from gpureg.pipeline import Devices, RunOptions, distributed, resolve_devices, run, runner
from gpureg.pipeline import watch as watch_module  # the module (the function is watch_folder)
from gpureg.pipeline import watch_folder as watch
from gpureg.pipeline.options import EdgeMethod, Model
from gpureg.pipeline.steps import Loader
from gpureg.recon import fbp
from gpureg.register.prepare import Prep, prepare_reference, prepare_volume

ENERGIES = np.array([6500.0, 6530.0, 6550.0, 6570.0, 6600.0])  # XANES needs >= 5


@pytest.fixture(scope="module")
def projections(tmp_path_factory):
    """A tiny projection scan (FBP needed): 24^3, 5 energies, 31 angles, noise-free."""
    path = tmp_path_factory.mktemp("proj") / "scan.h5"
    return gpureg.simulate(path, size=24, energies=ENERGIES, n_angles=31, noise=0.0, seed=1)


@pytest.fixture(scope="module")
def recon_series(tmp_path_factory):
    """Five reconstructed volumes (no FBP), the moving ones shifted by known voxels."""
    vols = [gpureg.two_particle_phantom((32,) * 3, _shift(k)) for k in range(len(ENERGIES))]
    return write_dataexchange(tmp_path_factory.mktemp("recon") / "recon.h5", recon=vols, energy=ENERGIES), vols


def _shift(k):
    m = np.eye(4)
    m[:3, 3] = [0.5 * k, -0.4 * k, 0.3 * k]
    return m


@pytest.fixture
def cupy_but_astra_without_cuda(monkeypatch):
    """CuPy "usable", ASTRA built without CUDA (the machine of the bug)."""
    monkeypatch.setattr(backend, "cupy_probe", lambda: (object(), ""))
    monkeypatch.setattr(fbp, "astra_cuda_probe", lambda: (False, "ASTRA was built without CUDA"))


@pytest.fixture
def fbp_spy(monkeypatch):
    """Records the device FBP is asked for; reconstructs on the CPU."""
    calls = []
    original = fbp.reconstruct_energy

    def spy(reader, i, *, center=None, filter="ram-lak", device="auto", repairs=None):
        calls.append(device)
        return original(reader, i, center=center, filter=filter, device="cpu", repairs=repairs)

    monkeypatch.setattr(fbp, "reconstruct_energy", spy)
    return calls


# --- RunOptions and Prep -------------------------------------------------------------------

def test_run_options_round_trip_json_and_pickle():
    opts = RunOptions(device="cpu", reference=6550, prep=Prep(binarize=False, denoise="median", smooth=0.5),
                      model="translation", center="auto", filter="hann", edge="derivative", per_particle=True,
                      report=False)
    assert opts.model is Model.translation and opts.edge is EdgeMethod.derivative and opts.reference == 6550.0
    doc = json.loads(opts.to_json())
    assert doc["prep"] == {"binarize": False, "denoise": "median", "smooth": 0.5, "ramp": 3.0, "fraction": None}
    assert doc["model"] == "translation" and doc["center"] == "auto" and doc["filter"] == "hann"
    assert RunOptions.from_json(opts.to_json()) == opts
    assert pickle.loads(pickle.dumps(opts)) == opts  # what Dask does to reach its workers
    with pytest.raises(AttributeError):
        opts.model = "affine"  # frozen
    assert opts.replace(prep=Prep()).prep == Prep()
    with pytest.warns(DeprecationWarning, match="binarize"):  # the old spelling, for one release
        assert opts.replace(binarize=True).prep == Prep(binarize=True, denoise="median", smooth=0.5)


@pytest.mark.parametrize("kw, message", [
    ({"model": "rigidish"}, "model must be one of"),
    ({"edge": "max"}, "edge must be one of"),
    ({"device": "tpu"}, "device must be one of"),
    ({"center": "middle"}, "center must be"),
    ({"reference": "middle"}, "reference must be"),
    ({"per_particle": True, "scheduler": "tcp://h:1"}, "not with scheduler or matrices"),
    ({"psf": -0.5}, "psf must be a finite width >= 0 voxels"),
    ({"psf": float("nan")}, "psf must be a finite width >= 0 voxels"),
    ({"psf": "wide"}, "psf must be a finite width >= 0 voxels"),
])
def test_run_options_refuse_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        RunOptions(**kw)


def test_prep_refuses_bad_values():
    with pytest.raises(ValueError, match="denoise must be one of"):
        Prep(denoise="bilateral")
    with pytest.raises(ValueError, match="smooth must be"):
        Prep(smooth=-1)


def test_reference_prepared_once_matches_prepare_volume():
    """prepare_reference binarizes once; its volume equals prepare_volume with the reference's own fraction."""
    vol = gpureg.two_particle_phantom((24,) * 3) + np.random.default_rng(0).normal(0, 0.05, (24,) * 3)
    for prep in (Prep(), Prep(binarize=False, denoise="median"), Prep(smooth=0.0)):
        ref = prepare_reference(vol, "cpu", prep)
        mask = gpureg.binarize(vol, denoise=prep.denoise) > 0.5
        np.testing.assert_array_equal(ref.mask, mask)
        assert ref.prep.fraction == (pytest.approx(mask.mean()) if prep.binarize else None)
        np.testing.assert_array_equal(ref.volume, prepare_volume(vol, "cpu", ref.prep))


def test_result_parameters_record_the_options(recon_series, tmp_path):
    path, _ = recon_series
    opts = RunOptions(device="cpu", prep=Prep(binarize=False, smooth=0.5), edge="derivative", report=False)
    res = run(path, tmp_path / "o.h5", opts)
    with h5py.File(res.output) as h5:
        params = json.loads(h5.attrs["parameters"])
    assert params["prep"] == {"binarize": False, "denoise": None, "smooth": 0.5, "ramp": 3.0, "fraction": None}
    assert params["edge"] == "derivative" and params["device"] == "cpu" and params["fbp_device"] == "cpu"
    assert "report" not in params and "scheduler" not in params  # they do not change the result: resume anyway


# --- devices: CuPy and ASTRA-CUDA probed separately ---------------------------------------

def test_auto_with_cupy_but_astra_without_cuda_reconstructs_on_cpu(cupy_but_astra_without_cuda):
    assert resolve_devices("auto") == Devices(registration="gpu", fbp="cpu")
    assert resolve_devices("cpu") == Devices(registration="cpu", fbp="cpu")
    with pytest.raises(GPUUnavailableError, match="ASTRA"):
        resolve_devices("gpu")


def test_loader_uses_the_fbp_device_not_the_registration_one(projections, cupy_but_astra_without_cuda):
    """The bug: `run --device auto` handed "gpu" (CuPy's answer) to FBP, which raised GPUUnavailableError."""
    devices = resolve_devices("auto")
    with open_input(projections) as reader:
        with pytest.raises(GPUUnavailableError):  # what the pipeline used to ask FBP for
            fbp.reconstruct_energy(reader, 0, device=devices.registration)
        vol, _ = Loader.for_run(reader, RunOptions(device="auto"), devices)(0)
    assert vol.shape == (24, 24, 24) and np.isfinite(vol).all()


def test_run_reconstructs_on_the_fbp_device(projections, tmp_path, monkeypatch, fbp_spy):
    """run, the Dask worker task and watch all take FBP's device from Devices.fbp."""
    monkeypatch.setattr(runner, "resolve_devices", lambda device: Devices(registration="cpu", fbp="gpu"))
    run(projections, tmp_path / "r.h5", device="auto", report=False)
    assert fbp_spy == ["gpu"] * len(ENERGIES)
    fbp_spy.clear()
    with open_input(projections) as reader:
        ref = prepare_reference(fbp.reconstruct_energy(reader, len(ENERGIES) - 1, device="cpu"), "cpu", Prep())
    fbp_spy.clear()
    i, vol, aligned, res, _ = distributed.register_one(str(projections), 0, ref.volume, ref.prep, RunOptions(),
                                                       Devices(registration="cpu", fbp="gpu"))
    assert fbp_spy == ["gpu"] and aligned.shape == vol.shape and res.mse_after <= res.mse_before


def test_watch_reconstructs_on_the_fbp_device(projections, tmp_path, monkeypatch, fbp_spy):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open_input(projections) as reader:
        for k in range(len(ENERGIES)):
            write_dataexchange(inbox / f"e{k}.h5", data=[reader.projections(k)], data_white=[reader.flat(k)],
                               data_dark=reader.dark(k), theta=reader.theta, energy=[ENERGIES[k]])
    monkeypatch.setattr(watch_module, "resolve_devices", lambda device: Devices(registration="cpu", fbp="gpu"))
    watch(inbox, tmp_path / "w.h5", expect=len(ENERGIES), poll=0.05, report=False)
    # each file as it arrives, then the final run over the stacked volumes, with watch's own Devices
    assert fbp_spy == ["gpu"] * (2 * len(ENERGIES))


# --- watch takes run's options -----------------------------------------------------------

def test_watch_takes_every_run_option(recon_series, tmp_path):
    path, vols = recon_series
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for k in (1, 3, 2, 4, 0):
        write_dataexchange(inbox / f"e{k}.h5", recon=[vols[k]], energy=[ENERGIES[k]])
    opts = RunOptions(device="cpu", reference="lowest", prep=Prep(binarize=False, denoise="gaussian", smooth=0.5),
                      model="translation", edge="derivative", report=False)
    res = watch(inbox, tmp_path / "w.h5", opts, expect=len(ENERGIES), poll=0.05)
    assert res.reference_index == 0 and res.report_dir is None
    np.testing.assert_allclose(res.matrices[0], np.eye(4), atol=1e-12)
    assert np.abs(res.matrices[:, :3, :3] - np.eye(3)).max() < 1e-12  # translation model
    truth = [_shift(k) @ np.linalg.inv(_shift(0)) for k in range(len(ENERGIES))]
    assert np.abs(res.matrices[:, :3, 3] - np.array(truth)[:, :3, 3]).max() < 0.1
    with h5py.File(res.output) as h5:
        params = json.loads(h5.attrs["parameters"])
    assert params["reference"] == "lowest" and params["model"] == "translation" and params["edge"] == "derivative"
    assert params["prep"]["denoise"] == "gaussian" and params["prep"]["binarize"] is False


def test_cli_run_center_auto(projections, tmp_path):
    out = tmp_path / "c.h5"
    r = run_cli("run", projections, out, "--center", "auto", "--no-report", "--device", "cpu", "--smooth", "0.5",
                "--edge", "derivative")
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as h5:
        params = json.loads(h5.attrs["parameters"])
    assert params["center"] == "auto" and params["prep"]["smooth"] == 0.5 and params["edge"] == "derivative"
