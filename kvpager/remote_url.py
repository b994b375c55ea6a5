"""Remote store URLs (``--remote``): their forms, checked, and shown without a password.

- ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (port 6379 if none; an IPv6
  address in brackets), ``rediss://...`` (TLS),
  ``unix:///PATH.sock[?db=N]``; ``valkey://`` and ``valkeys://`` are the same;
- ``redis+cluster://HOST:PORT[,HOST:PORT...]`` (``rediss+cluster://``,
  ``valkey+cluster://``): a Redis Cluster, found from any of those nodes.

A URL that does not parse, or that redis-py would read as another place (a
DB that is no number, a Unix URL with a host part, a cluster URL with a DB
or options), or with a query option not in `OPTIONS` or a value it does not
take, is `InvalidArgument` (`check_url`); a password (in the credentials or a
``password=`` option) is never shown (`redact`).
"""

from __future__ import annotations

import re
import urllib.parse

from kvpager.errors import InvalidArgument

#: scheme -> redis-py's scheme, for a standalone store and for a cluster
STANDALONE = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss", "unix": "unix"}
CLUSTER = {"redis+cluster": "redis", "rediss+cluster": "rediss", "valkey+cluster": "redis",
           "valkeys+cluster": "rediss"}
#: a query option of a secret (``password=``, a TLS key's ``ssl_password=``): its value is never shown
SECRET_QUERY = re.compile(r"(?i)((?:^|[?&;])[a-z0-9_]*(?:password|passwd|passphrase|secret|token)=)[^&;#]*")


