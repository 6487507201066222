"""The projections (and open-beam frames) planned per energy, from a Bluesky run's start document or --angles."""

import pytest

from gpureg.io.files import InputError
from gpureg.io.tiled_run import planned_counts


def test_fxi_style_start_document():
    start = {"uid": "x", "num_angles": 361, "num_bkg_images": 10, "num_dark_images": 10}
    assert planned_counts(start) == (361, 10, "start['num_angles']")


def test_keys_in_plan_args_and_precedence():
    assert planned_counts({"plan_args": {"angles_per_energy": 181}}) == (181, None, "start.plan_args['angles_per_energy']")
    # the top level wins over plan_args; the first key of ANGLE_KEYS wins over later ones
    start = {"n_angles": 5, "angles_per_energy": 7, "plan_args": {"num_angles": 9}}
    assert planned_counts(start)[:2] == (7, None)
    assert planned_counts({"plan_args": {"flats_per_energy": 3.0}})[:2] == (None, 3)


def test_option_overrides_and_unknown_count():
    assert planned_counts({"num_angles": 361}, angles=31) == (31, None, "--angles")
    assert planned_counts({"uid": "x", "num_points": 100}) == (None, None, None)


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_a_bad_count_is_one_clear_error(value):
    with pytest.raises(InputError, match=r"start\['num_angles'\] = .*positive whole number"):
        planned_counts({"num_angles": value})
