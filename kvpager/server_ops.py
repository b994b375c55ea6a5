"""The daemon's request handlers: one ``_op_<name>`` method per op of
`protocol.OPS`, mixed into `Server`.

Each handler runs on the loop's thread with the calling session already
looked up (``None`` for the ops that need none) and returns the reply's result;
raising a `KVPagerError` (or a plain TypeError / ValueError on malformed input)
becomes a typed error reply. Every check runs before the first change.
The staging ops are in `kvpager.server_staging`, the control ops in
`kvpager.server_control`, the read-only ones in `kvpager.server_reads`.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager import protocol
from kvpager.errors import (
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    OutOfBlocks,
    Unauthorized,
)
from kvpager.render import printable
from kvpager.sequences import fork_count
from kvpager.server_control import ControlOps
from kvpager.server_ranks import hello_driver, hello_memory, hello_rank, rank_backends
from kvpager.server_reads import ReadOps
from kvpager.validate import shown, truncate_lengths, zero_d
from kvpager.wire_args import check_token_ids, wire_ids, wire_prompts

if TYPE_CHECKING:
    from kvpager.sessions import Session

log = logging.getLogger("kvpager.server")

#: Sessions with the control token that may open past the sessions limit (`_check_sessions`).
CONTROL_SESSIONS = 8


def _flag(a: dict[str, Any], name: str, op: str) -> bool:
    """An optional bool argument (false when absent)."""
    value = a.get(name, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


class ServerOps(ReadOps, ControlOps):
    """The op handlers; `Server` supplies ``pool``, ``sessions``, ``limits``,
    ``token``, ``control_token``, ``memory``, ``gpu``, ``epoch``, ``requests``, ``releases``,
    ``_refused`` (a `RefusedHellos`), ``_owned`` and ``_end``. Pins, quotas and the session list: `ControlOps`;
    tensors through the staging buffer: `kvpager.server_staging`."""

    def _op_hello(self, _: None, a: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._hello(a)
        except KVPagerError as e:
            self._refused.say(e.code, a, e)
            raise

    def _hello(self, a: dict[str, Any]) -> dict[str, Any]:
        for k in ("host", "token", "control_token"):  # (each checked where given, even where unused: a host is
            # not kept, a daemon without tokens takes a worker's inherited one and ignores it)
            if a.get(k) is not None and not isinstance(a[k], str):
                raise InvalidArgument(f"hello: {k} must be a string or nil, got {type(a[k]).__name__}")
        if self.token is not None:
            given = a.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise Unauthorized("hello: this daemon needs its token (Client(token=...), KVPAGER_TOKEN "
                                   "or KVPAGER_TOKEN_FILE)" + ("; the one given is wrong" if given else ""))
        pid, client = a.get("pid"), a.get("client", "?")
        if not isinstance(client, str):
            raise InvalidArgument(f"hello: client must be a string, got {type(client).__name__}")
        if pid is not None and (type(pid) is not int or pid < 0):  # (one that was not showed as nil)
            raise InvalidArgument(f"hello: pid must be an integer >= 0 or nil, got {shown(pid)}")
        self.limits.check("client_name", len(client), "hello: client name length")
        control = self._check_control_token(a.get("control_token"))
        quiet = _flag(a, "quiet", "hello")
        self._check_sessions(control)
        rank = hello_rank(self.pool, a.get("rank"))
        driver = hello_driver(self.sessions, rank, a.get("driver"))
        s = self.sessions.open(client, pid, rank, driver)  # (a rank of a driver that another worker serves: RankTaken)
        s.control, s.quiet = control, quiet
        log.log(logging.DEBUG if quiet else logging.INFO, "session %s opened by %s (pid %s)%s",  # a line of its own
                s.name, printable(s.client), s.pid, " with control" if control else "")
        try:
            memory = hello_memory(self, rank)
        except BaseException:  # (a GPU's export refused: the client gets no secret, so nothing else ends it,
            self._end(s, "its hello failed")  # and a rank worker's rank was held until its heartbeats ran out)
            raise
        return {
            "session": s.id,  # the secret: this reply is the only one that carries it
            "name": s.name,
            "epoch": self.epoch,
            "version": protocol.VERSION,
            "ops": sorted(protocol.OPS),  # what a newer client may ask of this daemon
            "spec": self.pool.spec.to_dict(),
            "device": rank_backends(self.pool)[rank or 0].device,
            "ranks": self.pool.ranks,  # tensor-parallel ranks; "spec" is the whole pool's (all heads)
            "rank": rank,
            "memory": memory,
            "heartbeat_timeout": self.sessions.heartbeat_timeout,
            "max_message_bytes": self.max_message_bytes,
            "server_pid": os.getpid(),
            "control": control,
            # a remote tier: allocate answers num_remote_tokens to a client that asks (remote_tokens)
            "remote": self.pool.remote.describe() if self.pool.remote is not None else None,
            "windowed_hits": True,  # allocate and cached_tokens take `window`
            "plan_slots": True,  # tables takes a step plan's slots, checked as a write's
            # the word of memory["releases"] counting the commits of the session whose sequences it writes
            "commit_word": None if "releases" not in memory else self.releases.word((driver or s).serial),
        }

    def _check_sessions(self, control: bool) -> None:
        """LimitExceeded where a new session would pass the sessions limit; a
        session with the control token may go `CONTROL_SESSIONS` past it, so an
        operator can still look at a daemon whose sessions are all taken (by a
        leak: which clients hold them) and act on it."""
        limit = self.limits.sessions + (CONTROL_SESSIONS if control else 0)
        if len(self.sessions) + 1 > limit:
            if control:
                kept = f"; {CONTROL_SESSIONS} more kept for sessions with the control token are taken too"
            elif self.control_token is None:  # (no operator can look: the hint told them to send a token)
                kept = (f"; this daemon has no control token, so no session is kept for an operator (kvpager serve "
                        f"--control-token-file FILE keeps {CONTROL_SESSIONS} for sessions that send it)")
            else:
                kept = (f"; a session with the control token may open {CONTROL_SESSIONS} more (kvpager sessions "
                        "with KVPAGER_CONTROL_TOKEN shows which clients hold them)")
            raise LimitExceeded(f"hello: sessions open at once: {len(self.sessions) + 1} is over the limit of "
                                f"{self.limits.sessions} (KVPAGER_MAX_SESSIONS, kvpager serve --max-sessions){kept}",
                                "sessions", len(self.sessions) + 1, limit)

    def _op_heartbeat(self, s: Session, a: dict[str, Any]) -> None:
        return None  # SessionTable.get already reset the clock

    def _op_bye(self, s: Session, a: dict[str, Any]) -> dict[str, int]:
        return {"freed": self._end(s, "bye")}

    def _op_allocate(self, s: Session, a: dict[str, Any]) -> list[list[Any]]:
        prompts = wire_prompts(a["prompts"], "allocate")
        remote_tokens = _flag(a, "remote_tokens", "allocate")
        self.limits.check("sequences", s.num_seqs + len(prompts), "allocate: sequences of this session")
        self.limits.check("sequences_total", self.pool.manager.table.num_live + len(prompts),
                          "allocate: live sequences of all sessions")
        # the longest prompt's blocks (a prompt that is no list or array: KVPool.allocate names it)
        sizes = [len(p) for p in prompts if isinstance(p, list) or isinstance(p, np.ndarray) and p.ndim]
        longest = -(-max(sizes, default=0) // self.pool.spec.block_size)
        self._check_capacity(longest)
        self._check_tables(len(prompts), longest)
        share = a.get("share_in_batch", False)
        allocs = self.pool.allocate(prompts, a.get("salt"), owner=s.name, share_in_batch=share,
                                    window=a.get("window"))
        s.num_seqs += len(allocs)
        return protocol.encode_allocations(allocs, remote_tokens)

    def _check_tables(self, rows: int, width: int) -> None:
        """LimitExceeded where ``rows`` more sequences, the longest ``width`` blocks,
        would grow the daemon's block tables (one int32 row a sequence, as wide as
        the longest: 65,535 empty sequences beside one of 2,900 blocks took 760 MB
        of a daemon whose pool held 5.9 MiB) past ``limits.tables`` bytes, counted
        as the table grows (geometrically). A table that would pass it is first cut
        to what its live sequences hold (`BlockTable.shrink`): rows and width that
        sequences since freed had left (a table under 64 MiB never shrank by
        itself) counted for the daemon's life, so after one 1M-token sequence came
        and went, 20,000 short prompts were refused as 5 GB of tables."""
        table = self.pool.manager.table
        for cut in (False, True):
            if cut:
                table.shrink()
            have_rows, have_width = len(table.num_blocks), table.width
            need_rows = table.num_live + rows
            new_rows = have_rows if need_rows <= have_rows else max(need_rows, 2 * have_rows)
            new_width = have_width if width <= have_width else max(width, 2 * have_width)
            size = 4 * new_rows * new_width
            if size <= self.limits.tables or size <= 4 * have_rows * have_width:
                return
        raise LimitExceeded(
            f"the block tables of {need_rows} sequences, {max(width, have_width)} blocks wide, would take "
            f"{size} bytes, over the limit of {self.limits.tables} (KVPAGER_MAX_TABLES, kvpager serve "
            "--max-tables): free sequences, or fewer at once", "tables", size, self.limits.tables)

    def _check_capacity(self, need: int) -> None:
        """OutOfBlocks before any hashing when a prompt of ``need`` blocks cannot fit
        even if every cached block were a hit: a huge prompt costs no loop time."""
        if need * self.pool.spec.block_size < 1 << 16:
            return  # small: hashing it costs less than counting the pool
        st = self.pool.stats()
        available = st.free_blocks + st.evictable_blocks
        if need - st.cached_blocks > available:
            raise OutOfBlocks(need, available)

    def _op_cached_tokens(self, s: Session | None, a: dict[str, Any]) -> list[Any]:
        prompts = wire_prompts(a["prompts"], "cached_tokens")
        remote_tokens = _flag(a, "remote_tokens", "cached_tokens")
        # with a remote tier, what an allocate would restore counts unless remote is false
        probes = self.pool.probe_cache(prompts, a.get("salt"), remote=a.get("remote"), window=a.get("window"))
        return protocol.encode_probes(probes, remote_tokens)

    def _op_append(self, s: Session, a: dict[str, Any]) -> bytes:
        # The decode hot path: KVPool checks the ids' types, and ownership rides on
        # append's own lookup of them.
        check_token_ids(a.get("token_ids"))
        table = self.pool.manager.table
        if 8 * len(table.num_blocks) * table.width > self.limits.tables:  # (a doubled width would pass it)
            self._check_append_width(a)
        slots = self.pool.append_flat(a["seq_ids"], a.get("num_tokens", 1), a.get("token_ids"), owner=s.name)
        return protocol.encode_slots(slots)

    def _check_append_width(self, a: dict[str, Any]) -> None:
        """`_check_tables` for an append that would widen the block tables (a sequence
        growing past their width widens every row: empty sequences beside one grown by
        appends took as much as beside a long prompt). Arguments the append itself
        refuses are left to it."""
        manager, bs = self.pool.manager, self.pool.spec.block_size
        try:
            ids = wire_ids(a["seq_ids"])
            rows = manager.lookup(ids)
            n = a.get("num_tokens", 1)
            counts = np.asarray(n if isinstance(n, list) else [n] * len(ids), dtype=np.int64)
            need = int((-(-(manager.table.num_tokens[rows] + counts) // bs)).max()) if len(ids) else 0
        except Exception:  # noqa: BLE001 (the append names what is wrong)
            return
        self._check_tables(0, need)

    def _op_record_tokens(self, s: Session, a: dict[str, Any]) -> None:
        # Moves no block: KVPool checks the ids (int64 range included) before any
        # change, and ownership rides on its own lookup of them, as append's.
        self.pool.record_tokens(a["seq_ids"], a["token_ids"], owner=s.name)

    def _op_commit(self, s: Session, a: dict[str, Any]) -> list[int]:
        # Ownership rides on commit's own lookup of the ids, as append's.
        try:
            return self.pool.commit(a["seq_ids"], a.get("upto"), owner=s.name)
        finally:  # (any commit, even one refused part way: blocks it published before are)
            if self.releases is not None:
                # its workers' slots checked before may lie in blocks published now: they ask again
                self.releases.committed(self.releases.word(s.serial))

    def _op_fork(self, s: Session, a: dict[str, Any]) -> list[list[int]]:
        n = a.get("n", 1)
        if isinstance(n, np.ndarray) and n.ndim == 0:
            n = zero_d(n, "fork: n")  # the int it holds, held to the limits as one
        ids = wire_ids(a["seq_ids"])
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:  # (the per-request limits first)
            self.limits.check("ids", len(ids) * n, "fork: children in one request")
            self.limits.check("sequences", s.num_seqs + len(ids) * n, "fork: sequences of this session")
            self.limits.check("sequences_total", self.pool.manager.table.num_live + len(ids) * n,
                              "fork: live sequences of all sessions")
            self._check_tables(len(ids) * n, 0)
        n = fork_count(n, len(ids))  # (before the ids' owner, as `KVPool.fork` checks it before their lookup)
        self._owned(s, ids)
        self._check_fork_work(ids, n)
        children = self.pool.fork(ids, n)
        s.num_seqs += sum(map(len, children))
        return children

    def _check_fork_work(self, ids: list[int], n: int) -> None:
        """LimitExceeded where ``n`` children of each of ``ids`` (checked to be the
        session's) would copy more block-table entries than ``limits.fork_work``:
        the loop copies each child's row and counts its blocks' references, about
        10 ns an entry, so 65,000 children of a 262,144-token sequence held it
        10.7 s (a healthy client's call timed out meanwhile)."""
        if n * len(ids) * self.pool.manager.table.width <= self.limits.fork_work:
            return  # (no sequence is wider than the tables)
        manager = self.pool.manager
        entries = n * int(manager.table.num_blocks[manager.lookup(ids)].sum())
        self.limits.check("fork_work", entries, "fork: block-table entries of the children (children x their "
                          "parent's blocks)")

    def _op_free(self, s: Session, a: dict[str, Any]) -> None:
        ids = self._owned(s, a["seq_ids"])
        self.pool.free(ids)
        s.num_seqs -= len(ids)

    def _op_truncate(self, s: Session, a: dict[str, Any]) -> None:
        ids = wire_ids(a["seq_ids"])
        truncate_lengths(a["lengths"], len(ids))  # (before the ids' owner, as `KVPool.truncate` checks it)
        self.pool.truncate(self._owned(s, ids), a["lengths"])

    def _op_release(self, s: Session, a: dict[str, Any]) -> list[int]:
        return self.pool.release_before(wire_ids(a["seq_ids"]), a["positions"], owner=s.name)

    def _op_swap_out(self, s: Session, a: dict[str, Any]) -> None:
        self.pool.swap_out(self._owned(s, a["seq_ids"]))

    def _op_swap_in(self, s: Session, a: dict[str, Any]) -> list[np.ndarray] | None:
        ids = self._owned(s, a["seq_ids"])
        self.pool.swap_in(ids)
        # The swapped-out blocks came back under new ids: the reply carries the
        # new tables, so a worker's mirror follows without another round trip;
        # nil where they would pass the message limit (the client asks `tables`
        # a part at a time: the swap itself stays one all-or-nothing op).
        if self._tables_size(ids)[0] > self.max_message_bytes:
            return None
        return list(self.pool.tables(ids))
