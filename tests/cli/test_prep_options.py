"""``--raw``, ``--denoise``, ``--smooth``, ``--ramp``: the same :class:`gpureg.Prep` from the command line as from
Python, for ``gpureg register`` and the pipeline commands (in-process)."""

import json

import numpy as np
import pytest

import gpureg
from gpureg.cli import main
from gpureg.cli.pipeline_cmds import run_options
from gpureg.core import transform as tf
from gpureg.pipeline.options import Denoise, Device, EdgeMethod, FBPFilter, Model


def test_register_takes_every_prep_option(tmp_path):
    shape = (32, 32, 32)
    m = tf.rotation_matrix(3, (1, 0, 1), tf.grid_center(shape))
    fixed, moving = gpureg.two_particle_phantom(shape), gpureg.two_particle_phantom(shape, m)
    np.save(tmp_path / "f.npy", fixed)
    np.save(tmp_path / "m.npy", moving)
    with pytest.raises(SystemExit) as done:
        main(["register", str(tmp_path / "f.npy"), str(tmp_path / "m.npy"), "-o", str(tmp_path / "out.json"),
              "--device", "cpu", "--ramp", "1.5", "--smooth", "0.5", "--denoise", "impulse"])
    assert done.value.code == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    prep = gpureg.Prep(ramp=1.5, smooth=0.5, denoise="impulse")
    assert doc["prep"] == prep.to_dict()
    np.testing.assert_array_equal(doc["matrix"], gpureg.register_affine(fixed, moving, prep=prep, device="cpu").matrix)


def test_pipeline_options_build_the_prep():
    common = dict(device=Device.cpu, reference="highest", model=Model.affine, center=None,
                  fbp_filter=FBPFilter.ram_lak, edge=EdgeMethod.half)
    opts = run_options(raw=False, denoise=Denoise.median, smooth=0.5, ramp=0.0, **common)
    assert opts.prep == gpureg.Prep(denoise="median", smooth=0.5, ramp=0.0)
    assert run_options(raw=True, denoise=None, smooth=1.0, ramp=3.0, **common).prep == gpureg.Prep(binarize=False)
