"""`kvpager pin | unpin | pins | quota | tenants | sessions`: control a running daemon.

A command's session ends when it exits, so `kvpager pin` makes the daemon's
own pins (``keep``), which outlive it; those and `kvpager quota` need the
daemon's control token (``--control-token-file``, KVPAGER_CONTROL_TOKEN or
KVPAGER_CONTROL_TOKEN_FILE). Token ids come as JSON from a file or stdin
(``-``): one list of ids, or a list of such lists.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from kvpager import env, render
from kvpager.errors import KVPagerError, Unauthorized
from kvpager.inspect_cli import Seconds, daemon_command, emit, fail

CONTROL_HINT = ("pass the daemon's control token: --control-token-file FILE, or KVPAGER_CONTROL_TOKEN / "
                "KVPAGER_CONTROL_TOKEN_FILE (the daemon's own: kvpager serve --control-token-file)")


def control_fail(e: KVPagerError, opened: bool) -> None:
    """`fail`, with the control token's hint where the control token was refused: a
    control op's Unauthorized once the session is open (its token was taken), or
    hello's refusal of the control token (not the session token's hint)."""
    if isinstance(e, Unauthorized) and (opened or "control token" in str(e)):
        click.echo(f"error: {e}", err=True)
        click.echo(f"next: {CONTROL_HINT}", err=True)
        sys.exit(6)
    fail(e)


def control_command(fn: Callable[..., None]) -> click.Command:
    """A command that needs the control token: as `daemon_command`, plus --control-token-file."""

    @click.option("--endpoint", default=None, help="Daemon endpoint (default: KVPAGER_ENDPOINT or the private ipc socket).")
    @click.option("--timeout", type=Seconds(open_low=True, high=sys.float_info.max), default=None,
                  help="Seconds to wait for each reply (KVPAGER_TIMEOUT; default 10).")
    @click.option("--control-token-file", type=click.Path(dir_okay=False), default=None,
                  help="The daemon's control token (default: KVPAGER_CONTROL_TOKEN / KVPAGER_CONTROL_TOKEN_FILE).")
    @functools.wraps(fn)
    def wrapper(endpoint: str | None, timeout: float | None, control_token_file: str | None, **kwargs: Any) -> None:
        from kvpager.client import Client
        from kvpager.endpoints import other_process_endpoint

        try:
            endpoint = other_process_endpoint(endpoint)
            token = env.read_token_file(control_token_file) if control_token_file else env.control_token()
            client = Client(endpoint, timeout=timeout, heartbeat=False, map_pool=False, name="kvpager-cli",
                            control_token=token)
        except KVPagerError as e:
            control_fail(e, opened=False)
        try:
            fn(client, **kwargs)
        except KVPagerError as e:
            control_fail(e, opened=True)
        finally:
            client.close()

    return click.command()(wrapper)


#: the most bytes of token ids read, from a file or stdin
TOKENS_MOST = 1 << 30


def _stdin(most: int) -> str:
    """Stdin's text, at most ``most`` bytes (``< /dev/zero`` read until memory ran out)."""
    data = sys.stdin.buffer.read(most + 1)
    if len(data) > most:
        raise ValueError(f"stdin holds more than {most} bytes")
    return data.decode("utf-8", "strict")


def read_prompts(path: str) -> list[list[int]]:
    """Prompts from a JSON file (``-``: stdin): a list of token ids or a list of them."""
    try:
        text = _stdin(TOKENS_MOST) if path == "-" else env.read_file(path, "the token ids file", TOKENS_MOST)
        data = json.loads(text)
    except (OSError, ValueError, RecursionError) as e:  # (a file nested past the parser's depth)
        raise click.BadParameter(f"cannot read token ids from {path}: {e}") from None
    if isinstance(data, list) and all(type(t) is int for t in data):
        data = [data]
    if not (isinstance(data, list) and data and all(isinstance(p, list) and all(type(t) is int for t in p)
                                                       for p in data)):
        raise click.BadParameter(f"{path} must hold a JSON list of token ids, or a list of such lists")
    return data


_salt = click.option("--salt", default=None, help="The prefix cache salt the prompts were allocated with.")
_tokens = click.argument("tokens_file", metavar="TOKENS.json")


@control_command
@_salt
@_tokens
def pin(client: Any, salt: str | None, tokens_file: str) -> None:
    """Pin the cached prefix of each prompt (the daemon's pin: it outlives this
    command; `kvpager unpin` with the same prompts drops it)."""
    prompts = read_prompts(tokens_file)
    for n, p in zip(client.pin(prompts, salt, keep=True), prompts):
        click.echo(f"pinned {n} of {len(p)} tokens" + ("" if n else " (nothing of it is cached yet)"))


@control_command
@_salt
@_tokens
def unpin(client: Any, salt: str | None, tokens_file: str) -> None:
    """Drop one of the daemon's pins per prompt (its longest pinned prefix)."""
    for n in client.unpin(read_prompts(tokens_file), salt, keep=True):
        click.echo(f"unpinned {n} tokens")


@control_command
@click.argument("salt")
@click.argument("blocks")
def quota(client: Any, salt: str, blocks: str) -> None:
    """Set tenant SALT's quota on cached blocks to BLOCKS ('none' removes it; SALT
    '' is the default tenant). Eviction takes from tenants over quota first."""
    if blocks.lower() == "none":
        value = None
    elif blocks.isascii() and blocks.isdigit():  # str.isdigit alone takes '²', which int() refuses
        value = int(blocks)
    else:
        raise click.BadParameter(f"BLOCKS must be a number of blocks or 'none', got {blocks!r}")
    client.set_quota(salt or None, value)
    click.echo(f"tenant {render.salt_label(salt)}: {'no quota' if value is None else f'quota {value} blocks'}")


# A SALT or BLOCKS beginning with '-' (a tenant '-x', a careless -1) is an argument, not an unknown option:
# "No such option '-1'" said nothing of BLOCKS, and such a tenant could be given only after '--'
quota.context_settings["ignore_unknown_options"] = True


@daemon_command
def pins(client: Any, as_json: bool) -> None:
    """Every pin: the daemon's and each session's."""
    got = client.pins()
    emit(as_json, [p.to_dict() for p in got], render.pins_text(got))


@daemon_command
def tenants(client: Any, as_json: bool) -> None:
    """Cached blocks per tenant (salt), with quotas."""
    st = client.stats()
    emit(as_json, [t.to_dict() for t in st.tenants], render.tenants_text(st.tenants, st.num_tenants))


@daemon_command
def sessions(client: Any, as_json: bool) -> None:
    """Open sessions: name, client pid and name, sequences, pins, requests."""
    got = [s for s in client.sessions() if s.name != client.session_name]  # not this command's own
    emit(as_json, [vars(s) for s in got], render.sessions_text(got))


COMMANDS = [pin, unpin, quota, pins, tenants, sessions]
