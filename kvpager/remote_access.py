"""What the remote tier asks of a store before it uses it (`Store.verify`,
at start): the commands it sends and what each is for, why a store refused
the tier's connection or commands (`connect_refusal`, `judge`), a value
limit or an output buffer limit too low (`check_limits`), a plain server
asked for TLS (`plain_redis`) and a TLS server asked for plain text
(`tls_only`); and the redis-py connection options every store uses, each
connect bounded as a whole (`bound_connects`, `bounded_pool`)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Sequence as Seq
from typing import Any

from kvpager.remote_errors import StoreMisconfigured, StoreRefused, store_error

#: what each command the tier sends is for (`Store.verify` names them)
_USES = {"GETRANGE": "lookups", "TYPE": "probes and writes", "SET": "writes", "STRLEN": "writes",
         "DEL": "deleting refused values", "ASKING": "lookups while a slot migrates", "PING": "checking a master"}
NEEDS = ("+getrange +type +set +strlen +del and +client|setname (+select for a DB other than 0) on keys "
          "kvpager:*")
NEEDS_CLUSTER = "+getrange +type +set +strlen +del +asking +ping +client|setname +cluster|slots +command on keys kvpager:*"


def connect_refusal(e: BaseException, needs: str = NEEDS) -> str:
    """Why a store refused to let the tier connect (`Store.verify`)."""
    redis = redis_module()
    if isinstance(e, redis.AuthenticationError):
        return (f"the credentials were refused ({type(e).__name__}: {e}); give the store's password "
                "(redis://:PASSWORD@HOST:PORT) or an ACL user's (redis://USER:PASSWORD@HOST:PORT)")
    if isinstance(e, redis.exceptions.NoPermissionError):
        return f"the ACL user may not connect as the tier does ({e}); it needs {needs}"
    return f"connecting was refused ({type(e).__name__}: {e})"


def untrusted_certificate(e: BaseException) -> str | None:
    """Why the store's TLS certificate can never pass the tier's check as it is
    configured (no CA given for a private one, another host's name), or None: a
    connection refused so looked like a store that does not answer, and the
    daemon ran on with every call failing. An expired certificate (renewed in
    place) is no such error."""
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" not in text or "expired" in text:
        return None
    return (f"its TLS certificate does not verify ({text.strip()}); give the CA that signed it "
            "(rediss://HOST:PORT?ssl_ca_certs=PATH) and connect by a name the certificate holds")


def judge(url: str, names: Seq[str], replies: Seq[Any], needs: str = NEEDS) -> list[str]:
    """The replies of `Store.verify`'s commands (``names``): a
    command refused (NOPERM, an unknown or renamed command) is
    `StoreMisconfigured` naming it; a replica's ``READONLY``, a full store's
    ``OOM`` or another refused write are warnings; a state that passes
    (``BUSY``, ``LOADING``, ...) is StoreError."""
    redis = redis_module()
    exc = redis.exceptions
    missing: dict[str, None] = {}  # once each (a cluster asks every master)
    warnings: dict[str, str] = {}
    for name, r in zip(names, replies):
        use = _USES[name]
        if not isinstance(r, Exception) or "WRONGTYPE" in str(r):
            continue
        e = store_error(r)
        if not isinstance(e, StoreRefused):
            raise e
        if isinstance(r, exc.ReadOnlyError):
            warnings["readonly"] = (f"a read-only replica ({name}: {r}): blocks are restored from it, none is "
                                    "written; give the master's address")
        elif isinstance(r, exc.OutOfMemoryError):
            warnings["oom"] = (f"full ({name}: {r}): writes are refused until keys expire; set maxmemory-policy "
                               "allkeys-lru (docs/remote.md)")
        elif use in ("writes", "deleting refused values") and not isinstance(r, exc.NoPermissionError) \
                and "unknown command" not in str(r):
            warnings[name] = f"refuses {use} ({name}: {r})"
        else:
            missing[f"{name} for {use} ({r})"] = None
    if missing:
        raise StoreMisconfigured(f"remote store {url} refuses commands the tier sends: {'; '.join(missing)}. "
                                 f"An ACL user needs {needs}")
    return list(warnings.values())


#: Bytes of a ``SET key value NX EX ttl`` beside its value, at most (a key of a few hundred bytes)
SET_OVERHEAD = 1024


def check_limits(url: str, client: Any, value_bytes: int, chunk_bytes: int | None = None) -> None:
    """`StoreMisconfigured` where the store's ``proto-max-bulk-len`` is below a
    value of the pool (it would drop the connection of every write of one), its
    ``client-query-buffer-limit`` below one write of a value (the same: every
    write failed, counted as an outage, while the check said the store was fine), or
    the hard output buffer limit of its normal clients
    (``client-output-buffer-limit normal HARD ...``) below the replies to one
    pipeline of a lookup (``chunk_bytes`` of values, rounded to whole values):
    Redis builds a pipeline's replies before the socket drains them and drops
    the connection past that limit, so every lookup of more than it failed, as
    an outage ("closed the connection mid-reply"), while the check said the
    store was fine. Each not checked where ``CONFIG GET`` is refused."""
    try:
        limit = int(config_value(client, "proto-max-bulk-len") or 0)
    except ValueError:
        limit = 0
    if 0 < limit < value_bytes:
        raise StoreMisconfigured(f"remote store {url}: its proto-max-bulk-len is {limit} bytes, a value of this "
                                 f"pool {value_bytes}: no block could be written; raise it (CONFIG SET "
                                 "proto-max-bulk-len)")
    try:  # a SET of one value is read whole into the client's query buffer
        query = int(config_value(client, "client-query-buffer-limit") or 0)
    except ValueError:
        query = 0
    if 0 < query < value_bytes + SET_OVERHEAD:
        raise StoreMisconfigured(f"remote store {url}: its client-query-buffer-limit is {query} bytes, a write "
                                 f"of one value of this pool {value_bytes + SET_OVERHEAD}: the store would drop "
                                 "the connection of every write; raise it (CONFIG SET client-query-buffer-limit)")
    if chunk_bytes is None:
        return
    try:
        classes = (config_value(client, "client-output-buffer-limit") or "").split()
        hard = int(classes[classes.index("normal") + 1])
    except (ValueError, IndexError):
        return
    per = max(1, round(chunk_bytes / value_bytes))  # values a pipeline (`remote_resp.ChunkedFetch`)
    replies = per * (value_bytes + len(f"${value_bytes}\r\n\r\n"))
    if 0 < hard < replies:
        raise StoreMisconfigured(f"remote store {url}: its client-output-buffer-limit for normal clients is "
                                 f"{hard} bytes (hard), the replies to one pipeline of a lookup ({per} values) "
                                 f"{replies}: the store would drop the connection of every lookup of more; "
                                 "raise it (CONFIG SET client-output-buffer-limit 'normal 0 0 0', the default)")


def config_value(client: Any, name: str) -> str | None:
    """``CONFIG GET name`` of a redis-py client; None where it is refused (an
    ACL user without ``CONFIG``, a managed service that renames it) or fails."""
    redis = redis_module()
    try:
        value = client.config_get(name).get(name)
    except (redis.RedisError, OSError, AttributeError):
        return None
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


def ttl_warning(policy: str | None, ttl: int) -> str | None:
    """Why blocks written with ``ttl`` (0: no expiry) would fill a store whose
    ``maxmemory-policy`` is ``policy``, or None: a ``volatile-*`` policy
    evicts only keys that expire, so once the store reaches ``maxmemory`` it
    evicts none of the tier's and refuses every write (``OOM``)."""
    if ttl or not (policy or "").startswith("volatile-"):
        return None
    return (f"its maxmemory-policy is {policy}, which evicts only keys with an expiry, and the tier writes "
            "blocks without one (ttl 0): once maxmemory is reached no block is evicted and every write is "
            "refused (OOM); set maxmemory-policy allkeys-lru, or a ttl (--remote-ttl)")


def plain_redis(host: str, port: int, timeout: float) -> bool:
    """True if a Redis answers plain text (no TLS) at host:port: ``PING``
    answered ``+PONG`` or an error (``-NOAUTH ...``)."""
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 1.0)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16)[:1] in (b"+", b"-")
    except OSError:
        return False


