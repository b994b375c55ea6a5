"""Pins, quotas and the session list through the daemon: who may do what,
what a session's end releases, retries, typed errors that change nothing."""

from __future__ import annotations

import time

import msgpack
import pytest
from daemon_helpers import SMALL, Raw, req, running_server, server_fixture, wait_until

from kvpager.client import Client
from kvpager.errors import IntegrityError, InvalidArgument, NotPinned, RequestTimeout, Unauthorized

CONTROL = "control-token-of-enough-length-42"
BS = SMALL.block_size
PROMPT = list(range(3 * BS + 5))


server = server_fixture(SMALL, heartbeat_timeout=30, control_token=CONTROL, max_pinned_blocks=10)


def cache(c: Client, tokens=PROMPT, salt=None) -> None:
    [a] = c.allocate([tokens], salt=salt)
    c.commit(a.seq_id)
    c.free(a.seq_id)


def test_a_sessions_pins_are_its_own_and_end_with_it(server):
    with Client(server.endpoint) as a, Client(server.endpoint) as b:
        cache(a)
        assert a.pin([PROMPT]) == [3 * BS]
        assert b.pin([PROMPT, PROMPT]) == [3 * BS, 3 * BS]
        pins = {p.owner: p for p in a.pins()}
        assert set(pins) == {a.session_name, b.session_name}
        assert pins[b.session_name].count == 2 and pins[a.session_name].num_tokens == 3 * BS
        assert a.stats().pinned_blocks == 3 and a.stats().max_pinned_blocks == 10
        before = a.pins()
        with pytest.raises(NotPinned):  # a holds one pin: a second unpin in the batch is refused whole
            a.unpin([PROMPT, PROMPT])
        assert a.pins() == before
        sessions = {s.name: s for s in b.sessions()}
        assert sessions[a.session_name].pins == 1 and sessions[b.session_name].pins == 1
        b.close()  # b's pins go with its session
        assert [p.owner for p in a.pins()] == [a.session_name]
        assert a.unpin([PROMPT]) == [3 * BS]
        assert a.pins() == [] and a.stats().pinned_blocks == 0
        with pytest.raises(NotPinned, match=f"session {a.session_name}"):
            a.unpin([PROMPT])
        a.check_integrity()


def test_an_expired_session_releases_its_pins():
    with running_server(SMALL, heartbeat_timeout=0.3) as server, Client(server.endpoint) as obs:
        worker = Client(server.endpoint, heartbeat=False)
        cache(worker)
        worker.pin([PROMPT])
        assert obs.stats().pinned_blocks == 3
        assert wait_until(lambda: obs.stats().pinned_blocks == 0, 10)
        assert obs.stats().evictable_blocks == 3  # still cached, no longer held
        obs.check_integrity()


def test_kept_pins_and_quotas_need_the_control_token(server):
    with Client(server.endpoint) as worker, Client(server.endpoint, control_token=CONTROL) as ctl:
        assert not worker.control and ctl.control
        cache(worker, salt="tenant-a")
        for call in (lambda: worker.pin([PROMPT], "tenant-a", keep=True),
                     lambda: worker.unpin([PROMPT], "tenant-a", keep=True),
                     lambda: worker.set_quota("tenant-a", 1)):
            with pytest.raises(Unauthorized, match="control token"):
                call()
        assert worker.pins() == [] and all(t.quota is None for t in worker.stats().tenants)
        assert ctl.pin([PROMPT], "tenant-a", keep=True) == [3 * BS]
        ctl.set_quota("tenant-a", 1)
        ctl.close()  # a kept pin outlives the session that made it
        [p] = worker.pins()
        assert p.owner is None and p.salt == "tenant-a"
        [t] = worker.stats().tenants
        assert (t.salt, t.cached_blocks, t.pinned_blocks, t.quota) == ("tenant-a", 3, 3, 1)
        with pytest.raises(NotPinned):  # the worker's own pins: none
            worker.unpin([PROMPT], "tenant-a")
        with Client(server.endpoint, control_token=CONTROL) as ctl2:
            assert ctl2.unpin([PROMPT], "tenant-a", keep=True) == [3 * BS]
            ctl2.set_quota("tenant-a", None)
        assert worker.pins() == [] and worker.stats().tenants[0].quota is None
        worker.check_integrity()


