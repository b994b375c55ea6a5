"""The daemon's mapped counts (`kvpager.release_count.ReleaseCount`: releases, ended
sessions, each session's commits) are shared memory of mode 0600: a worker
attaches them read-only, but any process of the daemon's user can map them
writable. A word a client set to 2**64 - 1 made the daemon's next ``+= 1`` on
it a NumPy overflow warning; under ``-W error`` (or a warnings filter that
raises) a commit was answered ``internal`` after it had published, and the
expiry of a silent session, outside the loop's guard, ended the daemon and
every session with it. The words wrap silently now.
Against a daemon in a thread on a fresh ipc:// endpoint."""

from __future__ import annotations

import warnings

import numpy as np
from daemon_helpers import SMALL, running_server, wait_until

from kvpager import Client
from kvpager.shm import Segment

TOP = np.uint64(2**64 - 1)


def test_counts_a_client_wrote_to_the_top_wrap_and_the_daemon_serves_on():
    with running_server(SMALL, heartbeat_timeout=0.5) as server, Client(server.endpoint, timeout=10) as c:
        handle = c.memory["releases"]
        writable = Segment.attach(handle["name"], handle["size"])  # as a careless (or hostile) worker may
        words = writable.array((handle["size"] // 8,), np.uint64)
        word = server.releases.word(server.sessions.by_name[c.session_name].serial)  # (hello's commit_word)
        words[0] = words[1] = words[word] = TOP
        [a] = c.allocate([list(range(2 * SMALL.block_size))])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="overflow encountered", category=RuntimeWarning)
            assert c.commit([a.seq_id]) == [2]
            assert int(words[word]) == 0
            silent = Client(server.endpoint, heartbeat=False)
            try:
                silent.allocate([[1, 2, 3]])
                assert wait_until(lambda: len(server.sessions) == 1, 10), "the silent session was not expired"
            finally:
                silent.close()
            assert int(words[1]) == 0
            assert c.stats().num_sequences == 1  # the daemon serves on: the expired session's sequence freed
            c.free([a.seq_id])  # (the releases word: a free that raised before it freed anything)
            assert int(words[0]) <= 2 and c.stats().num_sequences == 0
        del words
        writable.close()
