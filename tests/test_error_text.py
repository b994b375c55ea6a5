"""An error names the refused value, shown cut short: the value's whole repr was
in its message (300,000 characters for a 100,000-id list, a megabyte for a long
string); nothing changed. (On the wire every error text is cut too:
`test_protocol.py`.)"""

from __future__ import annotations

import pytest
from pool_helpers import make_pool, snapshot
from test_careless_embedded import _setup

from kvpager import InvalidArgument


@pytest.mark.parametrize("call", [
    pytest.param(lambda p: p.free([list(range(100_000))]), id="free a nested list"),
    pytest.param(lambda p: p.fork(["x" * 1_000_000]), id="fork a long string"),
    pytest.param(lambda p: p.free([{"k" * 100_000: 1}]), id="free a dict"),
    pytest.param(lambda p: p.append([1], [1.5] * 100_000), id="append float counts"),
    pytest.param(lambda p: p.release_before([1], [[0] * 100_000]), id="release a nested position"),
])
def test_an_error_shows_a_huge_refused_value_cut_short(call):
    """The refused value's repr was the whole of it: 300,000 characters for a
    100,000-id list, a megabyte for a long string."""
    p = make_pool()
    _setup(p)
    before = snapshot(p)
    with pytest.raises(InvalidArgument) as e:
        call(p)
    assert len(str(e.value)) < 400, len(str(e.value))
    assert snapshot(p) == before
    p.check_integrity()