def _split_credentials(url: str) -> bool:
    """Whether ``url``'s credentials hold a character that ends a URL's host part
    (``/``, ``?``, ``#``, not percent-encoded): an ``@`` after the host part as a
    URL parser reads it (``redis://kv:Pa55/w0rd@host``: host ``kv:Pa55``;
    ``redis://:a@b/c@host``: host ``b``, the rest of the password in the path)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.startswith("unix") or SECRET_QUERY.search(rest):
        return False  # (a socket path, or a password= option, may hold an @)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    head, tail = rest[:end], rest[end:]
    if "@" not in tail:
        return False
    path, query, fragment = re.fullmatch(r"([^?#]*)(\?[^#]*)?(#.*)?", tail, re.S).groups(default="")
    if "@" in path or "@" in fragment:  # a DB number, or nothing, holds no @; a fragment is no option
        return True
    if any("@" in item.partition("=")[0] for item in re.split(r"[?&;]", query)):
        return True  # an @ before any = in the query: no option's name holds one
    # An @ in an option's value (client_name=w@n1), hosts before it that read as HOST[:PORT]: an option's
    return "@" not in head and not all(_HOST_PORT.fullmatch(h.strip()) for h in head.split(","))


#: HOST[:PORT] as a URL's host part reads it (an IPv6 address in brackets)
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(:\d*)?")


def redact(url: str) -> str:
    """``url`` without a password (``redis://:***@host:6379``; a ``password=``
    query parameter as ``password=***``), also for a URL that does not parse,
    and for one whose password holds an unencoded ``/``, ``?`` or ``#`` (everything
    up to its last ``@`` hidden)."""
    if _split_credentials(url):
        scheme, _, rest = url.partition("://")
        credentials, _, after = rest.rpartition("@")
        user = credentials.split(":", 1)[0] if ":" in credentials else ""
        after = SECRET_QUERY.sub(r"\1***", after)
        return f"{scheme}://{user}:***@{after}"
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return hide(url)
    if password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        parts = parts._replace(query=SECRET_QUERY.sub(r"\1***", parts.query))
    return urllib.parse.urlunsplit(parts)


def hide(text: str) -> str:
    """What might be a password in a string that is no URL (``:SECRET@``,
    ``password=SECRET``) as ``***``: for the message that refuses it."""
    return SECRET_QUERY.sub(r"\1***", re.sub(r":[^:@/]*@", ":***@", text))


def nodes(netloc: str, url: str) -> list[tuple[str, int]]:
    """HOST[:PORT][,HOST[:PORT]...] after any credentials, each checked (port
    6379 if none; an IPv6 address in brackets)."""
    hosts = netloc.rsplit("@", 1)[-1]
    out = []
    for item in hosts.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or host.endswith("[") or (item.startswith("[") and not host.endswith("]")):
            host, port = item, "6379"
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or "[" in host or "]" in host \
                or any(c.isspace() or not c.isprintable() for c in host) or (":" in host and not bracketed):
            raise InvalidArgument(f"remote store URL {redact(url)!r}: {item!r} is not HOST:PORT")
        if not bracketed:
            try:  # (an empty or over-long label: `redis://store..internal` killed serve with a traceback)
                host.encode("idna")
            except UnicodeError:
                raise InvalidArgument(f"remote store URL {redact(url)!r}: {host!r} is no host name (an empty "
                                      "label, or one over 63 characters)") from None
        out.append((host, int(port)))
    return out


#: query options of a store URL that set what the tier sets itself (its timeouts, its retries)
TIMING_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout", "retry_on_timeout", "health_check_interval"})

_TEXT = re.compile(r".*", re.S)  # a password may hold anything
_PATH = re.compile(r".+", re.S)
_NAME = re.compile(r"[!-~]+")  # what CLIENT SETNAME takes: no spaces, newlines or other special characters
_BOOL = re.compile(r"(?i)0|1|true|false|yes|no")  # (redis-py reads any other word as true)
#: the query options a standalone store's URL may give, each with the values it takes (the
#: pattern) and what they are: redis-py passes every other option to its connections as a
#: string, where one that wants an object or a number broke them (``protocol=4``: a
#: ConnectionError from RemoteTier(url); ``retry=1``, ``socket_type=1``, ``event_dispatcher=1``:
#: every connect failed, and `RemoteTier.check` said a store that answered did not)
OPTIONS: dict[str, tuple[re.Pattern[str], str]] = {
    "db": (re.compile(r"\d+"), "a DB number"),
    "username": (_TEXT, "an ACL user"),
    "password": (_TEXT, "a password"),
    "client_name": (_NAME, "a name without spaces"),
    "protocol": (re.compile(r"[23]"), "2 or 3 (RESP2, RESP3)"),
}
#: the options a ``rediss://`` URL may give besides (TLS)
TLS_OPTIONS: dict[str, tuple[re.Pattern[str], str]] = {
    "ssl_ca_certs": (_PATH, "a file"),
    "ssl_ca_path": (_PATH, "a folder"),
    "ssl_certfile": (_PATH, "a file"),
    "ssl_keyfile": (_PATH, "a file"),
    "ssl_password": (_TEXT, "a password"),
    "ssl_cert_reqs": (re.compile(r"none|optional|required"), "none, optional or required"),
    "ssl_check_hostname": (_BOOL, "true or false"),
    "ssl_ciphers": (_PATH, "an OpenSSL cipher list"),
}


def check_url(url: str, scheme: str, cluster: bool) -> None:
    """InvalidArgument for a URL that does not parse, or would connect somewhere
    other than it says: redis-py reads a DB path that is no number (``/kv``)
    as DB 0 and ``/0/1`` as DB 1, and drops a Unix URL's host part
    (``unix://run/redis.sock`` is ``/redis.sock``); a cluster has only DB 0
    and takes no query options (they were ignored)."""
    if _split_credentials(url):
        raise InvalidArgument(f"remote store URL {redact(url)!r}: its credentials hold a character that ends a "
                              "URL's host part ('/', '?' or '#'): percent-encode it (%2F, %3F, %23)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.username  # noqa: B018 (raises for a netloc that does not parse)
    except ValueError as e:
        raise InvalidArgument(f"remote store URL {redact(url)!r}: {e}") from None
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme == "unix":
        if parts.netloc.rsplit("@", 1)[-1] or not parts.path.startswith("/") or parts.path == "/":
            raise InvalidArgument(f"remote store URL {redact(url)!r}: a Unix socket is unix:///ABSOLUTE/PATH.sock")
        _check_options(url, query, OPTIONS)
        return
    nodes(parts.netloc, url)
    path = parts.path.strip("/") if parts.path.count("/") <= 1 else parts.path
    if cluster:
        if path not in ("", "0") or parts.query or parts.fragment:
            raise InvalidArgument(f"remote store URL {redact(url)!r}: a Redis Cluster has only DB 0 and takes no "
                                  "options after its nodes")
    elif not (path == "" or path.isdigit()):
        raise InvalidArgument(f"remote store URL {redact(url)!r}: {parts.path!r} is not /DB (a number)")
    timed = sorted(TIMING_OPTIONS & set(query))
    if timed:  # (redis-py lets them win over the tier's: a stalled store then held the loop 1 s, not 0.1)
        raise InvalidArgument(f"remote store URL {redact(url)!r}: {', '.join(timed)} would override the tier's "
                              "own timeouts; set them with --remote-timeout (KVPAGER_REMOTE_TIMEOUT)")
    if "max_connections" in query:  # (its pool, shared by a lookup's fetching threads: MaxConnectionsError)
        raise InvalidArgument(f"remote store URL {redact(url)!r}: max_connections would bound the connections "
                              "the tier opens itself (a lookup fetches on several at once, and failed whole "
                              "past it); set them with --remote-connections")
    if "db" in query and (path or len(query["db"]) > 1):  # (redis-py takes the option over the path)
        raise InvalidArgument(f"remote store URL {redact(url)!r}: a db= option beside the path's DB (or twice) "
                              "connects to another DB than the URL shows; give the DB once, as /DB")
    _check_options(url, query, {**OPTIONS, **TLS_OPTIONS} if scheme == "rediss" else OPTIONS)


def _check_options(url: str, query: dict[str, list[str]], allowed: dict[str, tuple[re.Pattern[str], str]]) -> None:
    """InvalidArgument naming the first query option of ``url`` not in ``allowed``,
    given twice (redis-py takes the first), or with a value its pattern does not
    match."""
    for name, values in query.items():
        if name not in allowed:
            tls = " (a rediss:// URL's)" if name in TLS_OPTIONS else ""
            raise InvalidArgument(f"remote store URL {redact(url)!r}: option {name!r} is not one a store URL "
                                  f"may give{tls}: {', '.join(allowed)}")
        pattern, what = allowed[name]
        if len(values) > 1:
            raise InvalidArgument(f"remote store URL {redact(url)!r}: option {name!r} given twice")
        if not pattern.fullmatch(values[0]):  # (a secret's pattern takes any value: none is shown here)
            raise InvalidArgument(f"remote store URL {redact(url)!r}: option {name!r} takes {what}, "
                                  f"not {values[0][:100]!r}")
