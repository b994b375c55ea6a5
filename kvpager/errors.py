"""Every error kvpager raises, in one place.

Three kinds of failure, kept apart on purpose:
- running out of blocks is an expected answer (`OutOfBlocks`): the caller
  preempts or waits; state is unchanged;
- caller misuse (`InvalidArgument`, `UnknownSequence`, `SequenceSwapped`,
  `NotOwner`, ...) names the bad value; state is unchanged;
- a broken invariant (`IntegrityError`) is a bug in kvpager.

Each class carries a stable string `code`; the wire protocol sends that code
and the client raises the same class again from it.
"""

from __future__ import annotations


class KVPagerError(Exception):
    """Base class of every kvpager error."""

    code = "error"


class OutOfBlocks(KVPagerError):
    """Not enough free (or evictable) blocks for the whole request; nothing changed."""

    code = "out_of_blocks"

    def __init__(self, needed: int, available: int, where: str = "device"):
        self.needed, self.available, self.where = needed, available, where
        super().__init__(f"out of {where} blocks: needed {needed}, available {available}")

    def __reduce__(self):
        return (type(self), (self.needed, self.available, self.where))


class InvalidArgument(KVPagerError, ValueError):
    """A malformed argument: wrong type, dtype, shape or range. The message names it."""

    code = "invalid_argument"


class LimitExceeded(InvalidArgument):
    """A request over one of the daemon's limits (`kvpager.limits.Limits`): too
    many ids or tokens in one request, sequences or staging bytes in one session,
    staging bytes in all. The message names the setting; nothing changed."""

    code = "limit_exceeded"

    def __init__(self, message: str, limit: str = "", value: int = 0, maximum: int = 0):
        self.limit, self.value, self.maximum = limit, value, maximum
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.limit, self.value, self.maximum))


class StalePlan(InvalidArgument):
    """A step plan used after its sequences changed under it: one freed,
    truncated, swapped out or released blocks the plan reads (every call is
    refused), or the step it writes was committed (its writes are refused)
    (`kvpager.plan_guard`). Make a new plan, or refill this one
    (`KVPool.refill`); nothing was written or read."""

    code = "stale_plan"


class RankTaken(InvalidArgument):
    """hello naming a tensor-parallel rank of a driver's session that another open
    session already serves (daemon only): two workers of one rank would write the
    same heads of the same blocks. Nothing was opened; close that worker (or wait
    out the heartbeat timeout of one whose process is gone) and say hello again.
    ``rank`` and ``holder`` (the serving session's public name) say which."""

    code = "rank_taken"


class Unauthorized(KVPagerError):
    """hello without the daemon's token (or with a wrong one); see docs/protocol.md, "Trust"."""

    code = "unauthorized"


class UnknownSequence(KVPagerError, KeyError):
    """The sequence id does not exist (never allocated, or already freed)."""

    code = "unknown_sequence"

    def __init__(self, seq_id: object):
        self.seq_id = seq_id
        super().__init__(f"unknown sequence {seq_id!r}")

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.seq_id,))


class SequenceSwapped(KVPagerError):
    """The sequence is swapped out to host memory; swap it in first."""

    code = "sequence_swapped"

    def __init__(self, seq_id: object, op: str = "this operation"):
        self.seq_id, self.op = seq_id, op
        super().__init__(f"sequence {seq_id!r} is swapped out; swap_in before {op}")

    def __reduce__(self):
        return (type(self), (self.seq_id, self.op))


class NotSwapped(KVPagerError):
    """swap_in of a sequence that is resident on the device."""

    code = "not_swapped"

    def __init__(self, seq_id: object):
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id!r} is not swapped out")

    def __reduce__(self):
        return (type(self), (self.seq_id,))


class NotOwner(KVPagerError):
    """The sequence belongs to another session (daemon), or a write's slot lies in a
    block the writer may not write (another session's, published, or one kept from
    before a free that is still cached for its prefix)."""

    code = "not_owner"


class NotPinned(KVPagerError):
    """unpin of a prefix the caller holds no pin on (never pinned, already
    unpinned, or pinned by another session)."""

    code = "not_pinned"


class UnsupportedConfiguration(KVPagerError):
    """A geometry or dtype the chosen backend's kernels do not support."""

    code = "unsupported"


class UnsupportedModel(UnsupportedConfiguration, ValueError):
    """A transformers model `kvpager.hf` cannot serve exactly: layers it does not
    attend (bidirectional, unknown kinds, recurrent ones whose states it cannot
    move), attention outside transformers' attention interface or more than once
    a layer, position biases (ALiBi), attention arguments it does not honour.
    The message names the model and the reason. Refused before anything is
    allocated, or with what the failed pass allocated freed; a ValueError, as
    these refusals always were. Raised in the model's process, never sent."""

    code = "unsupported_model"


class OutsidePagedPass(KVPagerError, RuntimeError):
    """kvpager attention called with no `kvpager.hf` pass of the calling thread: the
    model is switched to it (the switch lives in its shared config) while another
    thread's pass runs, or was loaded with ``attn_implementation="kvpager"``, and
    this call carries no batch. Still the RuntimeError it was before it had a type.
    Raised in the model's process, never sent."""

    code = "outside_paged_pass"


class BackendUnavailable(KVPagerError):
    """The requested device cannot be used here (no CUDA, no CuPy, ...)."""

    code = "backend_unavailable"


class IntegrityError(KVPagerError, AssertionError):
    """A broken allocator invariant: a bug in kvpager, never a caller mistake."""

    code = "integrity"


class ProtocolError(KVPagerError):
    """A malformed wire message: not msgpack, not a request, wrong shape (daemon only)."""

    code = "protocol_error"


class VersionMismatch(ProtocolError):
    """The request's protocol version is not the daemon's."""

    code = "version_mismatch"


class UnknownOp(ProtocolError):
    """The request names an op the daemon does not have."""

    code = "unknown_op"


class MessageTooLarge(ProtocolError):
    """A message over the size limit (KVPAGER_MAX_MESSAGE); send tensors through staging."""

    code = "message_too_large"


class SessionLost(KVPagerError):
    """The session is unknown to the daemon: it said bye, missed heartbeats, or the
    daemon restarted (then the pool epoch changed and mapped memory is stale).
    Its sequences are gone; open a new client."""

    code = "session_lost"


class DaemonUnavailable(KVPagerError, ConnectionError):
    """No daemon listens at the endpoint (or it stopped answering)."""

    code = "daemon_unavailable"


class RequestTimeout(KVPagerError, TimeoutError):
    """No reply within the deadline; the message names the setting to raise."""

    code = "timeout"


class InternalError(KVPagerError):
    """An unexpected exception inside the daemon: a bug in kvpager."""

    code = "internal"


ERRORS_BY_CODE: dict[str, type[KVPagerError]] = {
    cls.code: cls
    for cls in (
        KVPagerError,
        OutOfBlocks,
        InvalidArgument,
        LimitExceeded,
        StalePlan,
        RankTaken,
        Unauthorized,
        UnknownSequence,
        SequenceSwapped,
        NotSwapped,
        NotOwner,
        NotPinned,
        UnsupportedConfiguration,
        UnsupportedModel,
        OutsidePagedPass,
        BackendUnavailable,
        IntegrityError,
        ProtocolError,
        VersionMismatch,
        UnknownOp,
        MessageTooLarge,
        SessionLost,
        DaemonUnavailable,
        RequestTimeout,
        InternalError,
    )
}
