"""Swaps across daemon sessions: two sessions' sequences share a cached prefix;
one session's swap moves the prefix only once every holder, of either session,
is swapped out, another session's swapped row then holding it on the host; its
tables and K/V stay its own, and byes, expiries and frees leave no block, device
or host, behind."""

from __future__ import annotations

import numpy as np
import pytest
from client_plan_helpers import BS, SPEC, write_random
from daemon_helpers import running_server, wait_until

from kvpager.client import Client
from kvpager.errors import NotOwner


@pytest.mark.parametrize("end", ["bye", "expiry"])
def test_a_prefix_two_sessions_share_moves_once_both_are_swapped_out(end):
    with running_server(SPEC, heartbeat_timeout=1.0) as server:
        prompt = list(range(3 * BS + 2))
        a = Client(server.endpoint, heartbeat=True)
        b = Client(server.endpoint, heartbeat=end == "bye")
        try:
            [x] = a.allocate([prompt])
            write_random(a, x.slots, np.random.default_rng(0))
            a.commit([x.seq_id])
            [y] = b.allocate([prompt])  # a prefix hit: the three full blocks shared
            assert y.num_cached_tokens == 3 * BS
            before = b.tables([y.seq_id])[0][0, :3].tolist()
            b.swap_out([y.seq_id])  # a still holds the prefix: it stays
            assert a.stats().used_blocks == 3 + 1  # the prefix and a's own last block
            with pytest.raises(NotOwner):
                a.swap_in([y.seq_id])  # another session's id, refused
            a.swap_out([x.seq_id])  # the last resident holder: the prefix moves, once
            st = a.stats()
            assert st.used_blocks == 0 and st.host_total_blocks - st.host_free_blocks == 3 + 1 + 1
            b.swap_in([y.seq_id])  # its copy of the prefix comes back (re-shared: still cached)
            assert b.tables([y.seq_id])[0][0, :3].tolist() == before
            a.free([x.seq_id])
            if end == "bye":
                b.close()
            else:  # b's heartbeats stop: its session expires, its sequence freed
                assert wait_until(lambda: a.stats().num_sequences == 0, 15)
            st = a.stats()
            assert st.used_blocks == 0 and st.host_free_blocks == st.host_total_blocks
            server.pool.check_integrity()
        finally:
            a.close()
            b.close()
