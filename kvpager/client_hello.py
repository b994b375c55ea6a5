"""What a `Client` says in its ``hello``: its constructor's options checked
(each refused by name, never silently the default: `check_options`,
`checked_timeout`) and made into the hello's arguments (`hello_arguments`); and the hello asked again without ``quiet`` of a daemon that
predates it (docs/protocol.md, "hello")."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from kvpager import env, validate
from kvpager.backends.ranked import rank_spec
from kvpager.errors import InvalidArgument
from kvpager.spec import PoolSpec


def checked_timeout(timeout: Any) -> float:
    """Seconds a call waits: ``timeout``, else KVPAGER_TIMEOUT; InvalidArgument
    for anything but a positive finite number."""
    if timeout is not None and (not isinstance(timeout, (int, float, np.integer, np.floating))
                                or isinstance(timeout, bool)):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    seconds = env.timeout_s() if timeout is None else float(timeout)
    if not 0 < seconds < float("inf"):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    return seconds


def check_options(name: Any, token: Any, control_token: Any, rank: Any, quiet: Any) -> None:
    """InvalidArgument for an option of the wrong kind (before anything is asked)."""
    for arg, value in (("name", name), ("token", token), ("control_token", control_token)):
        if value is not None and not isinstance(value, str):  # not silently the default when falsy
            raise InvalidArgument(f"{arg} must be a str or None, got {type(value).__name__}")
    if not isinstance(quiet, bool):
        raise InvalidArgument(f"quiet must be a bool, got {type(quiet).__name__}")
    if rank is not None and (not validate.is_int(rank) or rank < 0):
        raise InvalidArgument(f"rank must be an int >= 0 (this worker's tensor-parallel rank), got {rank!r}")


def hello_arguments(name: str | None, token: str | None, control_token: str | None, rank: int | None,
                    driver_secret: str | None, quiet: bool) -> dict[str, Any]:
    """The ``hello`` arguments of a client of these options (`check_options`;
    ``driver_secret``: its driver's session secret, or None). The tokens default
    to the environment's (KVPAGER_TOKEN, KVPAGER_CONTROL_TOKEN and their files),
    read here: after the daemon was found (a token file that cannot be read,
    with no daemon there, says no daemon, as it did)."""
    host = socket.gethostname()
    args: dict[str, Any] = {"client": f"{host}:{os.getpid()}" if name is None else name, "pid": os.getpid(),
                            "host": host}
    token = token if token is not None else env.token()
    if token:
        args["token"] = token  # a daemon with a token asks for it (docs/protocol.md, "Trust")
    control_token = control_token if control_token is not None else env.control_token()
    if control_token:
        args["control_token"] = control_token
    if quiet:  # an inspection: the daemon logs its session's open and clean end at debug
        args["quiet"] = True
    if rank is not None:
        args["rank"] = int(rank)  # maps that rank's storage (docs/protocol.md, "Ranks")
    if driver_secret is not None:
        args["driver"] = driver_secret
    return args


def ask_hello(call: Callable[[str, dict[str, Any]], Any], args: dict[str, Any]) -> Any:
    """``call("hello", args)``; a daemon that predates ``quiet`` refuses the
    argument by its list of them: asked again without it (``args`` kept whole)."""
    try:
        return call("hello", args)
    except InvalidArgument as e:
        if "quiet" not in args or "'quiet'" not in str(e) or "optional" not in str(e):
            raise
        # (a copy: the client's own arguments keep it, for a reconnect to a daemon that takes it)
        return call("hello", {k: v for k, v in args.items() if k != "quiet"})


def rank_layout(ranks: int, spec: Any) -> tuple[int, int, int]:
    """What a rank worker's model shard depends on: the pool's rank count and its
    rank's kv heads and head dim."""
    return ranks, spec.num_kv_heads, spec.head_dim


def rank_layout_refusal(was: tuple[int, int, int] | None, info: dict[str, Any], endpoint: str) -> str | None:
    """Why a rank worker's hello reply ``info`` after its first (``was``: that one's
    `rank_layout`; None: this is the first) cannot be taken: a daemon restarted with
    another rank count made rank 1 of 2 (kv heads 2, 3) rank 1 of 4 (kv head 1)
    without a word, its `spec` changed under it and its attends, with its shard's
    query heads, read another head's K/V. None where it serves the same heads (or
    the reply is no daemon's: taking it says so)."""
    if was is None:
        return None
    try:
        ranks, rank = int(info.get("ranks") or 1), info.get("rank")
        pool = PoolSpec.from_dict(info["spec"])
        spec = rank_spec(pool, ranks, rank) if ranks > 1 and rank is not None else pool
    except (TypeError, KeyError, AttributeError, ValueError, IndexError):
        return None
    if rank_layout(ranks, spec) == was:
        return None
    return (f"the daemon at {endpoint} now has {ranks} ranks (rank {rank} holds {spec.num_kv_heads} kv heads), "
            f"where this rank worker's first session had {was[0]} ranks ({was[1]} kv heads): its model's shard no "
            "longer matches; start the worker again for the new layout")
