"""`Limits`: what one session or one request may ask of the daemon.

Each bounds the work or memory a single client can take from the others on
the daemon's one thread: a request over a limit is answered with
`LimitExceeded` (code ``limit_exceeded``), naming the setting, and changes
nothing. Defaults come from ``KVPAGER_MAX_*`` (`kvpager.env`); ``kvpager
serve --max-...`` overrides them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvpager import env
from kvpager.errors import InvalidArgument, LimitExceeded

#: The largest value of any limit (the decoder's bounds are C sizes)
MOST = 1 << 62


@dataclass(frozen=True)
class Limits:
    sequences: int = field(default=1 << 16, metadata={"least": 1, "help": "live sequences of one session"})
    sequences_total: int = field(default=1 << 22, metadata={
        "least": 1, "help": "live sequences of all sessions together (each costs the daemon ~400 bytes)"})
    ids: int = field(default=1 << 16, metadata={"least": 1, "help": "ids in one request (seq_ids, prompts, fork children)"})
    tokens: int = field(default=1 << 20, metadata={"least": 1, "help": "token ids in one request (prompts, appended tokens)"})
    staging: int = field(default=1 << 30, metadata={"help": "bytes of one session's staging buffer"})
    staging_total: int = field(default=4 << 30, metadata={"help": "bytes of all staging buffers together"})
    client_name: int = field(default=256, metadata={"least": 1, "help": "characters of hello's client name"})
    sessions: int = field(default=1024, metadata={"least": 1, "help": "sessions open at once"})
    kept: int = field(default=4 << 20, metadata={"help": "bytes of replies one session's retries may replay"})
    salt: int = field(default=4096, metadata={"help": "characters (or bytes) of one salt"})
    tables: int = field(default=4 << 30, metadata={
        "least": 1 << 20, "help": "bytes of the block tables of every session's sequences (one row each, as wide "
                                  "as the longest)"})
    attend_work: int = field(default=1 << 34, metadata={
        "least": 1 << 20, "help": "work of one staged attend: query-key pairs x (query heads x head dim + "
                                  "256), the pairs each query token's keys (at most its window or chunk)"})
    fork_work: int = field(default=1 << 26, metadata={
        "least": 1 << 16, "help": "block-table entries one fork makes (children x their parent's blocks)"})
    pin_blocks: int = field(default=1 << 16, metadata={
        "help": "blocks listed by one session's pins (each distinct pin its own: nested pins of one prompt each "
                "count theirs)"})

    @classmethod
    def from_env(cls, **overrides: int | None) -> Limits:
        """Defaults, then ``KVPAGER_MAX_*``, then the ``overrides`` (``kvpager serve
        --max-*``) that are not None. InvalidArgument, naming the variable or the
        flag, for a limit under its field's ``least``: 0 is no "unlimited" here, and
        ``--max-sessions 0`` (or 0 sequences, ids, tokens, client name characters)
        once started a daemon that refused every client, `kvpager stats` included."""
        given = {k: v for k, v in overrides.items() if v is not None}
        # (a variable a flag overrides is not read: a bad one refused a start that named the limit)
        values = {f.name: given[f.name] if f.name in given else env.limit(f.name.upper(), f.default)
                  for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            least = f.metadata.get("least", 0)
            where = f"--max-{f.name.replace('_', '-')}" if f.name in given else f"KVPAGER_MAX_{f.name.upper()}"
            if values[f.name] < least:
                zero = "0 is not unlimited; " if values[f.name] == 0 else ""
                raise InvalidArgument(f"{where} {values[f.name]}: the limit on {f.metadata['help']} must be "
                                      f"at least {least} ({zero}leave it out for the default)")
            if values[f.name] > MOST:  # (2**63 or more: every request, hello too, failed to decode)
                raise InvalidArgument(f"{where} {values[f.name]}: the limit on {f.metadata['help']} must be "
                                      f"at most 2**62 ({MOST})")
        return cls(**values)

    def check(self, name: str, value: int, what: str) -> None:
        """LimitExceeded if ``value`` is over limit ``name``."""
        maximum = getattr(self, name)
        if value > maximum:
            raise LimitExceeded(
                f"{what}: {value} is over the limit of {maximum} (KVPAGER_MAX_{name.upper()}, "
                f"kvpager serve --max-{name.replace('_', '-')})", name, value, maximum)
