"""What users cause is one line and exit code 2; a bug is one line and exit code 1, its traceback under --verbose.

In-process through :func:`gpureg.cli.main` (issue 23).
"""

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.cli import main
from gpureg.cli.app import cli_message
from gpureg.core.errors import GpuregError, InputError, ParameterError


def _main(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def recon_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("err") / "recon.h5"
    vols = [gpureg.two_particle_phantom((16, 16, 16), seed=1) * s for s in (0.5, 0.6, 0.8, 0.9, 1.0)]
    gpureg.write_dataexchange(path, recon=vols, energy=np.array([6530.0, 6545.0, 6560.0, 6580.0, 6600.0]))
    return path


def _deliberate_bug(*args, **kwargs):
    raise KeyError("deliberate")


def test_bug_in_a_pipeline_step_is_exit_1_with_traceback_under_verbose(recon_input, tmp_path, capsys, monkeypatch):
    from gpureg.pipeline.steps import Loader

    monkeypatch.setattr(Loader, "__call__", _deliberate_bug)
    rc, _, err = _main(capsys, "run", recon_input, tmp_path / "out.h5", "--device", "cpu", "--no-report")
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gpureg:") and "devices" not in ln]
    assert lines == ["gpureg: internal error: KeyError: 'deliberate' (run with --verbose for the traceback)"], err
    assert "Traceback" not in err
    rc, _, err = _main(capsys, "--verbose", "run", recon_input, tmp_path / "out2.h5", "--device", "cpu",
                       "--no-report")
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "_deliberate_bug" in err and "KeyError: 'deliberate'" in err
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out2.h5").exists()


def test_missing_input_dataset_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h5:
        h5["exchange/theta"] = np.linspace(0, 180, 10)
        h5["exchange/energy"] = np.array([6500.0, 6550.0, 6600.0])
    for verbose in ((), ("--verbose",)):
        rc, _, err = _main(capsys, *verbose, "run", bad, tmp_path / "out.h5", "--device", "cpu")
        assert rc == 2, err
        errors = [ln for ln in err.splitlines() if ln.startswith("gpureg: error")]
        assert errors == [f"gpureg: error: {bad}: dataset /exchange/data (projections) or /exchange/recon "
                          "(volumes) not found"], err
        assert "Traceback" not in err
    assert not (tmp_path / "out.h5").exists()


def test_library_names_parameters_and_the_cli_translates():
    assert cli_message("x.h5: exists (a finished run); pass overwrite=True to replace it") == \
        "x.h5: exists (a finished run); pass --overwrite to replace it"
    assert cli_message("use device='cpu' or a smaller size") == "use --device cpu or a smaller size"
    assert cli_message("choose another reference=)") == "choose another --reference)"
    assert cli_message("pass skip_bad_energies=True") == "pass --skip-bad-energies"
    assert cli_message("shape=(4, 4) and k=3") == "shape=(4, 4) and k=3"  # not a flag: unchanged


def test_the_family_stays_catchable_as_before():
    assert issubclass(InputError, ValueError) and issubclass(ParameterError, InputError)
    assert issubclass(gpureg.GPUUnavailableError, GpuregError) and issubclass(gpureg.GPUUnavailableError, RuntimeError)
    with pytest.raises(ParameterError, match="filter must be one of"):
        gpureg.pipeline.reconstruct_file("in.h5", "out.h5", filter="nope")


def test_a_bad_combination_of_options_is_a_usage_error(tmp_path, capsys):
    rc, _, err = _main(capsys, "demo", tmp_path / "d", "--per-particle", "--deformable")
    assert rc == 2 and "internal error" not in err
    assert err.strip().splitlines()[-1].startswith("gpureg: error: Invalid value: choose --per-particle or --deformable")
