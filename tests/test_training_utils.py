"""Small pieces of the shared training plumbing."""
import pytest

from utils.training import interval


@pytest.mark.parametrize("batches,times,expected", [(5, 10, 1), (100, 10, 10), (0, 20, 1),
                                                    (39, 20, 1), (40, 20, 2)])
def test_eval_interval_never_zero(batches, times, expected):
    assert interval(batches, times) == expected
