"""`kvpager serve`: run the daemon in the foreground until SIGINT / SIGTERM / SIGHUP."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
import sys
from types import SimpleNamespace
from typing import Any

import click

from kvpager import env
from kvpager.backends import parse_device
from kvpager.backends.ranked import rank_spec
from kvpager.errors import KVPagerError
from kvpager.events import FORMATS
from kvpager.limits import Limits
from kvpager.serve_options import (
    Size,
    build_spec,
    check_events_endpoints,
    check_remote,
    limit_options,
    parse_quotas,
    pool_devices,
    unconnected_tier,
)
from kvpager.spec import MODEL_PRESETS
from kvpager.tenants import quota_blocks

log = logging.getLogger("kvpager.server")

#: The signals that stop the daemon cleanly (exit status 0, nothing left behind).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Of those, the ones left ignored where the daemon was started with them ignored: `nohup`
#: ignores SIGHUP, and a shell without job control SIGINT for a command it runs in the
#: background (``kvpager serve &`` in a script). Taking them over ended a daemon started
#: under nohup when the terminal or ssh session that started it closed, every session with it.
#: SIGTERM always stops it (a daemon that ignores it leaves its pool behind at the SIGKILL).
IGNORED_KEPT = (signal.SIGINT, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The `STOP_SIGNALS` the daemon handles: all but those of `IGNORED_KEPT` it
    was started with ignored."""
    return tuple(sig for sig in STOP_SIGNALS if not (sig in IGNORED_KEPT and signal.getsignal(sig) == signal.SIG_IGN))


def remote_tier(opts: dict[str, Any], spec: Any = None) -> Any:
    """The `RemoteTier` of ``--remote`` for pools of ``spec``; an unreachable
    store is a warning (the daemon serves without it until it answers), a
    malformed URL an error, and so is a store that answers but refuses what
    the tier needs (`RemoteTier.check`: credentials, ACL commands, a cluster
    node given as a standalone store or the other way, TLS, value size)."""
    tier = unconnected_tier(opts)
    try:
        why = tier.check(spec)
    except BaseException:  # StoreMisconfigured (a KVPagerError: the caller exits with it)
        tier.close()
        raise
    remote_log = logging.getLogger("kvpager.remote")
    if tier.namespace is None:
        remote_log.warning(
            "remote store %s: no --remote-namespace: every daemon of this geometry that shares the store "
            "(another model of the same shape, a fine-tune of this one) finds these blocks, and restores "
            "them for the same tokens under the same salt; name the model (--remote-namespace, "
            "KVPAGER_REMOTE_NAMESPACE) unless every client salts by model (kvpager.hf's default salt does)",
            tier.store.url)
    if why is None:
        remote_log.info("remote tier: %s (%s), ttl %ss%s", tier.store.url, tier.store.kind, tier.ttl,
                        "" if tier.namespace is None else f", namespace {tier.namespace!r}")
    else:
        remote_log.warning("remote store %s does not answer (%s): serving without it until it does",
                           tier.store.url, why)
    return tier


@click.command()
@click.option("--model", help=f"Geometry: a preset ({', '.join(sorted(MODEL_PRESETS))}), a Hugging Face "
              "model folder or its config.json, or a hub model id (owner/name[@revision]: its config.json "
              "from the Hugging Face cache, else the hub) (layers, KV heads, head dim and dtype read from it).")
