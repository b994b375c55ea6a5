"""Careless users of `kvpager demo | bench | top` and the inspection commands:
bad flag values and environment variables get one line naming them (click's
usage errors exit 2), a daemon gone or a signal mid-run leaves no traceback and
nothing running behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from daemon_helpers import running_server, subprocess_env, wait_until

from kvpager.cli import main
from kvpager.client import Client
from kvpager.errors import DaemonUnavailable


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-1"])
def test_top_interval_must_be_finite(server, value):
    code, out = invoke("top", "--endpoint", server.endpoint, "--json", "--iterations", "2", "--interval", value)
    assert code == 2 and "--interval" in out and "Traceback" not in out


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bench_timeout_must_be_positive_and_finite(value):
    code, out = invoke("bench", "allocator", "--timeout", value)
    assert code == 2 and "--timeout" in out and "FAILED" not in out


def test_token_file_not_text(server, tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"\xff\xfe\x80" + b"x" * 32)
    code, out = invoke("stats", "--endpoint", server.endpoint, env={"KVPAGER_TOKEN_FILE": str(path)})
    assert code == 2 and f"the token file {path} is not UTF-8 text" in out


def test_no_bye_to_a_daemon_found_gone():
    """A command whose daemon went away says so once, then exits: closing its
    client does not wait out a whole timeout more on a bye nobody can answer."""
    with running_server() as s:
        client = Client(s.endpoint, timeout=1.5, heartbeat=False, map_pool=False)
    with pytest.raises(DaemonUnavailable):
        client.stats()
    t = time.monotonic()
    client.close()
    assert time.monotonic() - t < 0.75


def test_demo_bad_device_is_a_usage_error():
    code, out = invoke("demo", "--device", "garbage", "--workers", "1", "--requests", "1", "--quiet")
    assert code == 2 and "'--device'" in out and "garbage" in out


def test_demo_worker_count_is_bounded():
    """A typo of --workers (10000) forked that many processes; now a usage error,
    before any daemon starts."""
    from kvpager.demo_cli import MAX_WORKERS

    code, out = invoke("demo", "--device", "cpu", "--workers", str(MAX_WORKERS + 1), "--requests", "1", "--quiet")
    assert code == 2 and "'--workers'" in out and f"at most {MAX_WORKERS}" in out


@pytest.mark.parametrize("length", ["-5", "0", "100"])
def test_demo_max_model_len_shorter_than_a_request_is_a_usage_error(length):
    """It ran, reporting a contiguous cache of another length than the one given."""
    code, out = invoke("demo", "--device", "cpu", "--max-model-len", length, "--workers", "1", "--requests", "1",
                       "--system-prompt", "16", "--new-tokens", "1", "--quiet")
    assert code == 2 and "'--max-model-len'" in out and f"not {length}" in out


def test_runtime_dir_empty_is_unset_and_relative_is_refused(monkeypatch, tmp_path):
    """KVPAGER_RUNTIME_DIR= (empty) meant the current directory, and a relative one a
    socket a daemon and its clients started elsewhere would not agree on."""
    from kvpager import env
    from kvpager.errors import InvalidArgument

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("KVPAGER_RUNTIME_DIR", "")
    assert env.runtime_dir() == os.path.join(str(tmp_path), "kvpager")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative")  # invalid by the XDG spec: ignored
    assert env.runtime_dir() == f"/tmp/kvpager-{os.getuid()}"
    monkeypatch.setenv("KVPAGER_RUNTIME_DIR", "rt")
    with pytest.raises(InvalidArgument, match="KVPAGER_RUNTIME_DIR='rt' must be an absolute path"):
        env.runtime_dir()
    monkeypatch.setenv("KVPAGER_RUNTIME_DIR", str(tmp_path / "rt"))
    assert env.runtime_dir() == str(tmp_path / "rt")


def test_demo_daemon_that_cannot_start_is_one_line():
    out = subprocess.run([sys.executable, "-m", "kvpager", "demo", "--device", "cpu", "--workers", "1",
                          "--requests", "1", "--quiet"], capture_output=True, text=True, timeout=60,
                         env={**subprocess_env(), "KVPAGER_MAX_MESSAGE": "garbage"})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: the demo daemon did not start (exit code 1): KVPAGER_MAX_MESSAGE='garbage' is not a "
        "non-negative whole number or a size like 64M; unset it or fix it"]


def _live(pgid: int) -> list[int]:
    """Processes of the group ``pgid`` that are not zombies."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(name))
    return pids


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Demo:
    """`kvpager demo` in its own process group, its stderr read as it comes."""

    def __init__(self, env: dict[str, str] | None = None):
        # Started with Ctrl-C at its default, as from a terminal: a shell's background job (the
        # test run launched with `&`) starts with SIGINT ignored, which stays ignored across exec,
        # and then no Ctrl-C below would reach the demo (a signal handled here is reset at exec).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpager", "demo", "--device", "cpu", "--workers", "2", "--requests", "2",
                 "--new-tokens", "2000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True, env={**subprocess_env(), **(env or {})})
        finally:
            signal.signal(signal.SIGINT, previous)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        assert wait_until(lambda: any(text in x for x in self.lines), timeout), "".join(self.lines)

    @property
    def folder(self) -> str:
        return re.search(r"ipc://(/tmp/kvpager-demo-[^/]+)/", "".join(self.lines)).group(1)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        self.proc.wait(timeout)
        self.reader.join(10)
        return self.proc.returncode, "".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # gone already, as it should be
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _demo_test(act, env: dict[str, str] | None = None, when: str = "worker 0 wrote") -> tuple[int, str, Demo]:
    demo = Demo(env)
    try:
        demo.wait_for(when)
        act(demo)
        code, err = demo.finish()
        assert wait_until(lambda: not _live(demo.proc.pid), 15), [_cmdline(p) for p in _live(demo.proc.pid)]
        assert not os.path.exists(demo.folder)
        return code, err, demo
    finally:
        demo.kill()


