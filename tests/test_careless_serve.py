"""Careless operators of `kvpager serve` and the CLI, continued from
test_careless_operator.py: a taken --metrics-port (refused before the pool is
allocated), an inproc:// endpoint given to the CLI (refused by name, not waited
out), a tenant given two quotas, a lower-case log level, a pin cap of the whole
pool (warned of), a bind that failed (no "stopped after" line). Each test once
failed; bounded waits, free endpoints."""

from __future__ import annotations

import socket
import time

import pytest
from daemon_helpers import (
    daemon_process,
    ipc_endpoint,
    run_cli,
    running_server,
)

from kvpager import PoolSpec
from kvpager.errors import InvalidArgument
from kvpager.server import Server

WAIT = 60
GEOMETRY = ["--model", "tiny", "--device", "cpu"]


def test_a_taken_metrics_port_is_refused_before_the_pool_is_allocated(tmp_path):
    """Another program on --metrics-port: said only once the pool was made (a GPU's
    memory, or /dev/shm, taken and given back for nothing); here before a pool /dev/shm
    cannot hold is asked for."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_cli(["serve", *GEOMETRY, "--blocks", "99999999999", "--endpoint", f"ipc://{tmp_path}/kv.sock",
                     "--metrics-port", str(port)])
    assert r.exit_code not in (0, None) and f"the metrics server's 127.0.0.1:{port}: the port is taken" in r.output \
        and "--metrics-port" in r.output and "shared memory" not in r.output, r.output


def test_an_inproc_endpoint_is_refused_by_the_commands_that_run_in_their_own_process(tmp_path):
    """inproc:// reaches only the process that binds it: `kvpager stats` waited out its
    timeout there, and `kvpager serve` served no one, for ever."""
    started = time.monotonic()
    r = run_cli(["stats", "--endpoint", "inproc://kv"])
    assert r.exit_code == 2 and "inproc:// reaches only a daemon in the same process" in r.output, r.output
    assert time.monotonic() - started < 8  # (its 10 s timeout, before)
    (tmp_path / "p.json").write_text("[[1, 2, 3]]")
    r = run_cli(["pin", "--endpoint", "inproc://kv", str(tmp_path / "p.json")])
    assert r.exit_code not in (0, None) and "inproc://" in r.output, r.output
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--endpoint", "inproc://kv"])
    assert r.exit_code not in (0, None) and "inproc:// reaches only" in r.output, r.output


def test_a_tenant_given_two_quotas_is_refused():
    """``--quota a=1 --quota a=2``: the last one won, without a word."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--quota", "a=1", "--quota", "a=2",
                 "--endpoint", "ipc:///nonexistent-kvpager-folder/kv.sock"])
    assert r.exit_code == 2 and "a second quota for 'a'" in r.output, r.output


def test_a_log_level_in_lower_case_is_taken():
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--log-level", "debug", "--dry-run"])
    assert r.exit_code == 0, r.output


def test_a_pin_cap_of_the_whole_pool_is_warned_of(tmp_path):
    """``--max-pinned-blocks`` at or past the pool's blocks capped nothing, without a word."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--max-pinned-blocks", "16", "--dry-run"])
    assert r.exit_code == 0 and "--max-pinned-blocks 16 is not below the pool's 16 blocks" in r.output, r.output
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--max-pinned-blocks", "15", "--dry-run"])
    assert r.exit_code == 0 and "max-pinned-blocks" not in r.output, r.output
    with daemon_process([*GEOMETRY, "--blocks", "16", "--max-pinned-blocks", "99"], f"ipc://{tmp_path}/kv.sock") \
            as proc:
        assert any("--max-pinned-blocks 99 is not below" in line for line in proc.log), proc.log


def test_a_daemon_that_never_bound_does_not_say_it_stopped_serving(caplog):
    """A bind that failed (here a taken metrics port) logged "stopped after 0 requests"
    as if it had served."""
    import logging

    caplog.set_level(logging.INFO, logger="kvpager.server")
    endpoint, d = ipc_endpoint()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        srv = Server.create(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16,
                                     dtype="float32"), endpoint, metrics_port=held.getsockname()[1])
        with pytest.raises(InvalidArgument, match="cannot serve metrics"):
            srv.bind()
    assert not any("stopped after" in r.getMessage() for r in caplog.records), caplog.text
    with running_server(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16,
                                 dtype="float32"), endpoint):
        pass
    assert [r.getMessage() for r in caplog.records if "stopped after" in r.getMessage()] == ["stopped after 0 requests"]


@pytest.mark.parametrize("setting", [["--max-ids", str(1 << 63)], ["--max-tokens", "99999999999999999999999"]])
def test_a_limit_past_what_the_decoder_takes_is_refused(setting, tmp_path):
    """A limit of 2**63 or more started a daemon that answered every request, hello
    included, with "not a msgpack message: OverflowError"."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", *setting, "--endpoint", f"ipc://{tmp_path}/kv.sock"])
    assert r.exit_code not in (0, None) and "must be at most 2**62" in r.output, r.output
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--endpoint", f"ipc://{tmp_path}/kv.sock"],
                env={"KVPAGER_MAX_IDS": str(1 << 63)})
    assert r.exit_code not in (0, None) and "KVPAGER_MAX_IDS" in r.output, r.output