@click.option("--layers", type=click.IntRange(min=0), help="Number of layers.")
@click.option("--kv-heads", type=click.IntRange(min=0), help="KV heads per layer.")
@click.option("--head-dim", type=click.IntRange(min=0), help="Head dimension.")
@click.option("--block-size", type=click.IntRange(min=0), help="Tokens per block (default 16).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="K/V dtype.")
@click.option("--kv-dtype", type=click.Choice(["auto", "fp8", "float8_e4m3", "float8_e5m2"]), default=None,
              help="K/V storage: auto (the --dtype) or FP8 (fp8 = float8_e4m3), which halves the bytes of "
                   "a 16-bit pool; queries and outputs stay in --dtype.")
@click.option("--kv-scales", type=click.Path(dir_okay=False), default=None,
              help="FP8 scales: a JSON file of [layers][2 (K, V)][kv heads] floats (default: all 1.0).")
@click.option("--blocks", type=click.IntRange(min=0), help="Device blocks (block 0 included).")
@click.option("--memory", help="Device pool size instead of --blocks: bytes (8G), or a fraction of free "
              "memory (0.9 or 90%: of free GPU memory; on the CPU of available RAM and /dev/shm, less the host pool).")
@click.option("--host-blocks", type=click.IntRange(min=0), help="Host (swap) blocks.")
@click.option("--host-memory", help="Host (swap) pool size, e.g. 16G.")
@click.option("--device", default=None, help="cpu or cuda:N (default: a GPU if there is one).")
@click.option("--devices", default=None, metavar="LIST",
              help="Tensor parallelism: one rank per device, e.g. cuda:0,cuda:1 (or cpu,cpu); each rank holds "
                   "kv-heads / ranks heads of every block, one allocator serves them all.")
@click.option("--ranks", type=click.IntRange(min=1), default=None,
              help="Tensor-parallel ranks on N GPUs from --device on (cuda:0..N-1 by default), or N ranks "
                   "in host memory with --device cpu.")
@click.option("--endpoint", default=None, help="ipc://PATH or tcp://HOST:PORT (default: private ipc socket).")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.1, max=1e9), default=None,
              help="Seconds of silence before a session's sequences are freed (KVPAGER_HEARTBEAT_TIMEOUT).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="A file holding the secret clients must send in hello (KVPAGER_TOKEN / KVPAGER_TOKEN_FILE); "
                   "required for a TCP endpoint beyond loopback.")
@click.option("--remote", default=None, metavar="URL",
              help="Share committed prefix blocks across hosts through a store: redis://HOST:PORT, "
                   "rediss://, unix:///PATH, or a Redis Cluster: redis+cluster://HOST:PORT[,HOST:PORT].")
@click.option("--remote-namespace", default=None, envvar="KVPAGER_REMOTE_NAMESPACE", metavar="NAME",
              help="The model the stored blocks belong to (its name), part of every key: daemons of other "
                   "models of the same shape sharing the store never restore these blocks "
                   "(KVPAGER_REMOTE_NAMESPACE; see docs/remote.md).")
@click.option("--remote-timeout", type=click.FloatRange(min=0, min_open=True, max=60), default=0.1,
              show_default=True, envvar="KVPAGER_REMOTE_TIMEOUT",
              help="Seconds an allocate waits for the store before it counts as a miss (KVPAGER_REMOTE_TIMEOUT).")
@click.option("--remote-ttl", type=click.IntRange(min=0, max=(1 << 31) - 1), default=86400, show_default=True,
              help="Seconds a block lives in the store (0: until the store evicts it; at most 2**31 - 1).")
@click.option("--remote-queue", type=Size(), default="256M", show_default=True,
              help="Bytes of committed blocks waiting to be written; past it new ones are dropped "
                   "(one block at least, whatever the size).")
@click.option("--remote-max-restore", type=Size(), default="256M", show_default=True,
              help="Most bytes one allocate restores from the store (the daemon's loop waits for it); "
                   "one block at least, whatever the size.")
@click.option("--remote-connections", type=click.IntRange(min=1, max=64), default=2, show_default=True,
              help="Connections (and threads) one lookup fetches over, in chunks of about 4 MiB "
                   "(standalone stores; see docs/remote.md).")
@click.option("--max-pinned-blocks", type=click.IntRange(min=0), default=None,
              help="Most blocks pins may hold (default: half the usable device blocks, rounded down).")
@click.option("--quota", "quotas", multiple=True, metavar="SALT=BLOCKS",
              help="A tenant's quota on cached blocks: eviction takes from tenants over theirs first "
                   "(repeatable; an empty SALT is the default tenant).")
@click.option("--control-token-file", type=click.Path(dir_okay=False), default=None,
              help="A file holding the secret a session sends to set quotas and keep pins "
                   "(KVPAGER_CONTROL_TOKEN / KVPAGER_CONTROL_TOKEN_FILE); without one, quotas are fixed at start.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (KVPAGER_METRICS_PORT; 0: any free port).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics server binds (e.g. 0.0.0.0 for a Prometheus on another host).")
