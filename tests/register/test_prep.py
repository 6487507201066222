"""One :class:`Prep`, one default: every registration entry point takes ``prep=`` and binarizes by default.

The old keywords (``binarize=``, ``denoise=``, ``smooth=``, ``ramp=``) still work for one release: they
build the same ``Prep`` and raise a :class:`DeprecationWarning`.
"""

import inspect

import numpy as np
import pytest

import gpureg
from gpureg.pipeline import RunOptions
from gpureg.register import deformable, particle_check, particles, prepare, series
from gpureg.register import affine as affine_mod
from gpureg.register.prepare import Prep, prep_from

ENTRY_POINTS = [gpureg.register_affine, gpureg.register_series, gpureg.register_particles,
                gpureg.register_deformable, gpureg.detect_relative_motion, prepare.prepare_volume]
OLD = {"binarize": False, "denoise": "median", "smooth": 0.5, "ramp": 2.0}


def test_one_default_everywhere():
    assert Prep().binarize is True and RunOptions().prep == Prep()
    for fn in ENTRY_POINTS:
        param = inspect.signature(fn).parameters.get("prep")
        assert param is not None and param.default is None, fn.__name__  # None means Prep()
    assert prep_from(None, {}, "f") == Prep()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("module, call", [
    (affine_mod, lambda v, **kw: gpureg.register_affine(v, v, **kw)),
    (series, lambda v, **kw: gpureg.register_series([v, v], [6500.0, 6600.0], **kw)),
    (particles, lambda v, **kw: gpureg.register_particles(v, v, **kw)),
    (deformable, lambda v, **kw: gpureg.register_deformable(v, v, **kw)),
    (prepare, lambda v, **kw: prepare.prepare_volume(v, "cpu", **kw)),
], ids=["register_affine", "register_series", "register_particles", "register_deformable", "prepare_volume"])
def test_old_keywords_warn_and_build_the_same_prep(monkeypatch, module, call):
    seen = []

    def spy(volume, device, prep=None, *, name="volume", **kw):
        seen.append(prep)
        raise _Stop

    if module is not prepare:
        monkeypatch.setattr(module, "prepare_volume", spy)
    vol = gpureg.two_particle_phantom((24, 24, 24))
    with pytest.warns(DeprecationWarning, match=r"prep=gpureg\.Prep\(binarize=False"):
        try:
            out = call(vol, **OLD)
        except _Stop:
            out = None
    if module is prepare:  # the real one: same volume as with prep=
        np.testing.assert_array_equal(out, prepare.prepare_volume(vol, "cpu", Prep(**OLD)))
    else:
        assert seen[0].binarize is False and seen[0].denoise == "median" and seen[0].smooth == 0.5
        assert seen[0].ramp == 2.0
        seen.clear()
        with pytest.raises(_Stop):
            call(vol, prep=Prep(**OLD))
        assert seen[0].binarize is False and seen[0].smooth == 0.5


def test_detect_relative_motion_takes_prep(monkeypatch):
    seen = []
    monkeypatch.setattr(particle_check, "register_particles", lambda *a, **kw: seen.append(kw["prep"]) or 1 / 0)
    vol = gpureg.two_particle_phantom((24, 24, 24))
    with pytest.warns(DeprecationWarning), pytest.raises(ZeroDivisionError):
        gpureg.detect_relative_motion(vol, vol, np.eye(4), binarize=False)
    with pytest.raises(ZeroDivisionError):
        gpureg.detect_relative_motion(vol, vol, np.eye(4))
    assert seen == [Prep(binarize=False), Prep()]


def test_registration_with_old_keywords_is_bit_identical():
    fixed = gpureg.two_particle_phantom((32, 32, 32))
    moving = gpureg.two_particle_phantom((32, 32, 32), gpureg.rotation_matrix(2.0, (0, 0, 1), (15.5, 15.5, 15.5)))
    new = gpureg.register_affine(fixed, moving, prep=Prep(binarize=False, smooth=0.5), device="cpu")
    with pytest.warns(DeprecationWarning):
        old = gpureg.register_affine(fixed, moving, binarize=False, smooth=0.5, device="cpu")
    np.testing.assert_array_equal(old.matrix, new.matrix)


def test_prep_and_keywords_together_or_unknown_keywords_are_type_errors():
    vol = gpureg.two_particle_phantom((16, 16, 16))
    with pytest.raises(TypeError, match="not both"):
        gpureg.register_affine(vol, vol, prep=Prep(), binarize=False)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'binarise'"):
        gpureg.register_affine(vol, vol, binarise=False)
    with pytest.raises(TypeError, match="prep must be a gpureg.Prep"):
        gpureg.register_affine(vol, vol, prep={"binarize": False})


def test_prepared_particles_refuse_a_prep():
    vol = gpureg.two_particle_phantom((16, 16, 16))
    with pytest.raises(ValueError, match="prepared=True"):
        gpureg.register_particles(vol, vol, prepared=True, prep=Prep(binarize=False))
