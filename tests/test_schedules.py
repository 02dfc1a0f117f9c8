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


def test_step_schedule_starts_at_start_epoch():
    got = [schedule_weight("step", 1.5, k, 5, start_epoch=3) for k in range(1, 6)]
    assert got == [0.0, 0.0, 1.5, 1.5, 1.5]


def test_cosine_value_at_half():
    assert schedule_weight("cosine", 1.0, 2, 4) == pytest.approx(math.sqrt(0.5))


def test_all_schedules_listed_and_reach_full_weight():
    for name in SCHEDULES:
        assert schedule_weight(name, 3.0, 10, 10) == pytest.approx(3.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="available: constant, linear"):
        schedule_weight("linaer", 1.0, 1, 3)
    with pytest.raises(ValueError, match="epoch must be in 1..3"):
        schedule_weight("linear", 1.0, 0, 3)
    with pytest.raises(ValueError, match="num_epochs"):
        schedule_weight("linear", 1.0, 1, 0)
