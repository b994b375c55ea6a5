"""`kvpager demo`: a daemon and several worker processes sharing a system prompt.

The daemon runs as a subprocess on a private ipc:// endpoint. Each worker
(`kvpager.demo_worker`) is a separate process with its own `Client`: it maps
the pool, allocates requests that start with the same system prompt, writes
their K/V straight into the mapped pool, decodes tokens with paged attention
over the shared blocks, and waits at the peak so the parent can read the
daemon's accounting. The model is a stand-in (fixed random projections): the
demo is about the memory, not the text. The report compares the KV memory the
requests use with what contiguous max-length caches would reserve and what
paging without prefix sharing would use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvpager.demo_worker import run_worker
from kvpager.spec import PoolSpec


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
                    raise RuntimeError(
                        f"the demo daemon did not start (exit code {proc.poll()}):\n{log.read()}") from None
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
            raise RuntimeError(f"worker {dead[0][0]} exited with code {dead[0][1]} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {timeout:.0f} s waiting for {what}")


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None = None) -> DemoReport:
    """Run the demo end to end and return what the daemon accounted at the peak.
    ``progress`` gets a line as each phase starts or ends."""
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
        for p in procs:
            p.start()
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


def report_text(r: DemoReport, cfg: DemoConfig) -> str:
    from kvpager.render import human_bytes, table

    rows = [
        (f"contiguous, {cfg.max_model_len}-token max length", human_bytes(r.kv_bytes_contiguous),
         f"{r.saving_vs_contiguous:.1f}x"),
        ("paged, no prefix sharing", human_bytes(r.kv_bytes_no_sharing), f"{r.saving_vs_no_sharing:.1f}x"),
        ("kvpager (paged + shared prefix)", human_bytes(r.kv_bytes_paged), "1.0x"),
    ]
    return "\n".join([
        f"{r.workers} worker processes, {r.requests} requests, each a {cfg.system_prompt_tokens}-token "
        f"shared system prompt + its own prompt + {cfg.new_tokens} generated tokens "
        f"(mean {np.mean(r.request_tokens):.0f} tokens)",
        "",
        table(("KV cache at the peak", "memory", "vs kvpager"), rows),
        "",
        f"system prompt: {r.system_prompt_blocks} blocks stored once, shared by all {r.requests} requests "
        f"({r.shared_blocks} shared blocks in the pool)",
        f"prefix hit rate {100 * r.prefix_hit_rate:.1f}%; {r.tokens_stored} tokens in "
        f"{r.token_slots_allocated} allocated slots ({100 * r.tokens_stored / max(r.token_slots_allocated, 1):.1f}%)",
        f"integrity check after the workers freed everything: {'ok' if r.check_ok else 'FAILED'}"
        f"   ({r.seconds:.1f} s)",
    ])


def demo_command():
    import json

    import click

    @click.command()
    @click.option("--workers", type=int, default=DemoConfig.workers, show_default=True, help="Worker processes.")
    @click.option("--requests", type=int, default=DemoConfig.requests_per_worker, show_default=True,
                  help="Requests per worker.")
    @click.option("--system-prompt", type=int, default=DemoConfig.system_prompt_tokens, show_default=True,
                  help="Tokens of the shared system prompt.")
    @click.option("--new-tokens", type=int, default=DemoConfig.new_tokens, show_default=True,
                  help="Tokens each request generates.")
    @click.option("--max-model-len", type=int, default=DemoConfig.max_model_len, show_default=True,
                  help="What a contiguous cache reserves per request.")
    @click.option("--device", default=None, help="Daemon device: cpu or cuda:N (default: a GPU if there is one).")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object (progress still goes to stderr).")
    @click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
    def demo(workers, requests, system_prompt, new_tokens, max_model_len, device, as_json, quiet):
        """Start a daemon and worker processes that share a system prompt; show the KV memory they use."""
        if device is None:
            from kvpager.backends import default_device

            device = default_device()
        if min(workers, requests, system_prompt, new_tokens) < 1:
            raise click.BadParameter("--workers, --requests, --system-prompt and --new-tokens must be >= 1")
        longest = system_prompt + DemoConfig.user_tokens[1] + new_tokens
        cfg = DemoConfig(workers=workers, requests_per_worker=requests, system_prompt_tokens=system_prompt,
                         new_tokens=new_tokens, max_model_len=max(max_model_len, longest), device=device)
        # Size the pool for the workload: prompt blocks once, the rest per request, plus slack.
        per_request = -(-(DemoConfig.user_tokens[1] + new_tokens) // cfg.block_size) + 2
        cfg = dataclasses.replace(cfg, num_blocks=system_prompt // cfg.block_size + workers * requests * per_request + 64)
        report = run_demo(cfg, None if quiet else lambda line: click.echo(line, err=True))
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report_text(report, cfg))
        if not report.check_ok:
            sys.exit(1)

    return demo
