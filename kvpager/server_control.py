"""The daemon's control ops: pins, tenants' quotas, and the session list.

Who may do what (see "Control" in docs/protocol.md):

- ``pin`` / ``unpin``: any session, on its own pins only. A session's pins
  are released when it ends (bye, missed heartbeats), like its sequences, so
  a crashed worker holds nothing. One session never sees another's pins as
  its own: its ``unpin`` of a prefix that only another session pinned is
  ``not_pinned``.
- ``pin`` / ``unpin`` with ``keep``: the daemon's own pins, which outlive
  every session (until unpinned or the daemon stops); ``set_quota``: every
  tenant's eviction order. Both change what every tenant gets, and a salt is
  no credential (anyone can send any salt), so both need a session opened
  with the daemon's control token (``kvpager serve --control-token-file``);
  a daemon without one has quotas fixed at start (``--quota``) and no kept
  pins.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from kvpager import protocol
from kvpager.errors import InvalidArgument, Unauthorized
from kvpager.pins import SALT_BYTES_A_BLOCK
from kvpager.wire_args import wire_int, wire_prompts

if TYPE_CHECKING:
    from kvpager.sessions import Session


def _prompts(a: dict[str, Any], op: str) -> list[Any]:
    return wire_prompts(a["prompts"], op)


class ControlOps:
    """Op handlers mixed into `Server` (through `ServerOps`); the server supplies
    ``pool``, ``sessions`` and ``control_token``."""

    def _control(self, s: Session, op: str) -> None:
        """Unauthorized unless ``s`` was opened with the control token."""
        if not s.control:
            how = ("open the session with the daemon's control token (Client(control_token=...), "
                   "KVPAGER_CONTROL_TOKEN or KVPAGER_CONTROL_TOKEN_FILE)" if self.control_token is not None
                   else "this daemon has no control token: start it with --control-token-file")
            raise Unauthorized(f"{op} changes every tenant's share of the pool: {how}")

    def _check_control_token(self, given: Any) -> bool:
        """hello's ``control_token``: True if it is the daemon's; Unauthorized if
        wrong. A daemon without one opens an ordinary session (a worker that
        inherits KVPAGER_CONTROL_TOKEN still connects; its control ops say why not)."""
        if given is None or self.control_token is None:
            return False
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.control_token.encode()):
            raise Unauthorized("hello: the control token given is wrong")
        return True

    def _pin_owner(self, s: Session, a: dict[str, Any], op: str) -> Any:
        keep = a.get("keep", False)
        if not isinstance(keep, bool):
            raise InvalidArgument(f"{op}: keep must be a bool, got {keep!r}")
        if keep:
            self._control(s, f"{op} with keep")
            return None  # the pool's own pins
        return s.name

    def _op_pin(self, s: Session, a: dict[str, Any]) -> list[int]:
        prompts = _prompts(a, "pin")
        owner = self._pin_owner(s, a, "pin")
        # a session's pins list at most `Limits.pin_blocks` blocks (memory, and the `pins` reply)
        listed = None if owner is None else self.limits.pin_blocks
        return self.pool.pin(prompts, a.get("salt"), owner=owner, max_listed=listed)

    def _op_unpin(self, s: Session, a: dict[str, Any]) -> list[int]:
        prompts = _prompts(a, "unpin")
        return self.pool.unpin(prompts, a.get("salt"), owner=self._pin_owner(s, a, "unpin"))

    def _op_pins(self, s: Session | None, a: dict[str, Any]) -> list[dict[str, Any]]:
        # A page at a time (`PINS_PAGE` pins, `PINS_PAGE_BLOCKS` blocks listed): every
        # session's pins at once stalled the loop for as long as they listed blocks.
        limit = wire_int(a.get("limit", protocol.PINS_PAGE), "limit")
        if not 1 <= limit <= protocol.PINS_PAGE:
            raise InvalidArgument(f"pins: limit must be in [1, {protocol.PINS_PAGE}], got {limit}")
        after = wire_int(a.get("after", -1), "after")
        # blocks listed (a salt's bytes counted 8 to a block) within half the message limit too
        most = max(1, min(protocol.PINS_PAGE_BLOCKS, self.max_message_bytes // (2 * SALT_BYTES_A_BLOCK)))
        return [protocol.encode_pin(p) for p in self.pool.pins_page(after, limit, most)]

    def _op_set_quota(self, s: Session, a: dict[str, Any]) -> None:
        self._control(s, "set_quota")
        self.pool.set_quota(a["salt"], a["blocks"])

    def _op_sessions(self, s: Session | None, a: dict[str, Any]) -> list[dict[str, Any]]:
        now, wall = time.monotonic(), time.time()
        pins = self.pool.pin_counts()
        return [dict(name=x.name, client=x.client, pid=x.pid, sequences=x.num_seqs, pins=pins.get(x.name, 0),
                     requests=x.ops, age_s=round(wall - x.opened, 3), idle_s=round(now - x.last_seen, 3),
                     control=x.control, rank=x.rank, driver=x.driver)
                for x in self.sessions.by_name.values()]