@click.option("--events-endpoint", default=None,
              help="Publish KV events (vLLM's BlockStored / BlockRemoved) on ZeroMQ PUB here, e.g. "
                   "tcp://127.0.0.1:5557 (KVPAGER_EVENTS_ENDPOINT).")
@click.option("--events-replay-endpoint", default=None,
              help="Replay socket for missed batches (default: the next TCP port, or the ipc path + .replay).")
@click.option("--events-replay-rate", type=Size(), default=None, metavar="BYTES",
              help="Bytes a second replay answers may send, all subscribers together, e.g. 64M "
                   "(KVPAGER_EVENTS_REPLAY_RATE; default 64M: the kept history in a few seconds).")
@click.option("--events-topic", default="", help="Topic of every event message (default: none, as vLLM).")
@click.option("--events-format", type=click.Choice(FORMATS), default="map", show_default=True,
              help="map: events as tagged maps (vLLM since mid-2026); array: tagged arrays (earlier vLLM).")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--dry-run", is_flag=True,
              help="Print the pool these options size (geometry, blocks, the tokens they hold, bytes) and "
                   "exit: nothing allocated, nothing bound.")
@limit_options
def serve(**opts: Any) -> None:
    """Run the kvpager daemon in the foreground (logs to stderr).

    SIGTERM, SIGINT or SIGHUP stops it: every session ended, the socket file and
    the shared memory removed, exit status 0. SIGINT and SIGHUP ignored when it
    starts (nohup; a script's background job) stay ignored."""
    logging.basicConfig(level=opts["log_level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM / SIGINT / SIGHUP are ours from the start: during start-up they end it
    # through the code that releases what is made (the pool's shared memory, a bound
    # socket); once they came before this and the default action left the segments in
    # /dev/shm. SIGHUP (the terminal or ssh session that ran `kvpager serve` closed)
    # ended the daemon by its default action: the pool's segments stayed in /dev/shm,
    # holding their memory until another daemon started, and the socket file stayed.
    made: list[Any] = []  # the Server, once made: a signal then stops it (run() closes it)
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        if made:
            made[0].stop()
        elif not stopping:
            stopping.append(signum)
            raise _Interrupted(signum)

    if opts["dry_run"]:
        return dry_run(opts)
    handled = stop_signals()
    for sig in (s for s in STOP_SIGNALS if s not in handled):
        log.info("%s is ignored (as nohup, or a shell's background job, leaves it): it does not stop the daemon",
                 signal.Signals(sig).name)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        try:
            server = _start(opts, made)
        except _Interrupted:
            return  # what was made is released on the way out; nothing served
        if server.metrics_port is not None:
            host = f"[{server.metrics_host}]" if ":" in server.metrics_host else server.metrics_host  # (IPv6)
            _announce(f"kvpager metrics on http://{host}:{server.metrics_port}/metrics")
        if server.events is not None:
            _announce(f"kvpager events on {server.events.endpoint} (replay {server.events.replay_endpoint})")
        # The line scripts wait for: the endpoint is bound and serving.
        _announce(f"kvpager serving on {server.endpoint}")
        server.run()
    finally:  # serve called in-process (tests, CliRunner) leaves the caller's handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce(line: str) -> None:
    """A start-up line on stderr; none where stderr is closed (a script's ``2>&1 |
    grep -m1 'serving on'`` that saw the log's line and exited, a log reader gone):
    the daemon serves on, as its log does. Its broken pipe ended a bound daemon
    with exit status 1 and its socket file left behind."""
    with contextlib.suppress(OSError):
        click.echo(line, err=True)


def warn_crossed_limits(limits: Limits) -> None:
    """Say where a session's limit passes the limit of all sessions together: the
    total binds first, and a session may never reach its own."""
    for one, total, what in (("sequences", "sequences_total", "live sequences"),
                             ("staging", "staging_total", "staging bytes")):
        if getattr(limits, one) > getattr(limits, total):
            log.warning("one session's %s limit (%d, --max-%s) is above all sessions' (%d, --max-%s): the total "
                        "binds first", what, getattr(limits, one), one.replace("_", "-"), getattr(limits, total),
                        total.replace("_", "-"))


def warn_pin_cap(opts: dict[str, Any], spec: Any) -> None:
    """Say where ``--max-pinned-blocks`` caps nothing: at least the pool's blocks
    (block 0 is never handed out), pins may hold every block, none left to serve."""
    cap = opts["max_pinned_blocks"]
    if cap is not None and cap >= spec.num_blocks:
        log.warning("--max-pinned-blocks %d is not below the pool's %d blocks: pins are bounded by the pool "
                    "alone (they may hold every block, leaving none to serve)", cap, spec.num_blocks)


def dry_run(opts: dict[str, Any]) -> None:
    """`kvpager serve --dry-run`: the pool the options size, printed, nothing made;
    every setting checked as a start checks it (`_settings`: a dry run took limits
    of 0 or past 2**62, a tcp:// endpoint beyond this host without a token, a CUDA
    device without CuPy, replay settings without an events endpoint, that a start
    then refused)."""
    got = _settings(opts, starting=False)
    spec, device, devices = got.spec, got.device, got.devices
    usable = spec.num_blocks - 1  # (block 0: the null block)
    rows = [
        ("model", opts["model"] or "-"),
        ("device", ", ".join(devices) if devices else device),
        ("layers x kv heads x head dim", f"{spec.num_layers} x {spec.num_kv_heads} x {spec.head_dim}"),
        ("dtype", spec.dtype + (f" (K/V stored as {spec.kv_dtype})" if spec.is_fp8 else "")),
        ("block size", f"{spec.block_size} tokens, {spec.bytes_per_block:,} bytes"),
        ("device blocks", f"{spec.num_blocks:,} ({usable:,} usable: {usable * spec.block_size:,} tokens)"),
        ("device bytes", f"{spec.device_bytes:,} ({spec.device_bytes / 2**30:.2f} GiB)"),
        ("host blocks", f"{spec.num_host_blocks:,} ({spec.host_bytes / 2**30:.2f} GiB)"),
        ("K/V bytes a token", f"{spec.bytes_per_token:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


class _Interrupted(BaseException):
    """SIGTERM / SIGINT / SIGHUP before the daemon serves: unwinds start-up (a BaseException,
    so no ``except Exception`` on the way swallows it, and every ``except
    BaseException`` that releases a segment or a socket runs)."""


def _settings(opts: dict[str, Any], starting: bool = True) -> SimpleNamespace:
    """Every setting of ``kvpager serve``'s options read and checked, nothing made
    (no memory, no socket bound): the devices, quotas, tokens, limits, endpoint,
    metrics port, pool geometry, events and remote settings. A start and a dry run
    (`dry_run`) refuse the same settings; only a start (``starting``) also looks
    whether the endpoint and the metrics port are free (a dry run sizes a pool
    beside a daemon that serves there)."""
    from kvpager.endpoints import (
        ensure_runtime_dir,
        ipc_path,
        is_default_socket,
        other_process_endpoint,
    )
    from kvpager.server import heartbeat_timeout_s
    from kvpager.server_bind import check_before_allocating, check_ipc_place, refuse_open_tcp

    device, devices = pool_devices(opts)
    if device.startswith("cuda") and importlib.util.find_spec("cupy") is None:
        raise click.ClickException(
            "--device cuda needs CuPy: pip install 'kvpager[cuda]' (CUDA 13 drivers) or 'kvpager[cuda12]' "
            "(CUDA 12); or serve with --device cpu")
    quotas = parse_quotas(opts["quotas"])
    try:
        if not devices:
            parse_device(device)
        for _, blocks in quotas:
            quota_blocks(blocks)  # (as `set_quota` refuses it at a start)
        env.cpu_threads()  # (read at each staged attend: a bad value failed every client's, not the start)
        token = env.read_token_file(opts["token_file"]) if opts["token_file"] else env.token(daemon=True)
        control = (env.read_token_file(opts["control_token_file"]) if opts["control_token_file"]
                   else env.control_token(daemon=True))
        for path in (opts["token_file"] or os.environ.get("KVPAGER_TOKEN_FILE"),
                     opts["control_token_file"] or os.environ.get("KVPAGER_CONTROL_TOKEN_FILE")):
            why = env.loose_token_file(path) if path else None
            if why:
                log.warning("%s", why)
        limits = Limits.from_env(**{f.name: opts[f"max_{f.name}"] for f in dataclasses.fields(Limits)})
        warn_crossed_limits(limits)
        metrics_port = opts["metrics_port"] if opts["metrics_port"] is not None else env.metrics_port()
        heartbeat_timeout_s(opts["heartbeat_timeout"])
        env.max_message_bytes()
        if starting:
            endpoint = check_before_allocating(opts["endpoint"], token,
                                               None if metrics_port is None else (opts["metrics_host"], metrics_port))
        else:  # (a malformed endpoint; TCP beyond loopback without a token; a socket's folder missing or
            # not this user's, which a start refused after a dry run passed; the default's a start makes,
            # in a runtime folder that must be private if it is there already)
            endpoint = other_process_endpoint(opts["endpoint"], bind=True)
            refuse_open_tcp(endpoint, token)
            if not is_default_socket(ipc_path(endpoint)):
                check_ipc_place(endpoint)
            elif os.path.lexists(env.runtime_dir()):
                ensure_runtime_dir()
        spec = build_spec(opts, device, devices)
        warn_pin_cap(opts, spec)
        if devices:  # (the ranks' split, refused as the daemon's start refuses it)
            rank_spec(spec, len(devices))
        events = None
        events_endpoint = opts["events_endpoint"] or env.events_endpoint()
        if events_endpoint:
            from kvpager.events_pub import EventsConfig

            rate = opts["events_replay_rate"]
            rate = rate if rate is not None else env.events_replay_rate()
            events = EventsConfig(events_endpoint, opts["events_replay_endpoint"], opts["events_topic"],
                                  opts["events_format"], **({"replay_rate": rate} if rate is not None else {}))
            check_events_endpoints(events, endpoint)
        elif opts["events_replay_endpoint"]:
            raise click.UsageError("--events-replay-endpoint needs --events-endpoint (or KVPAGER_EVENTS_ENDPOINT)")
        elif opts["events_replay_rate"] is not None:
            raise click.UsageError("--events-replay-rate needs --events-endpoint (or KVPAGER_EVENTS_ENDPOINT)")
        if opts["remote_namespace"] is not None and not opts["remote"] and \
                click.get_current_context().get_parameter_source("remote_namespace") \
                == click.core.ParameterSource.COMMANDLINE:  # (KVPAGER_REMOTE_NAMESPACE alone waits for --remote)
            raise click.UsageError("--remote-namespace needs --remote")
        if opts["remote"] and not starting:  # (a start builds the tier itself: `remote_tier`)
            check_remote(opts)
    except KVPagerError as e:
        raise click.ClickException(str(e)) from None
    return SimpleNamespace(device=device, devices=devices, quotas=quotas, token=token, control=control,
                           limits=limits, metrics_port=metrics_port, spec=spec, events=events)


def _start(opts: dict[str, Any], made: list[Any]) -> Any:
    """The bound `Server` of ``kvpager serve``'s options, also put in ``made`` as
    soon as it exists. Every check that needs no memory comes first (`_settings`:
    tokens, limits, the endpoint), so a mistake there allocates nothing."""
    from kvpager.server import Server
    from kvpager.server_bind import check_open_files, raise_open_files_limit

    got = _settings(opts)
    quotas = got.quotas
    try:
        soft, _ = raise_open_files_limit()  # (a file descriptor a connection)
        check_open_files(soft)  # (and sessions fitted to it once bound)
        remote = remote_tier(opts, got.spec) if opts["remote"] else None
        server = Server.create(got.spec, opts["endpoint"], got.device, devices=got.devices,
                               max_pinned_blocks=opts["max_pinned_blocks"],
                               remote=remote, heartbeat_timeout=opts["heartbeat_timeout"], limits=got.limits,
                               token=got.token, control_token=got.control, metrics_port=got.metrics_port,
                               metrics_host=opts["metrics_host"], events=got.events)
        made.append(server)
    except KVPagerError as e:
        raise click.ClickException(str(e)) from None
    try:
        for salt, blocks in quotas:
            server.pool.set_quota(salt, blocks)
    except KVPagerError as e:
        server.close()  # the pool's memory goes too
        raise click.ClickException(str(e)) from None
    try:
        server.bind()  # releases everything itself if it fails
    except KVPagerError as e:
        raise click.ClickException(str(e)) from None
    return server