def tls_only(host: str, port: int, timeout: float) -> bool:
    """True if the server at host:port speaks TLS: a TLS handshake completes, or
    the server answers it with a TLS alert (it wants a client certificate). A
    plain Redis answers a handshake with a text error line: False, as for no
    answer at all. Nothing is verified: this only names the scheme to use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 1.0)) as sock, \
                context.wrap_socket(sock, do_handshake_on_connect=False) as tls:
            tls.do_handshake()
            return True
    except ssl.SSLError as e:
        return "ALERT" in str(e.reason or "").upper()
    except OSError:
        return False


def redis_module() -> Any:
    try:
        import redis
    except ImportError as e:
        raise ImportError(f"the remote tier needs the redis client: pip install 'kvpager[remote]' ({e})") from None
    return redis


def connection_options(redis: Any, timeout: float) -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return dict(socket_timeout=timeout, socket_connect_timeout=timeout, socket_keepalive=True,
                retry=Retry(NoBackoff(), 0), health_check_interval=0, client_name="kvpager")


#: round trips a connection's handshake may take (the socket, TLS, HELLO / AUTH, CLIENT SETNAME,
#: SELECT), each at most the store's timeout: `bound_connects`
CONNECT_ROUND_TRIPS = 5


def bound_connects(pool: Any, seconds: float) -> None:
    """Make each connection of redis-py's ``pool`` connect within ``seconds`` in all.
    redis-py bounds each read of the handshake's replies by the socket timeout, not
    the handshake: an endpoint on the store's address that sent a reply a byte at a
    time, never ending it, held an allocate (and the daemon's loop) for ever. Past
    ``seconds`` the socket is shut down, and the connect fails as a timeout does (the
    tier counts it and its breaker skips the store for a while)."""
    redis = redis_module()
    base = pool.connection_class
    if getattr(base, "bounded_connect", False):
        return

    class Bounded(base):  # type: ignore[misc, valid-type]
        bounded_connect = True

        def connect(self, *args: Any, **kwargs: Any) -> Any:
            cut = threading.Event()

            def shut() -> None:
                cut.set()
                sock = getattr(self, "_sock", None)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

            timer = threading.Timer(seconds, shut)
            timer.daemon = True
            timer.start()
            try:
                out = super().connect(*args, **kwargs)
            except Exception:
                if cut.is_set():
                    raise redis.TimeoutError(f"connecting took past {seconds:g} s (a handshake reply that "
                                             "did not end)") from None
                raise
            finally:
                timer.cancel()
            if cut.is_set():  # (cut as it finished: its socket is shut)
                self.disconnect()
                raise redis.TimeoutError(f"connecting took past {seconds:g} s")
            return out

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{base.__name__}"
    pool.connection_class = Bounded


def bounded_pool(seconds: float) -> type:
    """A redis-py ``ConnectionPool`` class whose connections each connect within
    ``seconds`` in all (`bound_connects`), for a cluster client to make every
    node's pool of: redis-py makes them itself (at the slot map's first read and
    each later one), and a node that sent its handshake reply a byte at a time
    held the call that connected to it for ever (each read inside the timeout),
    where a standalone store's connect was bounded."""
    redis = redis_module()

    class BoundedPool(redis.ConnectionPool):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            bound_connects(self, seconds)

    return BoundedPool


