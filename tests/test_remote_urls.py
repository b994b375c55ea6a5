"""Remote store URLs as careless operators write them: malformed ones (a broken
IPv6 host, unknown options, a DB that is no number, an empty host label, a
cluster's DB, options that would override the tier's timeouts or bound its
connections, a db= option beside the path's DB) refused as
typed errors naming what is wrong; passwords kept out of URLs and messages,
one with a character that ends a URL's host named and hidden; an ``@`` in an
option no password. No store is reached (open_store connects lazily)."""

from __future__ import annotations

import re

import pytest

redis = pytest.importorskip("redis")

from kvpager import InvalidArgument  # noqa: E402
from kvpager.remote_store import open_store  # noqa: E402


@pytest.mark.parametrize("url, why", [
    ("redis://[::1", "Invalid IPv6 URL"),
    ("redis://127.0.0.1:6379?no_such_option=1", "no_such_option"),
    ("redis://127.0.0.1:6379/kv", "is not /DB"),  # redis-py: DB 0
    ("redis://127.0.0.1:6379/0/1", "is not /DB"),  # redis-py: DB 1
    ("redis://127.0.0.1:6379/-1", "is not /DB"),
    ("redis://host name:6379", "is not HOST:PORT"),
    ("unix://run/redis.sock", "unix:///ABSOLUTE/PATH.sock"),  # redis-py: /redis.sock
    ("unix://", "unix:///ABSOLUTE/PATH.sock"),
    ("redis+cluster://127.0.0.1:7000/3", "only DB 0"),
    ("redis+cluster://127.0.0.1:7000/?readonly=1", "only DB 0"),
    # a host with an empty label: the idna codec's traceback killed serve before
    ("redis://store..internal:6379", "is no host name"),
    ("redis+cluster://a..b:7000,c:7001", "is no host name"),
    ("redis://" + "x" * 70 + ".com:6379", "is no host name"),
    # options that would override the tier's own timeouts (redis-py lets a URL's win)
    ("redis://127.0.0.1:6379?socket_timeout=5", "socket_timeout would override"),
    ("redis://127.0.0.1:6379/0?socket_connect_timeout=5&db=0", "socket_connect_timeout would override"),
    # a pool bound below the tier's own connections: every lookup of more than one chunk failed whole
    ("redis://127.0.0.1:6379?max_connections=1", "max_connections would bound"),
    # a db= option beside the path's DB: redis-py took the option, hello and stats showed the path's
    ("redis://127.0.0.1:6379/0?db=5", "a db= option beside the path's DB"),
    ("redis://127.0.0.1:6379?db=1&db=2", "a db= option beside the path's DB (or twice)"),
])
def test_a_malformed_url_is_a_typed_error(url, why):
    with pytest.raises(InvalidArgument, match=re.escape(why)):
        open_store(url)


def test_passwords_stay_out_of_urls_and_messages():
    store = open_store("redis://127.0.0.1:6379/2?password=hunter2&client_name=w")
    assert "hunter2" not in store.url and "password=***" in store.url
    store.close()
    # a TLS key's passphrase too (it was shown in hello's URL, stats and the log)
    store = open_store("rediss://:pw@127.0.0.1:6380/0?ssl_password=hunter2&ssl_cert_reqs=none")
    assert "hunter2" not in store.url and "ssl_password=***" in store.url and ":***@" in store.url
    store.close()
    with pytest.raises(InvalidArgument) as e:
        open_store("redis:/:hunter2@127.0.0.1:6379")
    assert "hunter2" not in str(e.value)
    for url in ("redis://127.0.0.1", "redis://127.0.0.1:1/15", "redis://127.0.0.1:1?db=3", "redis://[::1]:6379/0", "unix:///tmp/r.sock?db=1",
                "rediss://u:p@h:1?ssl_cert_reqs=none", "redis+cluster://a:1,b:2", "redis+cluster://[::1]:1,[::1]:2/0"):
        open_store(url).close()  # still taken


@pytest.mark.parametrize("url", ["redis://kv:Pa55/w0rdhunter2@127.0.0.1:6379", "redis://kv:Pa#55hunter2@127.0.0.1:1/0",
                                 "rediss://:a?bhunter2@h:6379", "redis+cluster://u:x/yhunter2@a:1,b:2",
                                 # an @ before the character too: the host part read as "2", the rest as a path
                                 "redis://:Pa55@2/hunter2@127.0.0.1:6379", "redis://kv:Pa55@y?hunter2@127.0.0.1:6379",
                                 "redis://kv:Pa55@y#hunter2@127.0.0.1:6379"])
def test_a_password_with_a_character_that_ends_the_host_is_hidden_and_named(url):
    """A password with an unencoded ``/``, ``?`` or ``#`` (``openssl rand -base64``
    gives ``/``) ends a URL's host part early: the URL had no credentials as parsed,
    and its refusal printed the password (``'kv:Pa55' is not HOST:PORT``)."""
    from kvpager.remote_url import redact

    assert "hunter2" not in redact(url) and ":***@" in redact(url)
    with pytest.raises(InvalidArgument, match="percent-encode") as e:
        open_store(url)
    assert "hunter2" not in str(e.value) and "Pa55" not in str(e.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?client_name=worker@node1",
                                 "redis://[::1]:6379/0?client_name=a@b"])
def test_an_at_sign_in_an_option_is_no_password(url):
    from kvpager.remote_url import redact

    assert redact(url) == url
    open_store(url).close()
