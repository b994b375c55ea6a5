"""The daemon's `sequences` pages made from one gather's columns
(`KVPool.info_columns`, `protocol.encode_infos`, `protocol_codec.pack_rows`):
a page of 4,096 was made one `SequenceInfo` at a time, then a map each, then
packed one table at a time, holding the daemon's loop about twice as long.
Checked against that path itself (`KVPool.sequence`, `encode_info`, the
session's pid) over sequences of every kind: several owners, forks sharing
blocks, a swapped-out one, an empty one, one with released leading blocks."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest
from daemon_helpers import SMALL, running_server

from kvpager import Client, KVPool, PoolSpec, protocol
from kvpager.errors import InvalidArgument, UnknownSequence
from kvpager.protocol_codec import pack_array, pack_rows, unpack_array

BS = SMALL.block_size


def _bench_inspect():
    """tools/bench_inspect.py as a module: its `one_at_a_time` is the daemon's page as
    made before (the reference here), its `run` the benchmark."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_inspect.py"
    spec = importlib.util.spec_from_file_location("bench_inspect", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _reference(server, ids):
    """Each id's map as the daemon made them before: one `SequenceInfo` at a time."""
    return _bench_inspect().one_at_a_time(server, ids)


def _wire(value):
    """``value`` as a client reads it: packed and unpacked by the protocol's codec."""
    return protocol.unpack(protocol.pack(value))


def _same_maps(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if k == "block_table":
                assert g[k].dtype == np.int64 and g[k].tolist() == list(w[k]), (g, w)
            else:
                assert g[k] == w[k] and type(g[k]) is type(w[k]), (k, g, w)


def test_a_page_from_columns_is_the_page_made_one_sequence_at_a_time():
    with running_server(SMALL) as server, Client(server.endpoint) as a, Client(server.endpoint) as b:
        rng = np.random.default_rng(0)
        x, y = a.allocate([list(range(3 * BS + 5)), list(range(100, 100 + BS))])
        a.commit(x.seq_id)
        a.fork(x.seq_id, 2)  # children share x's blocks
        [z] = b.allocate([[int(t) for t in rng.integers(1000, 2000, 2 * BS + 1)]])
        [e] = b.allocate([[]])  # no blocks
        [w] = b.allocate([list(range(500, 500 + 4 * BS))])
        b.release_before([w.seq_id], [2 * BS])  # null leading entries
        b.swap_out([z.seq_id])  # a table of null entries, host blocks held
        ids = sorted(server.pool.sequence_ids())
        infos = {i: server.pool.sequence(i) for i in ids}
        assert any(v.swapped and v.host_blocks for v in infos.values())
        assert any(v.shared_blocks for v in infos.values()) and any(not v.block_table for v in infos.values())
        assert len({v.owner for v in infos.values()}) == 2

        want = _wire(_reference(server, ids))
        _same_maps(_wire(server._op_sequences(None, {})), want)  # a page of all
        _same_maps(_wire(server._op_sequences(None, {"owner": b.session_name, "after": z.seq_id, "limit": 2})),
                   [m for m in want if m["owner"] == b.session_name and m["seq_id"] > z.seq_id][:2])
        some = [ids[3], ids[0], ids[3]]  # asked by id, in their order, repeats kept
        _same_maps(_wire(server._op_sequences(None, {"seq_ids": some})), _wire(_reference(server, some)))
        # what a client makes of them: the pool's SequenceInfos, with their owners' pids
        assert a.sequences() == [dataclasses.replace(infos[i], owner_pid=os.getpid()) for i in ids]
        with pytest.raises(UnknownSequence):
            server._op_sequences(None, {"seq_ids": [ids[0], max(ids) + 99]})
        assert server._op_sequences(None, {"after": max(ids)}) == []
        server.pool.check_integrity()


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.uint8])
def test_pack_rows_packs_each_row_as_pack_array_does(dtype):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 100, (6, 9)).astype(dtype)
    lengths = [0, 9, 3, 1, 9, 5]
    got = pack_rows(a, lengths)
    want = [pack_array(a[k, :n]) for k, n in enumerate(lengths)]
    assert [g.code for g in got] == [w.code for w in want]
    assert [g.data for g in got] == [w.data for w in want]
    for g, k, n in zip(got, range(6), lengths):
        assert unpack_array(g.data).tolist() == a[k, :n].tolist()
    # a view that is not C-contiguous (every other column) packs its own entries
    view = a[:, ::2]
    assert [g.data for g in pack_rows(view, [5, 2, 0, 5, 1, 3])] == [
        pack_array(np.ascontiguousarray(view[k, :n])).data for k, n in enumerate([5, 2, 0, 5, 1, 3])]
    assert msgpack.unpackb(msgpack.packb(got[1]), ext_hook=lambda c, d: unpack_array(d)).tolist() == a[1].tolist()


def test_the_pages_benchmark_runs_on_a_small_pool():
    """tools/bench_inspect.py, as CI can afford it: both ways time every page."""
    bench = _bench_inspect()
    rows = bench.run(seqs=600, tokens=20, rounds=1)
    assert [r["way"] for r in rows] == ["columns", "one at a time", "client walk (columns)"]
    assert all(r["all_s"] > 0 for r in rows) and rows[1]["vs_one_at_a_time"] == 1.0


def test_kvpool_info_columns_refuses_ids_that_are_not_ints():
    """As every pool op: a bool id is no id (it answered sequence 1's fields under
    the id True), a float or a str InvalidArgument (not UnknownSequence)."""
    with KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=16, block_size=8,
                         dtype="float32")) as pool:
        [a] = pool.allocate([[1, 2, 3]])
        assert a.seq_id == 1
        with pytest.raises(InvalidArgument):
            pool.sequence(True)
        for bad in ([True], [1.0], ["1"], {1}):
            with pytest.raises(InvalidArgument):
                pool.info_columns(bad)
        assert pool.info_columns([1]).seq_ids == [1]