def test_demo_sigterm_stops_its_daemon_and_workers():
    """`timeout 60 kvpager demo` or `kill PID`: the daemon and workers go with it."""
    code, err, _ = _demo_test(lambda d: d.proc.send_signal(signal.SIGTERM))
    assert code == 128 + signal.SIGTERM and "Traceback" not in err


def test_demo_ctrl_c_no_traceback():
    """Ctrl-C reaches every process of the group, the workers possibly first."""

    def ctrl_c(d: Demo) -> None:
        for pid in _children(d.proc.pid):
            if "multiprocessing.spawn" in _cmdline(pid):
                os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(d.proc.pid, signal.SIGINT)

    code, err, _ = _demo_test(ctrl_c)
    assert code == 1 and "Traceback" not in err and err.rstrip().endswith("Aborted!"), err


def test_demo_ctrl_c_while_workers_start():
    """Ctrl-C while the workers are still starting (importing NumPy and kvpager)."""

    def ctrl_c(d: Demo) -> None:
        workers: list[int] = []
        assert wait_until(lambda: workers.extend(p for p in _children(d.proc.pid) if p not in workers
                                                 and "multiprocessing.spawn" in _cmdline(p)) or len(workers) == 2, 10)
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(d.proc.pid, signal.SIGINT)

    code, err, _ = _demo_test(ctrl_c, when="worker processes")
    assert code == 1 and "Traceback" not in err and err.rstrip().endswith("Aborted!"), err


def test_demo_daemon_gone_mid_run():
    def stop_daemon(d: Demo) -> None:
        [pid] = [p for p in _children(d.proc.pid) if " serve " in _cmdline(p)]
        os.kill(pid, signal.SIGTERM)

    code, err, demo = _demo_test(stop_daemon, env={"KVPAGER_TIMEOUT": "2"})
    assert code == 1 and "Traceback" not in err
    assert "error: worker " in err and "error: demo worker " in err


