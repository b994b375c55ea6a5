"""What `kvpager serve`'s options mean: sizes, limits, quotas, the pool's
geometry and devices, read and checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import click

from kvpager import env
from kvpager.errors import InvalidArgument, KVPagerError
from kvpager.limits import Limits
from kvpager.sizing import memory_budget, model_geometry
from kvpager.spec import MODEL_PRESETS, PoolSpec

log = logging.getLogger("kvpager.server")


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512M``, ``4G``, ``1.5GiB`` (binary units)."""
    try:
        return env.parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class Size(click.ParamType):
    """A count or a size with binary units (``65536``, ``64K``, ``1G``)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return env.parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def limit_options(fn: Any) -> Any:
    """--max-NAME for every field of `Limits` (default: KVPAGER_MAX_NAME, else built in)."""
    for f in reversed(dataclasses.fields(Limits)):
        flag = "--max-" + f.name.replace("_", "-")
        fn = click.option(flag, f"max_{f.name}", type=Size(), default=None,
                          help=f"Most {f.metadata['help']} (KVPAGER_MAX_{f.name.upper()}; default {f.default}).")(fn)
    return fn


def parse_quotas(items: tuple[str, ...]) -> list[tuple[str | None, int]]:
    """``--quota SALT=BLOCKS`` values (the last ``=`` splits: a salt may hold one)."""
    out = []
    for item in items:
        salt, sep, blocks = item.rpartition("=")
        blocks = blocks.strip()
        if not sep or not (blocks.isascii() and blocks.isdigit()):  # isdigit alone takes '²', which int() refuses
            raise click.BadParameter(f"{item!r} is not SALT=BLOCKS (e.g. --quota tenant-a=1024)",
                                     param_hint="--quota")
        if any(seen == (salt or None) for seen, _ in out):  # (the last one silently won)
            raise click.BadParameter(f"a second quota for {salt!r}: give each tenant one --quota",
                                     param_hint="--quota")
        out.append((salt or None, int(blocks)))
    return out


def build_spec(opts: dict[str, Any], device: str = "cpu", devices: list[str] | None = None) -> PoolSpec:
    """The pool geometry from the command-line options (a --model preset or a
    model's config.json fills in what the options leave out). ``devices``: the
    ranks of a tensor-parallel pool; ``--memory`` is then each device's budget
    (ranks sharing one device, the CPU, split it)."""
    model = opts["model"]
    geo: dict[str, Any] = {}
    if model:
        geo = dict(MODEL_PRESETS[model]) if model in MODEL_PRESETS else model_geometry(model)
    for opt, field in (("layers", "num_layers"), ("kv_heads", "num_kv_heads"),
                       ("head_dim", "head_dim"), ("dtype", "dtype"), ("block_size", "block_size")):
        if opts[opt] is not None:
            geo[field] = opts[opt]
    if opts.get("kv_dtype") not in (None, "auto"):
        geo["kv_dtype"] = opts["kv_dtype"]
    if opts.get("kv_scales"):
        geo["kv_scales"] = read_scales(opts["kv_scales"])
    missing = [f for f in ("num_layers", "num_kv_heads", "head_dim") if f not in geo]
    if missing:
        raise click.UsageError(f"give --model or all of --layers/--kv-heads/--head-dim (missing {missing})")
    if model and model not in MODEL_PRESETS and "dtype" not in geo:
        raise click.UsageError(f"--model {model}: its config.json names no torch_dtype; pass --dtype")
    if (opts["blocks"] is None) == (opts["memory"] is None):
        raise click.UsageError("give exactly one of --blocks and --memory")
    if opts["host_blocks"] is not None and opts["host_memory"] is not None:
        raise click.UsageError("give at most one of --host-blocks and --host-memory")
    if opts["memory"] is not None:
        host = parse_size(opts["host_memory"]) if opts["host_memory"] else 0
        if devices and len(devices) > 1:
            from kvpager.backends.ranked import rank_spec

            # each rank holds 1/R of a block: the pool is as many blocks as the tightest device fits
            budgets = [memory_budget(opts["memory"], d, host) for d in dict.fromkeys(devices)]
            per_rank = min(b // devices.count(d) for (b, _), d in zip(budgets, dict.fromkeys(devices)))
            how = "; ".join(h for _, h in budgets) + f", over {len(devices)} ranks"
            rank_spec(PoolSpec(num_blocks=2, **geo), len(devices))  # heads divisible, said before sizing
            budget = per_rank * len(devices)
        else:
            budget, how = memory_budget(opts["memory"], device, host)
        spec = PoolSpec.for_memory(budget, host_bytes=host, **geo)
        log.info("device pool: %d blocks from %s", spec.num_blocks, how)
    else:
        spec = PoolSpec(num_blocks=opts["blocks"], **geo)
        if opts["host_memory"]:
            spec = spec.replace(num_host_blocks=parse_size(opts["host_memory"]) // spec.bytes_per_block)
    if opts["host_blocks"] is not None:
        spec = spec.replace(num_host_blocks=opts["host_blocks"])
    if opts["host_memory"] and not spec.num_host_blocks:  # (swap was silently off)
        raise click.BadParameter(f"{opts['host_memory']} holds no block of {spec.bytes_per_block:,} bytes: give "
                                 "more, or leave it out for no host pool", param_hint="--host-memory")
    return spec


def read_scales(path: str) -> Any:
    """FP8 scales from a JSON file: [layers][2][kv heads] nested, or flat."""
    import json

    try:
        with open(path) as f:
            scales = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # (a file nested past the parser's depth)
        raise click.BadParameter(f"{path}: {e}", param_hint="--kv-scales") from None
    if scales is None:  # the spec's "no scales": a file given for scales meant some (it meant all 1.0)
        raise click.BadParameter(f"{path} holds null, not the scales", param_hint="--kv-scales")
    return scales


def serve_devices(opts: dict[str, Any], default_device: Any) -> list[str] | None:
    """The ranks' devices from --devices / --ranks (None: one device, --device)."""
    from kvpager.backends.ranked import check_devices

    listed, ranks = opts["devices"], opts["ranks"]
    if listed is None and ranks is None:
        return None
    if listed is not None and opts["device"] is not None:
        raise click.UsageError("give --device or --devices, not both")
    try:
        if listed is not None:
            devices = check_devices(listed)
            if ranks is not None and ranks != len(devices):
                raise click.UsageError(f"--ranks {ranks} but --devices names {len(devices)}")
            return devices
        from kvpager.backends import parse_device

        kind, first = parse_device(opts["device"] or default_device())
        devices = ["cpu"] * ranks if kind == "cpu" else [f"cuda:{first + i}" for i in range(ranks)]
        return check_devices(devices)
    except KVPagerError as e:
        raise click.UsageError(str(e)) from None


def pool_devices(opts: dict[str, Any]) -> tuple[str, list[str] | None]:
    """The pool's (first) device and, tensor-parallel, its ranks' (`serve_devices`)."""
    from kvpager.backends import default_device

    devices = serve_devices(opts, default_device)
    return (devices[0] if devices else (opts["device"] or default_device())), devices


def check_events_endpoints(events: Any, endpoint: str) -> None:
    """InvalidArgument for KV events endpoints a start cannot bind: the daemon's
    own, ``inproc://`` (no other process can subscribe), or an ipc:// socket whose
    folder is missing or not this user's (`check_ipc_place`; a start said that as
    a lock file's errno)."""
    from kvpager.endpoints import endpoint_key
    from kvpager.server_bind import check_ipc_place

    for ep in (events.endpoint, events.replay_endpoint):
        if endpoint_key(ep) == endpoint_key(endpoint):
            raise InvalidArgument(f"the KV events endpoints must differ from the daemon's {endpoint}")
        if ep.startswith("inproc://"):
            raise InvalidArgument(f"KV events endpoint {ep!r}: inproc:// reaches only this process, where no "
                                  "subscriber runs: give an ipc:// or tcp:// endpoint")
        check_ipc_place(ep, "--events-endpoint / --events-replay-endpoint")


def unconnected_tier(opts: dict[str, Any]) -> Any:
    """The `RemoteTier` of ``kvpager serve``'s ``--remote`` options, not connected
    yet (it connects at its first call); ClickException where a dependency of
    the tier is missing (the message says which)."""
    from kvpager.remote_tier import RemoteTier

    try:
        return RemoteTier(opts["remote"], timeout=opts["remote_timeout"], ttl=opts["remote_ttl"],
                          queue_bytes=opts["remote_queue"], max_restore_bytes=opts["remote_max_restore"],
                          connections=opts["remote_connections"], namespace=opts["remote_namespace"])
    except ImportError as e:
        raise click.ClickException(str(e)) from None


def check_remote(opts: dict[str, Any]) -> None:
    """``--remote``'s URL and the tier's settings checked as a start checks them,
    nothing connected."""
    unconnected_tier(opts).close()
