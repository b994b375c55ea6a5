"""`kvpager demo`: a daemon and several worker processes sharing a system prompt.

The daemon runs as a subprocess on a private ipc:// endpoint. Each worker
(`kvpager.demo_worker`) is a separate process with its own `Client`: it maps
the pool, allocates requests that start with the same system prompt, writes
their K/V straight into the mapped pool, decodes tokens with paged attention
over the shared blocks, and waits at the peak so the parent can read the
daemon's accounting. The model is a stand-in (fixed random projections): the
demo is about the memory, not the text. The report compares the KV memory the
requests use with what contiguous max-length caches would reserve and what
paging without prefix sharing would use. The command is `kvpager.demo_cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvpager.demo_worker import run_worker
from kvpager.spec import PoolSpec


class DemoFailed(RuntimeError):
    """The demo could not run to its end (its daemon did not start, a worker died):
    `kvpager demo` prints it as one line."""


@dataclass(frozen=True)
class DemoConfig:
    workers: int = 4
    requests_per_worker: int = 4
    system_prompt_tokens: int = 1024
    user_tokens: tuple[int, int] = (16, 96)  # uniform range of each request's own prompt
    new_tokens: int = 32
    max_model_len: int = 4096
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 64
    num_q_heads: int = 8
    block_size: int = 16
    num_blocks: int = 2048
    device: str = "cpu"
    seed: int = 0

    def spec(self) -> PoolSpec:
        return PoolSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.num_blocks,
                        self.block_size, "float32", num_host_blocks=64)


@dataclass(frozen=True)
class DemoReport:
    workers: int
    requests: int
    request_tokens: tuple[int, ...]  # prompt + generated tokens of each request
    kv_bytes_paged: int  # device blocks in use at the peak
    kv_bytes_no_sharing: int  # paged, but each request storing its own prompt blocks
    kv_bytes_contiguous: int  # every request reserving max_model_len tokens
    tokens_stored: int
    token_slots_allocated: int
    prefix_hit_rate: float
    shared_blocks: int
    system_prompt_blocks: int
    check_ok: bool
    seconds: float

    @property
    def saving_vs_contiguous(self) -> float:
        return self.kv_bytes_contiguous / self.kv_bytes_paged

    @property
    def saving_vs_no_sharing(self) -> float:
        return self.kv_bytes_no_sharing / self.kv_bytes_paged

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["saving_vs_contiguous"] = self.saving_vs_contiguous
        d["saving_vs_no_sharing"] = self.saving_vs_no_sharing
        return d


@contextlib.contextmanager
def daemon(cfg: DemoConfig) -> Iterator[str]:
    """A `kvpager serve` subprocess on a private ipc:// endpoint; stopped on exit."""
    tmp = tempfile.mkdtemp(prefix="kvpager-demo-")
    os.chmod(tmp, 0o700)
    endpoint = f"ipc://{tmp}/kv.sock"
    spec = cfg.spec()
    cmd = [sys.executable, "-m", "kvpager", "serve", "--endpoint", endpoint, "--device", cfg.device,
           "--layers", str(spec.num_layers), "--kv-heads", str(spec.num_kv_heads),
           "--head-dim", str(spec.head_dim), "--block-size", str(spec.block_size),
           "--dtype", spec.dtype, "--blocks", str(spec.num_blocks),
           "--host-blocks", str(spec.num_host_blocks), "--log-level", "WARNING"]
    # The daemon's log goes to a file, shown only if it fails.
    log = open(os.path.join(tmp, "daemon.log"), "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        from kvpager.client import Client
        from kvpager.errors import DaemonUnavailable

        deadline = time.monotonic() + 30
        while True:
            try:
                Client(endpoint, timeout=2, heartbeat=False, map_pool=False).close()
                break
            except DaemonUnavailable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    # its last line says why (serve's "Error: ..." or a traceback's last line)
                    last = ([x.strip() for x in log.read().splitlines() if x.strip()] or ["(no output)"])[-1]
                    raise DemoFailed(f"the demo daemon did not start (exit code {proc.poll()}): "
                                     f"{last.removeprefix('Error: ')}") from None
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _get(q) -> object:
    try:
        return q.get(timeout=0.2)
    except queue.Empty:
        return None


def _wait(poll: Callable[[], object], procs: list, what: str, timeout: float = 120) -> object:
    """``poll()`` until it gives something; RuntimeError if a worker died first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = poll()
        if got:
            return got
        dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead:
            raise DemoFailed(f"worker {dead[0][0]} exited with code {dead[0][1]} while waiting for {what}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"gave up after {timeout:.0f} s waiting for {what}")


class Stopped(SystemExit):
    """SIGTERM / SIGHUP while the demo runs (`timeout 60 kvpager demo`, a closed
    terminal): raised in the main thread so that its daemon and workers are
    stopped and its folder removed, as after Ctrl-C, not left running."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def on_signal(signum: int, frame: object) -> None:
        raise Stopped(128 + signum)

    sigs = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None = None) -> DemoReport:
    """Run the demo end to end and return what the daemon accounted at the peak.
    ``progress`` gets a line as each phase starts or ends. SIGTERM or SIGHUP
    raises `Stopped` once the daemon and the workers are stopped."""
    with stop_on_signals():
        return _run_demo(cfg, progress)


