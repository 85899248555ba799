"""jaxlm.run.errors' shared config-value checks: which values pass at each bound, and the message
and key of the ConfigError the others raise."""

import math

import pytest

from jaxlm.run import errors


@pytest.mark.parametrize("bounds,ok,bad", [
    ("[]", [0, 0.5, 1], [-0.1, 1.1, math.nan]),
    ("[)", [0, 0.99], [1, -1e-9]),
    ("(]", [1e-9, 1], [0, 1.5]),
    ("()", [0.5], [0, 1]),
])
def test_check_interval_includes_exactly_the_closed_ends(bounds, ok, bad):
    for value in ok:
        errors.check_interval("s.k", value, 0, 1, bounds)
    for value in bad:
        with pytest.raises(errors.ConfigError) as e:
            errors.check_interval("s.k", value, 0, 1, bounds)
        assert str(e.value) == f"config key s.k: must lie in {bounds[0]}0, 1{bounds[1]}, " \
                               f"got {value}"
        assert e.value.key == "s.k"


def test_check_at_least_and_check_choice():
    errors.check_at_least("s.n", 1, 1)
    with pytest.raises(ValueError, match=r"^config key s.n: must be >= 1, got 0$"):
        errors.check_at_least("s.n", 0, 1)
    errors.check_choice("s.c", "a", ("a", "b"))
    with pytest.raises(errors.ConfigError, match=r"config key s.c: 'z' is not one of \('a', 'b'\)"):
        errors.check_choice("s.c", "z", ("a", "b"))
