"""The `pins` listing a page at a time: a daemon's `pins` request answered every
session's pins at once, as long as they listed blocks (up to 65,536 per
session, 1,024 sessions), building the reply on the loop's thread. Now it
answers a page (at most `PINS_PAGE` pins, and no more once they list
`PINS_PAGE_BLOCKS` blocks), in the order the pins were made, from after a
pin id; `Client.pins` asks page after page."""

from __future__ import annotations

import pytest
from daemon_helpers import running_server
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec, protocol
from kvpager.client import Client
from kvpager.errors import InvalidArgument

BS = 8
SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=256, block_size=BS, dtype="float32")


def prompt(i: int, blocks: int) -> list[int]:
    return [1000 * i + j for j in range(blocks * BS)]


def cached(pool, prompts) -> None:
    for a in pool.allocate(prompts):
        pool.commit(a.seq_id)
        pool.free(a.seq_id)


def walk(pool: KVPool, limit: int, max_blocks: int) -> list[list]:
    """Every page of the listing, as a client asks for them."""
    pages, after = [], -1
    while True:
        page = pool.pins_page(after, limit, max_blocks)
        if not page:
            return pages
        pages.append(page)
        after = page[-1].pin_id


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["pin", "unpin", "release"]), st.integers(0, 7), st.integers(0, 2)),
                max_size=40),
       st.integers(1, 5), st.integers(1, 12))
@example([("pin", 7, 0), ("unpin", 3, 0)], 1, 1)  # two prompts of one length: only one is pinned
def test_pages_list_every_pin_once_in_order_within_their_bounds(ops, limit, max_blocks):
    """Any order of pins, unpins and whole owners released: the pages list every
    pin once, in the order they were made, each page within ``limit`` pins and
    ``max_blocks`` blocks (or a single longer pin), and the integrity check holds."""
    pool = KVPool(SPEC)
    prompts = [prompt(i, 1 + i % 4) for i in range(8)]
    cached(pool, prompts)
    held: dict[tuple[str, int], int] = {}  # (owner, prompt): pins held
    for op, i, owner in ops:
        name = f"s{owner}"
        if op == "pin":
            pool.pin([prompts[i]], owner=name)
            held[name, i] = held.get((name, i), 0) + 1
        elif op == "unpin":
            if held.get((name, i)):
                pool.unpin([prompts[i]], owner=name)
                held[name, i] -= 1
        else:
            pool.release_pins(name)
            held = {k: v for k, v in held.items() if k[0] != name}
    pool.check_integrity()
    every = pool.pins()
    pages = walk(pool, limit, max_blocks)
    assert [p for page in pages for p in page] == every
    assert [p.pin_id for p in every] == sorted({p.pin_id for p in every})
    for page in pages:
        assert len(page) <= limit
        assert len(page) == 1 or sum(len(p.block_table) for p in page) <= max_blocks
    # each owner's own listing: the same pins, in the same order
    for owner in {p.owner for p in every}:
        assert pool.pins(owner) == [p for p in every if p.owner == owner]
    assert pool.pin_counts() == {o: sum(p.owner == o for p in every) for o in {p.owner for p in every}}


def test_ids_of_dropped_pins_are_swept():
    """A pool that pins and unpins forever keeps ids of the live pins only (within a
    constant), not one per pin it ever made."""
    pool = KVPool(SPEC)
    p = prompt(1, 2)
    cached(pool, [p])
    for _ in range(1000):
        pool.pin([p], owner="a")
        pool.unpin([p], owner="a")
    pool.pin([p], owner="a")
    table = pool.manager.pins
    assert len(table.by_id) == 1 and len(table.ids) <= 2 * 1 + 64 + 1
    assert [x.pin_id for x in pool.pins()] == [1000]
    pool.check_integrity()


def test_a_daemon_answers_a_page_and_the_client_walks_them(monkeypatch):
    """Two sessions' pins through a daemon: one `pins` request lists a page (before, every
    pin), `Client.pins` lists them all, in the order they were made, with owners and
    lengths as pinned."""
    monkeypatch.setattr(protocol, "PINS_PAGE_BLOCKS", 5)  # the daemon runs in this process
    with running_server(SPEC) as server, Client(server.endpoint) as a, Client(server.endpoint) as b:
        prompts = [prompt(i, 1 + i % 3) for i in range(6)]
        for c in (a, b):
            for x in c.allocate(prompts[:3] if c is a else prompts[3:]):
                c.commit(x.seq_id)
                c.free(x.seq_id)
        made = []
        for i, p in enumerate(prompts):
            c = a if i < 3 else b
            c.pin([p])
            made.append((c.session_name, len(p)))
        listed = a.pins()
        assert [(p.owner, p.num_tokens) for p in listed] == made
        assert [p.pin_id for p in listed] == sorted(p.pin_id for p in listed)
        first = a._call("pins", {})  # what an old client asked: a page now
        assert 1 <= len(first) < len(made) and sum(len(p["block_table"]) for p in first) <= 5
        assert len(a._call("pins", {"limit": 1, "after": listed[2].pin_id})) == 1
        assert a._call("pins", {"after": listed[-1].pin_id}) == []
        for bad in ({"limit": 0}, {"limit": protocol.PINS_PAGE + 1}, {"after": "x"}, {"limit": 2.5}, {"after": -2}):
            with pytest.raises(InvalidArgument):
                a._call("pins", bad)
        with pytest.raises(InvalidArgument, match="after must be"):  # as `pins` (it was taken as -1)
            a._call("sequences", {"after": -2})
        assert {s.name: s.pins for s in a.sessions()} == {a.session_name: 3, b.session_name: 3}
        a.check_integrity()