def _run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None) -> DemoReport:
    from kvpager.client import Client

    t0 = time.monotonic()

    def say(text: str) -> None:
        if progress is not None:
            progress(f"[{time.monotonic() - t0:5.1f}s] {text}")

    ctx = mp.get_context("spawn")
    say(f"starting a daemon ({cfg.device}, {cfg.num_blocks} blocks of {cfg.block_size} tokens)")
    with daemon(cfg) as endpoint:
        say(f"daemon ready at {endpoint}; starting {cfg.workers} worker processes")
        prompt_ready, at_peak, release = ctx.Event(), ctx.Event(), ctx.Event()
        results = ctx.Queue()
        procs = [ctx.Process(target=run_worker, args=(i, endpoint, cfg, prompt_ready, at_peak, release, results),
                             daemon=True) for i in range(cfg.workers)]
        # Ctrl-C is this process's: the workers are started ignoring SIGINT (kept
        # across exec), so one still importing when it comes prints no traceback.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for p in procs:
                p.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        try:
            _wait(lambda: prompt_ready.wait(0.2), procs, "worker 0 to prefill the system prompt")
            say(f"worker 0 wrote the {cfg.system_prompt_tokens}-token system prompt's K/V and committed it; "
                "the other workers allocate and find it cached")
            got = []
            for _ in procs:
                got.append(_wait(lambda: _get(results), procs, "the workers to finish decoding"))
                index, cached, lengths = got[-1]
                say(f"worker {index}: {len(lengths)} requests prefilled ({sum(cached)} prompt tokens found "
                    f"cached) and {cfg.new_tokens} tokens decoded each; holding them")
            say("every worker at its peak: reading the daemon's accounting")
            with Client(endpoint, heartbeat=False, map_pool=False, name="demo-observer") as obs:
                st = obs.stats()
                seqs = obs.sequences()
                at_peak.set()
                release.set()
                for p in procs:
                    p.join(60)
                say("workers freed their sequences and exited; checking the allocator's integrity")
                try:
                    obs.check_integrity()
                    check_ok = obs.stats().used_blocks == 0
                except Exception:
                    check_ok = False
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    bs, bpb = st.block_size, st.bytes_per_block
    lengths = [n for _, _, ns in got for n in ns]
    no_sharing_blocks = sum(-(-s.num_tokens // bs) for s in seqs)
    return DemoReport(
        workers=cfg.workers,
        requests=len(lengths),
        request_tokens=tuple(lengths),
        kv_bytes_paged=st.used_blocks * bpb,
        kv_bytes_no_sharing=no_sharing_blocks * bpb,
        kv_bytes_contiguous=len(lengths) * cfg.max_model_len * (bpb // bs),
        tokens_stored=st.tokens_stored,
        token_slots_allocated=st.token_slots_allocated,
        prefix_hit_rate=st.prefix_hit_rate,
        shared_blocks=st.shared_blocks,
        system_prompt_blocks=cfg.system_prompt_tokens // bs,
        check_ok=check_ok,
        seconds=time.monotonic() - t0,
    )