def test_control_tokens_are_checked_at_hello(server, monkeypatch):
    monkeypatch.delenv("KVPAGER_CONTROL_TOKEN", raising=False)
    with pytest.raises(Unauthorized, match="control token given is wrong"):
        Client(server.endpoint, control_token="wrong-wrong-wrong-wrong", heartbeat=False)
    # a daemon without a control token opens an ordinary session, whose control ops say why not
    with running_server(SMALL) as plain, Client(plain.endpoint, control_token=CONTROL) as c:
        assert not c.control
        with pytest.raises(Unauthorized, match="no control token: start it with --control-token-file"):
            c.set_quota("x", 1)
    monkeypatch.setenv("KVPAGER_CONTROL_TOKEN", CONTROL)
    with Client(server.endpoint) as c:
        assert c.control


def test_bad_control_arguments_change_nothing(server):
    with Client(server.endpoint, control_token=CONTROL) as c:
        cache(c)
        before = c.stats()
        for args in ({"prompts": "abc"}, {"prompts": [PROMPT], "keep": 1}, {"prompts": [PROMPT], "salt": 5},
                     {"prompts": [[1.5]]}, {"prompts": [PROMPT], "salt": ["a", "b"]}):
            with pytest.raises(InvalidArgument):
                c._call("pin", args)
        for salt, blocks in (("a", -1), ("a", "3"), ("a", True), (3, 1)):
            with pytest.raises(InvalidArgument):
                c.set_quota(salt, blocks)
        assert c.stats() == before and c.pins() == []
        c.pin([PROMPT] * 4)  # over the cap of 10 blocks? 3 distinct: fine
        many = [list(range(i * 100, i * 100 + 2 * BS)) for i in range(1, 5)]
        for p in many:
            cache(c, p)
        before = c.stats()
        with pytest.raises(InvalidArgument, match="max-pinned-blocks"):  # LimitExceeded
            c.pin(many)
        assert c.stats() == before
        c.check_integrity()


def test_a_retried_pin_runs_once(server):
    with Client(server.endpoint) as c:
        cache(c)
        raw = Raw(server.endpoint)
        try:
            body = req(7, "pin", {"prompts": [PROMPT]}, session=c.session)
            first, again = raw.recv_raw(body), raw.recv_raw(body)
            assert first == again and msgpack.unpackb(first, raw=False)[2] == [3 * BS]
        finally:
            raw.close()
        [p] = c.pins()
        assert p.count == 1


def test_a_timed_out_pin_that_ran_later_is_undone(server, monkeypatch):
    with Client(server.endpoint) as c:
        cache(c)
        real = server._handlers["pin"]

        def slow(s, a):
            time.sleep(1.0)
            return real(s, a)

        monkeypatch.setitem(server._handlers, "pin", slow)
        c.timeout = 0.2
        with pytest.raises(RequestTimeout):
            c.pin([PROMPT, list(range(500, 520))])
        monkeypatch.setitem(server._handlers, "pin", real)
        c.timeout = 10
        assert c.pins() == [] and c.stats().pinned_blocks == 0  # settled: the late pin undone
        c.check_integrity()


def test_sessions_list_names_pids_and_counts_but_no_secret(server):
    with Client(server.endpoint, name="worker-x") as c:
        [a] = c.allocate([[1, 2, 3]])
        raw = Raw(server.endpoint)
        try:
            reply = raw.recv_raw(req(1, "sessions", {}))
        finally:
            raw.close()
        assert c.session.encode() not in reply
        [s] = c.sessions()
        assert (s.name, s.client, s.sequences, s.pins, s.control) == (c.session_name, "worker-x", 1, 0, False)
        assert s.pid is not None and s.requests >= 2 and s.age_s >= s.idle_s >= 0
        before = c._call("stats", {})["requests"]
        c.stats()
        assert c._call("stats", {})["requests"] == before + 2
        c.free(a.seq_id)


def test_check_finds_pins_of_no_open_session(server):
    with Client(server.endpoint) as c:
        cache(c)
        server.pool.pin([PROMPT], owner="s999")  # white-box: as if a session's end forgot them
        with pytest.raises(IntegrityError, match="pins belong to no open session"):
            c.check_integrity()
        server.pool.release_pins("s999")
        c.check_integrity()
