import math

import pytest

from soteacher import schedule_weight
from soteacher.regularizers import SCHEDULES


@pytest.mark.parametrize("name,expected", [
    ("constant", [2.0, 2.0, 2.0, 2.0]),
    ("linear", [0.5, 1.0, 1.5, 2.0]),
    ("cosine", [2 * math.cos(0.75 * math.pi / 2), 2 * math.cos(0.5 * math.pi / 2),
                2 * math.cos(0.25 * math.pi / 2), 2.0]),
    ("cycle", [2 * math.sqrt(1 - 0.75**2), 2 * math.sqrt(1 - 0.5**2),
               2 * math.sqrt(1 - 0.25**2), 2.0]),
])
def test_schedules_by_hand(name, expected):
    got = [schedule_weight(name, 2.0, k, 4) for k in range(1, 5)]
    assert got == pytest.approx(expected)


def test_step_schedule_is_zero_for_start_epoch_epochs():
    got = [schedule_weight("step", 1.5, k, 5, start_epoch=3) for k in range(1, 6)]
    assert got == [0.0, 0.0, 0.0, 1.5, 1.5]
    assert [schedule_weight("step", 1.5, k, 3, start_epoch=0) for k in (1, 2, 3)] == [1.5] * 3


def test_step_schedule_default_start_is_50():
    got = [schedule_weight("step", 1.0, k, 240) for k in range(1, 241)]
    assert got.index(1.0) == 50 and not any(got[:50]) and all(got[50:])   # on from epoch 51


def test_cosine_value_at_half():
    assert schedule_weight("cosine", 1.0, 2, 4) == pytest.approx(math.sqrt(0.5))


def test_all_schedules_listed_and_reach_full_weight():
    for name in SCHEDULES:
        assert schedule_weight(name, 3.0, 10, 10, start_epoch=9) == pytest.approx(3.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="available: constant, linear"):
        schedule_weight("linaer", 1.0, 1, 3)
    with pytest.raises(ValueError, match="epoch must be in 1..3"):
        schedule_weight("linear", 1.0, 0, 3)
    with pytest.raises(ValueError, match="num_epochs"):
        schedule_weight("linear", 1.0, 1, 0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="start_epoch is the number of epochs at weight 0"):
            schedule_weight("step", 1.0, 1, 3, start_epoch=bad)
