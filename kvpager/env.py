"""Every environment variable kvpager reads, in one place (all prefixed KVPAGER_)."""

from __future__ import annotations

import os
import re
from fractions import Fraction


def _get(name: str, default: str) -> str:
    return os.environ.get(f"KVPAGER_{name}", default)


def endpoint() -> str | None:
    """KVPAGER_ENDPOINT: the daemon endpoint clients and CLI commands use."""
    return os.environ.get("KVPAGER_ENDPOINT") or None


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(f"KVPAGER_{name}")
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_{name}={raw!r} must be a positive number of seconds")
    return value


def native() -> bool:
    """KVPAGER_NATIVE: 0 turns the compiled parts off (the decode step, kvpager.native; the CPU
    attention kernel, kvpager.cpu_attention); anything else, or unset, leaves them on."""
    return _get("NATIVE", "1").strip() != "0"


def cpu_threads() -> int | None:
    """KVPAGER_CPU_THREADS: the most threads the CPU attention kernel uses
    (kvpager.cpu_attention); unset: the CPUs this process may run on."""
    raw = os.environ.get("KVPAGER_CPU_THREADS")
    if raw is None or raw.strip() == "":
        return None
    if not (raw.strip().isascii() and raw.strip().isdigit()) or int(raw) < 1:  # (isdigit alone takes '²')
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_CPU_THREADS={raw!r} must be a whole number of threads, at least 1")
    return int(raw)


def timeout_s() -> float:
    """KVPAGER_TIMEOUT: seconds a client waits for a reply before TimeoutError."""
    return _seconds("TIMEOUT", 10.0)


def heartbeat_timeout_s() -> float:
    """KVPAGER_HEARTBEAT_TIMEOUT: seconds of silence after which the daemon ends a session."""
    return _seconds("HEARTBEAT_TIMEOUT", 5.0)


def metrics_port() -> int | None:
    """KVPAGER_METRICS_PORT: the daemon serves Prometheus metrics at
    http://127.0.0.1:PORT/metrics (0: any free port; unset: no metrics)."""
    raw = os.environ.get("KVPAGER_METRICS_PORT")
    if raw is None or raw.strip() == "":
        return None
    if not (raw.strip().isascii() and raw.strip().isdigit()) or int(raw) > 65535:  # (isdigit alone takes '²')
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_METRICS_PORT={raw!r} must be a TCP port in [0, 65535]; unset it or fix it")
    return int(raw)


def events_endpoint() -> str | None:
    """KVPAGER_EVENTS_ENDPOINT: where the daemon publishes KV events (ZeroMQ PUB)
    and where `kvpager events` subscribes; unset: no events."""
    return os.environ.get("KVPAGER_EVENTS_ENDPOINT") or None


def events_replay_rate() -> int | None:
    """KVPAGER_EVENTS_REPLAY_RATE: bytes a second the daemon's KV-event replay
    answers may send, all subscribers together (e.g. 64M); unset: the built-in
    default (`kvpager.events_pub.REPLAY_RATE`)."""
    raw = os.environ.get("KVPAGER_EVENTS_REPLAY_RATE")
    if raw is None or raw.strip() == "":
        return None
    value = _number("EVENTS_REPLAY_RATE", 0)
    if value <= 0:
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_EVENTS_REPLAY_RATE={raw!r} must be a positive number of bytes a second "
                              "(e.g. 64M); unset it or fix it")
    return value