def diagnose_cluster(url: str, scheme: str, startup: Seq[tuple[str, int]], timeout: float,
                     auth: dict[str, Any]) -> None:
    """A cluster client could not be made: `StoreMisconfigured` where a node of the
    URL (``startup``) answers but refuses (credentials, CLUSTER SLOTS refused or
    no cluster there at all, no TLS); else nothing (the caller's error stands)."""
    redis = redis_module()
    for host, port in startup:
        client = redis.Redis(host=host, port=port, **connection_options(redis, timeout), **auth)
        bound_connects(client.connection_pool, CONNECT_ROUND_TRIPS * timeout)
        try:
            client.execute_command("CLUSTER", "SLOTS")
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:
            raise StoreMisconfigured(f"remote store {url}: {host}:{port}: "
                                     f"{connect_refusal(e, NEEDS_CLUSTER)}") from None
        except redis.ResponseError as e:
            if "cluster support disabled" in str(e):
                raise StoreMisconfigured(f"remote store {url}: {host}:{port} is no Redis Cluster node "
                                         f"(CLUSTER SLOTS: {e}); use redis://HOST:PORT") from None
            if isinstance(store_error(e), StoreRefused):
                raise StoreMisconfigured(f"remote store {url}: {host}:{port} refuses CLUSTER SLOTS "
                                         f"({type(e).__name__}: {e})") from None
        except (redis.RedisError, OSError):
            if scheme == "rediss" and plain_redis(host, port, timeout):
                raise StoreMisconfigured(f"remote store {url}: {host}:{port} answers without TLS; use "
                                         "redis+cluster:// (or enable TLS on the servers)") from None
        finally:
            with contextlib.suppress(Exception):
                client.close()
