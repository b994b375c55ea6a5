"""The probe through the daemon (`cached_tokens` op, `Client.cached_tokens` /
`probe_cache`) with a remote tier, against a real redis-server: two daemons
as two hosts; each probe compared with the allocate that follows it; the
old wire form for old clients; a store that dies."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner
from daemon_helpers import Raw, daemon_process, ipc_endpoint, req, running_server, wait_until
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from test_remote_daemon import BS, SERVE, WAIT, write_prompt  # noqa: E402

from kvpager import InvalidArgument  # noqa: E402
from kvpager.cli import main  # noqa: E402
from kvpager.client import Client  # noqa: E402
from kvpager.remote_format import HEADER_BYTES  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=64, block_size=BS, dtype="float32")
VALUE = HEADER_BYTES + SPEC.bytes_per_block


def split(probes) -> list[tuple[int, int]]:
    return [(p.num_cached_tokens, p.num_remote_tokens) for p in probes]


def test_two_daemons_probe_what_the_allocate_restores():
    """A worker on daemon A writes prefixes; on daemon B (restore cap: 3
    blocks) each probe of a random batch equals the allocate that follows and
    leaves B's pool and counters as they were."""
    rng = np.random.default_rng(3)
    with redis_server() as store:
        args = [*SERVE, "--remote", store.url]
        (ep_a, dir_a), (ep_b, dir_b) = ipc_endpoint(), ipc_endpoint()
        with daemon_process(args, ep_a), daemon_process([*args, "--remote-max-restore", str(3 * VALUE)], ep_b), \
                Client(ep_a) as wa, Client(ep_b) as wb:
            assert wb.remote["probe"] is True
            prefixes = [list(range(1000 * k, 1000 * k + int(rng.integers(1, 6)) * BS)) for k in range(1, 7)]
            for k, prefix in enumerate(prefixes[:5]):  # the sixth is in no store
                write_prompt(wa, prefix + [1], seed=k)
            assert wait_until(lambda: wa.remote_stats().written_blocks == sum(len(p) // BS for p in prefixes[:5]),
                              WAIT)
            remote = 0
            for step in range(40):
                n = int(rng.integers(1, 4))
                batch = [prefixes[int(rng.integers(6))] + rng.integers(0, 500, int(rng.integers(1, BS))).tolist()
                         for _ in range(n)]
                salt = "model" if rng.random() < 0.9 else "other"
                blocks, stats = wb.blocks(), wb.stats()
                probes = wb.probe_cache(batch, salt)
                assert wb.blocks() == blocks and wb.stats().cached_blocks == stats.cached_blocks
                assert wb.cached_tokens(batch, salt) == [p.num_cached_tokens for p in probes]
                allocs = wb.allocate(batch, salt)
                assert split(probes) == [(a.num_cached_tokens, a.num_remote_tokens) for a in allocs], step
                remote += sum(a.num_remote_tokens for a in allocs)
                wb.free([a.seq_id for a in allocs])  # unwritten: nothing is committed
            st = wb.remote_stats()
            assert remote > 0 and st.probes > 0 and st.probe_hit_blocks > 0 and st.errors == 0
            wb.check_integrity()
        for d in (dir_a, dir_b):
            shutil.rmtree(d, ignore_errors=True)


def test_the_wire_forms_old_and_new():
    with redis_server() as store, running_server(SPEC, remote=RemoteTier(store.url)) as a, \
            running_server(SPEC, remote=RemoteTier(store.url)) as b, Client(a.endpoint) as wa:
        prompt = list(range(3 * BS + 1))
        write_prompt(wa, prompt, seed=1)
        assert wait_until(lambda: wa.remote_stats().written_blocks == 3, WAIT)
        raw = Raw(b.endpoint)
        try:
            hello = raw.send(req(1, "hello", {}))[2]
            assert hello["remote"]["probe"] is True
            # a client that predates the tier's probe: a list of ints, the tier counted (as allocate would)
            assert raw.send(req(2, "cached_tokens", {"prompts": [prompt], "salt": "model"})) == [2, 0, [3 * BS]]
            assert raw.send(req(3, "cached_tokens", {"prompts": [prompt, [1]], "salt": "model",
                                                     "remote_tokens": True})) == [3, 0, [[3 * BS, 3 * BS], [0, 0]]]
            assert raw.send(req(4, "cached_tokens", {"prompts": [prompt], "salt": "model", "remote": False,
                                                     "remote_tokens": True})) == [4, 0, [[0, 0]]]
            bad = raw.send(req(5, "cached_tokens", {"prompts": [prompt], "remote": "yes"}))
            assert bad[1] == 1 and bad[2]["code"] == "invalid_argument"
            # with a session too; the allocate then restores what the probe said
            assert raw.send(req(6, "cached_tokens", {"prompts": [prompt], "salt": "model"}, hello["session"])) \
                == [6, 0, [3 * BS]]
            got = raw.send(req(7, "allocate", {"prompts": [prompt], "salt": "model", "remote_tokens": True},
                               hello["session"]))
            assert got[1] == 0 and (got[2][0][2], got[2][0][4]) == (3 * BS, 3 * BS)
        finally:
            raw.close()
        assert b.pool.remote_stats().probes == 3  # remote=False and the refused one asked nothing

    # a daemon without a tier: the client sends the old form, nothing is remote
    with running_server(SPEC) as plain, Client(plain.endpoint) as c:
        assert c.remote is None
        write_prompt(c, prompt, seed=1)
        assert split(c.probe_cache([prompt], "model")) == [(3 * BS, 0)]
        assert c.cached_tokens([prompt], "model", remote=True) == [3 * BS]
        with pytest.raises(InvalidArgument, match="remote must be a bool"):
            c.cached_tokens([prompt], remote=1)


def test_a_store_that_dies_answers_local_counts_quickly():
    with redis_server() as store, running_server(SPEC, remote=RemoteTier(store.url)) as a, \
            running_server(SPEC, remote=RemoteTier(store.url, timeout=0.3, retry_after=30)) as b, \
            Client(a.endpoint) as wa, Client(b.endpoint) as wb:
        prompt = list(range(4 * BS + 1))
        write_prompt(wb, prompt[: BS + 1], seed=2)  # b holds block 0 itself
        assert wait_until(lambda: wb.remote_stats().written_blocks == 1, WAIT)
        write_prompt(wa, prompt, seed=2)  # a restores block 0 and writes the other 3
        assert wait_until(lambda: wa.remote_stats().written_blocks == 3, WAIT)
        assert split(wb.probe_cache([prompt], "model")) == [(4 * BS, 3 * BS)]
        store.stop()
        for i in range(3):
            t0 = time.monotonic()
            assert split(wb.probe_cache([prompt], "model")) == [(BS, 0)]
            assert time.monotonic() - t0 < (0.3 + 2.0 if i == 0 else 0.5)
        st = wb.remote_stats()
        assert (st.probes, st.skipped_probes, st.errors, st.available) == (2, 2, 1, False)
        result = CliRunner().invoke(main, ["stats", "--endpoint", b.endpoint])
        assert result.exit_code == 0 and "probes         2 (6 blocks asked, 3 held), 2 skipped" in result.output, \
            result.output
        wb.check_integrity()