def runtime_dir() -> str:
    """KVPAGER_RUNTIME_DIR: directory (mode 0700) for the default ipc:// socket, an
    absolute path (unset or empty: ``$XDG_RUNTIME_DIR/kvpager`` where that is an
    absolute path, else ``/tmp/kvpager-<uid>``)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    # the XDG spec: a relative (or empty) XDG_RUNTIME_DIR is invalid and ignored
    default = os.path.join(xdg, "kvpager") if xdg and os.path.isabs(xdg) else f"/tmp/kvpager-{os.getuid()}"
    raw = os.environ.get("KVPAGER_RUNTIME_DIR")
    if not raw:  # unset, or set empty: the default (an empty path was the current directory)
        return default
    if not os.path.isabs(raw):
        from kvpager.errors import InvalidArgument

        # a daemon and its clients started in other directories would look for other sockets
        raise InvalidArgument(f"KVPAGER_RUNTIME_DIR={raw!r} must be an absolute path; unset it or fix it")
    return raw


def cuda_arch_list() -> list[str]:
    """KVPAGER_CUDA_ARCH: extra nvcc -arch values for kernel compile checks (comma separated)."""
    raw = _get("CUDA_ARCH", "")
    return [a for a in raw.split(",") if a]


#: the least KVPAGER_MAX_MESSAGE a daemon takes: a batch of a few prompts must fit
MIN_MESSAGE = 64 << 10
#: The largest message limit taken (a size past it overflowed ZeroMQ's option with a traceback).
MAX_MESSAGE = 1 << 31


def max_message_bytes() -> int:
    """KVPAGER_MAX_MESSAGE: largest wire message in bytes (default 16 MiB); tensors
    go through shared memory, so only very large prompt batches come near it.
    InvalidArgument under `MIN_MESSAGE` (0 once meant the default without a word,
    and 10 started a daemon that refused every request, ``hello`` included)."""
    value = _number("MAX_MESSAGE", 16 << 20)
    if not MIN_MESSAGE <= value <= MAX_MESSAGE:
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_MAX_MESSAGE={os.environ.get('KVPAGER_MAX_MESSAGE')!r} is "
                              + (f"under {MIN_MESSAGE} bytes (64K): no request but the smallest would fit"
                                 if value < MIN_MESSAGE else f"over {MAX_MESSAGE} bytes (2G)")
                              + "; unset it or give a size such as 16M")
    return value


def _number(name: str, default: int, parse: type = int) -> int:
    raw = os.environ.get(f"KVPAGER_{name}")
    if raw is None or raw == "":
        return default
    try:
        value = parse_size(raw) if parse is int else parse(raw)
    except ValueError:
        value = None
    if value is None or value < 0:
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"KVPAGER_{name}={raw!r} is not a non-negative whole number or a size "
                              "like 64M; unset it or fix it")
    return value


def parse_size(text: str) -> int:
    """A count or a size: ``123``, ``64K``, ``512M``, ``4G``, ``1.5GiB`` (binary units).
    A fraction needs a unit (``1.5G``): ``1.5`` alone is no count, and was once
    cut to 1 without a word (``--max-sequences 1.5``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a number or a size like 4096, 512M or 4G")
    if "." in m.group(1) and not m.group(2) and float(m.group(1)) != int(float(m.group(1))):
        raise ValueError(f"{text!r} is not a whole number: give a count, or a size with a unit (e.g. 1.5G)")
    # exact, as the callers' range checks need it (a float rounded 2**63 - 1 up to 2**63,
    # and overflowed on 400 digits: a traceback)
    return int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def limit(name: str, default: int) -> int:
    """KVPAGER_MAX_<NAME>: a daemon limit (see `kvpager.limits.Limits`)."""
    return _number(f"MAX_{name}", default)


#: the shortest token a daemon takes (from a file or the environment alike)
MIN_TOKEN = 16


def token(daemon: bool = False) -> str | None:
    """KVPAGER_TOKEN, else the contents of the file KVPAGER_TOKEN_FILE: the
    secret a daemon with a token asks for in hello (see docs/protocol.md, "Trust").
    ``daemon``: the daemon's own, held to the token file's rule (`check_token`):
    a short or blank KVPAGER_TOKEN once served as given, or as no token at all."""
    return _secret("TOKEN", daemon)


def control_token(daemon: bool = False) -> str | None:
    """KVPAGER_CONTROL_TOKEN, else the contents of the file KVPAGER_CONTROL_TOKEN_FILE:
    the secret a session sends in hello to be let set quotas and keep pins
    (see docs/protocol.md, "Control"). ``daemon``: as `token`'s."""
    return _secret("CONTROL_TOKEN", daemon)


def _secret(name: str, daemon: bool) -> str | None:
    value = os.environ.get(f"KVPAGER_{name}")
    # (a blank one: a daemon refuses it, it served with no token; a client takes it as unset: it hid
    # the token file)
    if value and (daemon or value.strip()):
        return check_token(value.strip(), f"KVPAGER_{name}") if daemon else value.strip()
    path = os.environ.get(f"KVPAGER_{name}_FILE")
    return read_token_file(path) if path else None


def check_token(value: str, where: str) -> str:
    """``value`` if it is long enough to be a secret, else InvalidArgument naming ``where``."""
    if len(value) < MIN_TOKEN:
        from kvpager.errors import InvalidArgument

        raise InvalidArgument(f"the token in {where} is {len(value)} characters; use at least {MIN_TOKEN} "
                              "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)")
    return value


def read_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; OSError
    (with its message) for anything else: a device (/dev/urandom was read until
    the machine's memory ran out) or a FIFO (opening it waited for a writer for
    good) is refused before it is opened, a larger file after ``limit`` bytes."""
    import stat

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{what} {path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{what} {path} is larger than {limit} bytes")
    return data


def read_token_file(path: str) -> str:
    """The token in the file ``path`` (`check_token`'s rule; at most 64 KiB)."""
    from kvpager.errors import InvalidArgument

    try:
        value = read_file(path, "the token file", 64 << 10).decode("utf-8").strip()
    except OSError as e:
        raise InvalidArgument(f"cannot read the token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:  # a token is text: a binary file was once a traceback
        raise InvalidArgument(f"the token file {path} is not UTF-8 text: is it the token file?") from None
    return check_token(value, path)


def loose_token_file(path: str) -> str | None:
    """A warning if the token file ``path`` may be read by other users (group or
    other permission bits), else None. A warning, not a refusal: a file made
    with the usual umask (644) in a private directory is safe, and the daemon
    cannot judge every directory above it."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (f"the token file {path} has mode {mode:o}: other users may read the token; "
            f"chmod 600 {path}")
