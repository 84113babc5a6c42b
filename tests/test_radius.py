"""The radius value type: parsed once, resolved against a residual norm once."""

import pytest

from melbo.errors import MelboError
from melbo.radius import Radius


@pytest.mark.parametrize("spec,kind,value,resolved", [
    ("4.0", "absolute", 4.0, 4.0), (" 0.5X ", "relative", 0.5, 5.0), (3, "absolute", 3.0, 3.0),
    ("calibrate", "calibrate", None, None), ("AUTO", "auto", None, None)])
def test_parse_and_resolve(spec, kind, value, resolved):
    r = Radius.parse(spec)
    assert (r.kind, r.value) == (kind, value) and Radius.parse(str(r)) == r
    if resolved is None:
        with pytest.raises(MelboError, match="not a number yet"):
            r.resolve(10.0)
    else:
        assert r.resolve(10.0) == pytest.approx(resolved)


@pytest.mark.parametrize("bad", ["", "x", "-1", "0x", "nan", "infx", "1e400", True, None, [1]])
def test_bad_radii_are_one_line(bad):
    with pytest.raises(MelboError):
        Radius.parse(bad)
