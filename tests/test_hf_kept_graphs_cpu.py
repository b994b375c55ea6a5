"""`kvpager.hf.CapturedSteps` refused by name where no GPU graph can be had (a
model and pool on the CPU). Their GPU behaviour:
test_hf_kept_graphs.py."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_hf_client import make_model  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import CapturedSteps, spec_for_model  # noqa: E402
from kvpager.hf.graphs import check_graph_options  # noqa: E402


def test_on_the_cpu_they_are_refused_by_name():
    model = make_model(hidden=64)
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(InvalidArgument, match="CUDA device"):
        CapturedSteps(model, pool)
    with pytest.raises(InvalidArgument, match="compile"):
        CapturedSteps(model, pool, compile="yes")
    with pytest.raises(InvalidArgument, match="cuda_graphs must be a bool"):
        check_graph_options(model, pool, CapturedSteps.__new__(CapturedSteps), False)  # (callers unwrap them)
    assert pool.stats().num_sequences == 0