def test_a_variable_a_flag_overrides_is_not_read():
    """``KVPAGER_MAX_SESSIONS=abc kvpager serve --max-sessions 10`` was refused for the
    variable the flag overrode."""
    import os

    from kvpager.limits import Limits

    os.environ["KVPAGER_MAX_SESSIONS"] = "abc"
    try:
        assert Limits.from_env(sessions=10).sessions == 10
        with pytest.raises(InvalidArgument, match="KVPAGER_MAX_SESSIONS"):
            Limits.from_env()
    finally:
        del os.environ["KVPAGER_MAX_SESSIONS"]


@pytest.mark.parametrize("seconds", [0.01, 1e11])
def test_a_heartbeat_timeout_no_client_can_keep_is_refused(seconds, tmp_path):
    """0.01 s: clients beat at most every 0.05 s, so healthy sessions ended; 1e11 s:
    every client's heartbeat thread died of an overflowed wait."""
    with pytest.raises(InvalidArgument, match="heartbeat timeout must be 0.1 to 1e"):
        Server.create(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16,
                               dtype="float32"), f"ipc://{tmp_path}/kv.sock", heartbeat_timeout=seconds)
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--heartbeat-timeout", str(seconds), "--dry-run"])
    assert r.exit_code == 2 and "--heartbeat-timeout" in r.output, r.output


@pytest.mark.parametrize("setting", [["--device", "gpu"], ["--device", "CPU"], ["--quota", "a=99999999999999999999999"]])
def test_a_dry_run_refuses_what_a_start_refuses(setting):
    r = run_cli(["serve", "--model", "tiny", "--blocks", "16", *setting, "--dry-run"])
    assert r.exit_code not in (0, None) and ("device must be" in r.output or "in [0, 2**63)" in r.output), r.output


@pytest.mark.parametrize("setting, needle", [
    (["--max-sessions", "0"], "must be at least 1"),
    (["--max-fork-work", "5"], "must be at least 65536"),
    (["--max-ids", str(2**63)], "at most 2**62"),
    (["--endpoint", "tcp://0.0.0.0:47312"], "give the daemon a token"),
    (["--events-replay-rate", "1M"], "needs --events-endpoint"),
    (["--remote-namespace", "foo"], "needs --remote"),
    (["--endpoint", "ipc:///kvpager-no-such-folder/gpu0.sock"], "does not exist: create it"),
])
def test_a_dry_run_checks_every_setting_a_start_checks(setting, needle):
    """A dry run checked the devices and quotas only: limits of 0 or past 2**62, a
    tcp:// endpoint beyond this host without a token, replay or remote settings
    without what they need, a socket's folder that does not exist passed it (exit
    0), and the start refused them."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", *setting, "--dry-run"])
    assert r.exit_code not in (0, None) and needle in r.output, r.output


@pytest.mark.parametrize("setting, environ, needle", [
    (["--heartbeat-timeout", "nan"], {}, "heartbeat timeout must be"),
    ([], {"KVPAGER_HEARTBEAT_TIMEOUT": "abc"}, "KVPAGER_HEARTBEAT_TIMEOUT"),
    ([], {"KVPAGER_HEARTBEAT_TIMEOUT": "0.01"}, "heartbeat timeout must be"),
    ([], {"KVPAGER_MAX_MESSAGE": "1"}, "KVPAGER_MAX_MESSAGE"),
    (["--remote", "garbage"], {}, "must look like redis://"),
    (["--remote", "redis://127.0.0.1:1", "--remote-namespace", "n" * 300], {}, "remote namespace must be"),
    (["--events-endpoint", "ipc:///kvpager-no-such-folder/ev.sock"], {}, "does not exist: create it"),
    (["--events-endpoint", "inproc://ev"], {}, "inproc:// reaches only this process"),
    (["--endpoint", "ipc://{tmp}/kv.sock", "--events-endpoint", "ipc://{tmp}/kv.sock"], {}, "must differ"),
])
def test_a_dry_run_refuses_the_settings_a_start_found_wrong(setting, environ, needle, tmp_path):
    """A heartbeat timeout, a message limit, a remote store's URL or namespace, an
    events endpoint in a missing folder, in-process or the daemon's own passed a
    dry run (exit 0), and the start refused them."""
    setting = [s.replace("{tmp}", str(tmp_path)) for s in setting]
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", *setting, "--dry-run"], env=environ)
    assert r.exit_code not in (0, None) and needle in r.output, r.output


def test_a_dry_run_checks_a_runtime_folder_that_is_there(tmp_path):
    """The default endpoint's folder, there already but open to other users, passed
    a dry run and a start refused it."""
    runtime = tmp_path / "open"
    runtime.mkdir(mode=0o777)
    runtime.chmod(0o777)
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--dry-run"],
                env={"KVPAGER_RUNTIME_DIR": str(runtime), "KVPAGER_ENDPOINT": ""})
    assert r.exit_code not in (0, None) and "must be 700" in r.output, r.output


def test_a_dry_run_leaves_the_default_sockets_folder_to_the_start(tmp_path):
    """The default endpoint's private folder is made by a start: a dry run where it
    is not made yet passes, and makes nothing."""
    runtime = tmp_path / "not-yet"
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--dry-run"],
                env={"KVPAGER_RUNTIME_DIR": str(runtime), "KVPAGER_ENDPOINT": ""})
    assert r.exit_code == 0 and "device blocks" in r.output, r.output
    assert not runtime.exists()


def test_a_dry_run_beside_a_daemon_on_its_endpoint_sizes_the_pool():
    """The endpoint's and the metrics port's being free are a start's to find: a dry
    run sizes a pool beside the daemon that serves there."""
    with running_server(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16,
                                 dtype="float32")) as server:
        r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--endpoint", server.endpoint, "--dry-run"])
    assert r.exit_code == 0 and "device blocks" in r.output, r.output


def test_a_host_pool_smaller_than_a_block_is_refused():
    """``--host-memory 1M`` under one block gave no host pool (swap off), without a word."""
    r = run_cli(["serve", "--model", "llama-3-8b", "--device", "cpu", "--blocks", "16", "--host-memory", "1M",
                 "--dry-run"])
    assert r.exit_code == 2 and "holds no block of" in r.output, r.output


def test_bad_cpu_threads_in_the_daemons_environment_refuse_its_start():
    """It served, and every client's staged attend failed on the daemon's variable."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--dry-run"], env={"KVPAGER_CPU_THREADS": "abc"})
    assert r.exit_code not in (0, None) and "KVPAGER_CPU_THREADS" in r.output, r.output


