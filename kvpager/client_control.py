"""`Client`'s control methods: pins, tenants' quotas, the session list.

A session's pins are its own: released when it ends, never dropped by
another session. ``keep=True`` pins are the daemon's own, outliving every
session; they and `set_quota` need a client opened with the daemon's
control token (`Client(control_token=...)`, else KVPAGER_CONTROL_TOKEN /
KVPAGER_CONTROL_TOKEN_FILE). See "Control" in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from kvpager.errors import ProtocolError
from kvpager.protocol import PINS_PAGE, decode_pin, decode_session, decode_stats
from kvpager.types import PinInfo, PoolStats, SessionInfo
from kvpager.validate import salt_value


def _args(prompts: Any, salt: Any, keep: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"prompts": prompts}
    if salt is not None:
        args["salt"] = salt_value(salt)
    if keep:
        args["keep"] = keep
    return args


def undo_pin(args: dict[str, Any], result: Any) -> dict[str, Any] | None:
    """The `unpin` arguments that undo a `pin` whose reply the caller never got
    (it timed out, then ran): its prompts that pinned something."""
    if not isinstance(result, list) or not isinstance(args.get("prompts"), list):
        return None
    done = [i for i, n in enumerate(result) if n]
    if not done:
        return None
    undo = dict(args, prompts=[args["prompts"][i] for i in done])
    if isinstance(args.get("salt"), list):
        undo["salt"] = [args["salt"][i] for i in done]
    return undo


class ControlMethods:
    """Mixed into `Client`, which supplies ``_call``."""

    def pin(self, prompts: Seq[Seq[int]], salt: Any = None, *, keep: bool = False) -> list[int]:
        """As `KVPool.pin`: the pins belong to this session (released when it
        ends), or with ``keep`` to the daemon (needs the control token)."""
        return self._call("pin", _args(prompts, salt, keep))

    def unpin(self, prompts: Seq[Seq[int]], salt: Any = None, *, keep: bool = False) -> list[int]:
        """As `KVPool.unpin`, of this session's pins (``keep``: of the daemon's)."""
        return self._call("unpin", _args(prompts, salt, keep))

    def pins(self) -> list[PinInfo]:
        """Every pin: each session's (``owner`` its name) and the daemon's (``owner`` None),
        in the order they were made (asked a page at a time, so the daemon never
        spends long on one request)."""
        out: list[PinInfo] = []
        while True:
            after = out[-1].pin_id if out else -1
            page = self._call("pins", {"after": after, "limit": PINS_PAGE})
            if not page:
                return out
            pins = [decode_pin(d) for d in page]
            if any(not isinstance(p.pin_id, int) or p.pin_id <= after for p in pins):
                raise ProtocolError(f"a page of pins after {after} holds one not after it: no kvpager daemon's "
                                    "reply (its pages go up)")
            out.extend(pins)

    def set_quota(self, salt: str | bytes | None, blocks: int | None) -> None:
        """As `KVPool.set_quota` (needs the control token)."""
        self._call("set_quota", {"salt": salt_value(salt), "blocks": blocks})

    def daemon_stats(self) -> tuple[PoolStats, dict[str, int]]:
        """`stats`, and the daemon's own counters beside it: ``sessions`` (open
        now) and ``requests`` (answered since it started; absent from older daemons)."""
        raw = self._call("stats", {})
        return decode_stats(raw), {k: raw[k] for k in ("sessions", "requests") if isinstance(raw.get(k), int)}

    def sessions(self) -> list[SessionInfo]:
        """The daemon's open sessions: public names, client names, pids, counts."""
        return [decode_session(d) for d in self._call("sessions", {})]
