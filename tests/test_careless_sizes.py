"""A careless operator's sizes and environment: a size of hundreds of digits
(`serve --memory`, `--host-memory`, a ``KVPAGER_MAX_*`` variable) is refused
in one line, not a float overflow's traceback; a count is read exactly (a
float rounded 2**63 - 1 up to 2**63); a variable of digits that are not ASCII
(``KVPAGER_CPU_THREADS=²``, ``KVPAGER_METRICS_PORT=²``: ``str.isdigit`` takes
them, ``int`` does not) is refused by name."""

from __future__ import annotations

import pytest
from daemon_helpers import ipc_endpoint, run_cli

from kvpager import env
from kvpager.errors import InvalidArgument

GEOMETRY = ["--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--device", "cpu"]
DIGITS = "9" * 400


@pytest.mark.parametrize("args, environ, named", [
    (["--memory", DIGITS], {}, "at most 2147483647 blocks"),
    (["--blocks", "8", "--host-memory", DIGITS], {}, "at most 2147483647 blocks"),
    (["--memory", DIGITS + "T"], {}, "at most 2147483647 blocks"),
    (["--blocks", "8"], {"KVPAGER_MAX_MESSAGE": DIGITS}, "KVPAGER_MAX_MESSAGE"),
    (["--blocks", "8"], {"KVPAGER_METRICS_PORT": "\u00b2"}, "KVPAGER_METRICS_PORT"),
])
def test_serve_refuses_in_one_line_what_was_a_traceback(args, environ, named):
    """(OverflowError: cannot convert float infinity to integer; ValueError: invalid
    literal for int() with base 10: '²'.) `run_cli` fails on a traceback."""
    r = run_cli(["serve", *GEOMETRY, "--endpoint", ipc_endpoint()[0], *args], environ)
    assert r.exit_code not in (0, None) and named in r.output, r.output


@pytest.mark.parametrize("text, value", [
    (str((1 << 63) - 1), (1 << 63) - 1),
    ("12345678901234567891", 12345678901234567891),
    (DIGITS, int(DIGITS)),
    ("8388607T", 8388607 << 40),
    ("1.5G", 3 << 29),
    ("0.5K", 512),
    (" 64 KiB ", 65536),
])
def test_a_size_is_read_exactly(text, value):
    """The callers' range checks (blocks, 2**63 bytes, a message limit) need the
    exact number: a float read 2**63 - 1 as 2**63, and 400 digits as infinity."""
    assert env.parse_size(text) == value


@pytest.mark.parametrize("raw", ["\u00b2", " \u00b9\u00b2 "])
def test_cpu_threads_of_digits_int_does_not_take_are_refused_by_name(raw, monkeypatch):
    monkeypatch.setenv("KVPAGER_CPU_THREADS", raw)
    with pytest.raises(InvalidArgument, match="KVPAGER_CPU_THREADS"):
        env.cpu_threads()


def test_cpu_threads_and_metrics_port_of_ascii_digits_are_still_taken(monkeypatch):
    monkeypatch.setenv("KVPAGER_CPU_THREADS", " 3 ")
    monkeypatch.setenv("KVPAGER_METRICS_PORT", "9400")
    assert env.cpu_threads() == 3 and env.metrics_port() == 9400