def test_the_remote_timeout_is_read_from_its_variable():
    """The URL check told operators to set KVPAGER_REMOTE_TIMEOUT, which nothing read."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--dry-run"], env={"KVPAGER_REMOTE_TIMEOUT": "abc"})
    assert r.exit_code == 2 and "--remote-timeout" in r.output and "'abc'" in r.output, r.output


def test_a_blank_token_variable_leaves_the_token_file_to_a_client(tmp_path, monkeypatch):
    from kvpager import env

    (tmp_path / "tok").write_text("s" * 32 + "\r\n")
    monkeypatch.setenv("KVPAGER_TOKEN", " ")
    monkeypatch.setenv("KVPAGER_TOKEN_FILE", str(tmp_path / "tok"))
    assert env.token() == "s" * 32
    with pytest.raises(InvalidArgument, match="KVPAGER_TOKEN"):  # (a daemon refuses it: it served with none)
        env.token(daemon=True)


def test_a_presets_name_mistyped_is_named_in_the_error(tmp_path):
    """``--model llama3-8b`` tried the hub and said nothing of the preset ``llama-3-8b``."""
    r = run_cli(["serve", "--model", "llama3-8b", "--blocks", "16", "--dry-run"], env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code not in (0, None) and "did you mean the preset llama-3-8b?" in r.output, r.output


def test_the_daemons_own_socket_given_again_as_an_events_endpoint_is_refused_at_once(tmp_path):
    """``--events-endpoint ipc://DIR//kv.sock`` beside ``--endpoint ipc://DIR/kv.sock`` waited
    5 s, then said another process was binding it (the daemon's own lock)."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--endpoint", f"ipc://{tmp_path}/kv.sock",
                 "--events-endpoint", f"ipc://{tmp_path}//kv.sock"])
    assert r.exit_code not in (0, None) and "must differ from the daemon's" in r.output, r.output


def test_a_config_transformers_cannot_build_is_one_line_of_warning(tmp_path):
    """A config.json transformers' class refused printed Python's warning form: a
    source file and line of kvpager's, the source line, transformers' message over
    several lines."""
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llava", "text_config": "oops"}')
    r = run_cli(["serve", "--model", str(cfg), "--device", "cpu", "--blocks", "16", "--dry-run"])
    lines = [ln for ln in r.output.splitlines() if "transformers cannot build" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: "), r.output
    assert "UserWarning" not in r.output and ".py:" not in r.output, r.output


def test_a_session_limit_above_the_total_is_warned():
    """``--max-sequences 10 --max-sequences-total 1`` was taken without a word: the
    total binds first, and no session reaches its own limit."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--max-sequences", "10", "--max-sequences-total", "1",
                 "--dry-run"])
    assert r.exit_code == 0 and "above all sessions' (1, --max-sequences-total)" in r.output, r.output
    r = run_cli(["serve", *GEOMETRY, "--blocks", "16", "--dry-run"])
    assert r.exit_code == 0 and "above all sessions'" not in r.output, r.output
