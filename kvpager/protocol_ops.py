"""The op table: every op's argument names and whether it needs a session,
the ops whose replies are kept for retries, and the error codes (the error
classes own them). See docs/protocol.md."""

from __future__ import annotations

from dataclasses import dataclass

from kvpager.errors import ERRORS_BY_CODE

# Error codes, for reference and for docs/protocol.md (the classes own them).
ERROR_CODES: tuple[str, ...] = tuple(ERRORS_BY_CODE)


@dataclass(frozen=True)
class Op:
    """One op: its argument names and whether it needs an open session."""

    name: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    session: bool = True

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.required + self.optional)


def _arg_sets(op: Op) -> tuple[frozenset[str], frozenset[str]]:
    return op.allowed, frozenset(op.required)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("hello", (), ("client", "pid", "host", "token", "control_token", "rank", "driver", "quiet"),
           session=False),
        Op("allocate", ("prompts",), ("salt", "share_in_batch", "remote_tokens", "window")),
        Op("cached_tokens", ("prompts",), ("salt", "remote", "remote_tokens", "window"), session=False),
        Op("append", ("seq_ids",), ("num_tokens", "token_ids")),
        Op("record_tokens", ("seq_ids", "token_ids")),
        Op("commit", ("seq_ids",), ("upto",)),
        Op("fork", ("seq_ids",), ("n",)),
        Op("free", ("seq_ids",)),
        Op("truncate", ("seq_ids", "lengths")),
        Op("swap_out", ("seq_ids",)),
        Op("swap_in", ("seq_ids",)),
        Op("release", ("seq_ids", "positions")),
        Op("batch", ("ops",)),
        Op("staging", ("nbytes",)),
        Op("write", ("layer", "slots", "k", "v")),
        Op("attend", ("layer", "seq_ids", "q", "out"), ("query_lens", "scale", "window", "softcap", "sinks", "chunk")),
        Op("tables", ("seq_ids",), ("slots",), session=False),
        Op("sequences", (), ("seq_ids", "owner", "after", "limit"), session=False),
        Op("blocks", (), (), session=False),
        Op("stats", (), (), session=False),
        Op("check", (), (), session=False),
        Op("pin", ("prompts",), ("salt", "keep")),
        Op("unpin", ("prompts",), ("salt", "keep")),
        Op("pins", (), ("after", "limit"), session=False),
        Op("set_quota", ("salt", "blocks")),
        Op("sessions", (), (), session=False),
        Op("heartbeat"),
        Op("bye"),
    )
}
#: Ops whose replies the daemon keeps per session by request id: a retry of
#: one (same id, same bytes) after a timeout gets the first execution's reply
#: instead of running again (see "Retries" in docs/protocol.md).
#: A staged ``write`` or ``attend`` is one too: the client settles one that timed out before it
#: touches its staging buffer again (run late, it read the next call's data there).
RETRIED_OPS = frozenset({"allocate", "append", "record_tokens", "commit", "fork", "free", "truncate", "swap_out",
                         "swap_in", "pin", "unpin", "release", "batch", "write", "attend"})
#: Ops a `batch` may hold: a scheduler step's sequence ops (see "Batches" in docs/protocol.md).
BATCH_OPS = ("append", "record_tokens", "commit", "free", "truncate", "release")
#: Most ops in one batch.
BATCH_MAX_OPS = 64
#: Most sequences one `sequences` request lists (a page; see docs/protocol.md).
SEQUENCES_PAGE = 4096
#: Most pins one `pins` request lists, and the most blocks their tables list together
#: (a pin longer than that is listed alone; a session's pins list at most `Limits.pin_blocks`).
PINS_PAGE = 4096
PINS_PAGE_BLOCKS = 1 << 16
#: How many such replies the daemon keeps per session (a client has one request in flight).
KEPT_REPLIES = 4

# Per op: (allowed, required) argument names, precomputed for the hot path.
OP_ARGS = {name: _arg_sets(op) for name, op in OPS.items()}
