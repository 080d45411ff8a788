"""Small pieces of the shared training plumbing."""
import pytest

from utils.training import NonFiniteGuard, interval


def test_guard_stops_after_repeated_non_finite_losses():
    guard = NonFiniteGuard(patience=3)
    guard.check(float("nan"), "step 1")
    guard.check(float("inf"), "step 2")
    guard.check(1.0, "step 3")              # a finite loss resets the count
    guard.check(float("nan"), "step 4")
    guard.check(float("nan"), "step 5")
    with pytest.raises(FloatingPointError, match="3 updates in a row"):
        guard.check(float("nan"), "step 6")


@pytest.mark.parametrize("batches,times,expected", [(5, 10, 1), (100, 10, 10), (0, 20, 1),
                                                    (39, 20, 1), (40, 20, 2)])
def test_eval_interval_never_zero(batches, times, expected):
    assert interval(batches, times) == expected