def test_serve_remote_ttl_past_what_redis_takes_is_a_usage_error():
    """--remote-ttl 10**16 ("forever") was taken, and every write was then refused by
    the store; now a usage error before anything starts (0 is no expiry)."""
    code, out = invoke("serve", "--model", "tiny", "--blocks", "8", "--device", "cpu", "--remote",
                       "redis://127.0.0.1:1", "--remote-ttl", str(10**16))
    assert code == 2 and "'--remote-ttl'" in out and "Traceback" not in out


def test_events_from_a_sequence_number_past_int64_is_a_usage_error():
    code, out = invoke("events", "--endpoint", "ipc:///nonexistent/ev.sock", "--from-seq", str(1 << 64))
    assert code == 2 and "--from-seq" in out and "Traceback" not in out


def test_json_nested_past_the_parsers_depth_is_named(tmp_path, server):
    """pin / unpin's TOKENS.json, serve's --kv-scales and --model's config.json:
    a RecursionError traceback before."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(deep.read_text())
    for args in (["pin", "--endpoint", server.endpoint, str(deep)],
                 ["serve", "--dry-run", "--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float16",
                  "--kv-dtype", "float8_e4m3", "--kv-scales", str(deep)],
                 ["serve", "--dry-run", "--model", str(tmp_path / "model")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code in (1, 2) and "recursion" in result.output, (args, result.output)
        assert not isinstance(result.exception, RecursionError), args


def test_a_wrong_control_token_is_named_as_such():
    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=16, block_size=16, dtype="float32")
    with running_server(spec, control_token="control-token-of-enough-length-42") as s:
        code, out = invoke("stats", "--endpoint", s.endpoint,
                           env={"KVPAGER_CONTROL_TOKEN": "a-stale-control-token-of-length"})
    assert code == 6 and "KVPAGER_CONTROL_TOKEN" in out and "KVPAGER_TOKEN," not in out


def test_a_dry_run_refuses_ranks_that_do_not_split_the_kv_heads():
    """--dry-run printed a pool of 3 CPU ranks over 2 K/V heads and exited 0; the same
    options without it are refused at the start: the dry run refuses them alike."""
    for ranks in (["--ranks", "3", "--device", "cpu"], ["--devices", "cpu,cpu,cpu"]):
        dry = CliRunner().invoke(main, ["serve", "--model", "tiny", "--blocks", "16", *ranks, "--dry-run"])
        assert dry.exit_code == 1 and "cannot be split over 3 ranks" in dry.output, (ranks, dry.output)
    ok = CliRunner().invoke(main, ["serve", "--model", "tiny", "--blocks", "16", "--ranks", "2", "--device", "cpu",
                                   "--dry-run"])
    assert ok.exit_code == 0 and "device" in ok.output, ok.output


def test_a_stopped_daemon_is_named_stuck_not_absent(tmp_path):
    """A daemon that listens but does not answer (stopped, a paused container)
    was reported as absent: the next step said to start one with `kvpager serve`,
    beside it on the same endpoint. It says to wait longer, or look at the daemon."""
    from daemon_helpers import daemon_process, ipc_endpoint, run_cli

    endpoint, _ = ipc_endpoint()
    with daemon_process(["--model", "tiny", "--blocks", "16", "--device", "cpu"], endpoint) as proc:
        proc.send_signal(signal.SIGSTOP)
        try:
            r = run_cli(["stats", "--endpoint", endpoint, "--timeout", "1"])
        finally:
            proc.send_signal(signal.SIGCONT)
    assert r.exit_code == 3, r.output
    assert "did not answer in time" in r.output and "kvpager serve" not in r.output.split("next:")[1], r.output
    # its error line names the command's flag (it told a command line user to pass timeout= to Client)
    assert "larger --timeout" in r.output.split("next:")[0] and "timeout= to Client" not in r.output, r.output
