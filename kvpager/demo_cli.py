"""`kvpager demo`'s command: options, the pool sized for the workload, progress
lines on stderr, and the report as a table or ``--json`` (`kvpager.demo` runs it)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from kvpager.demo import DemoConfig, DemoFailed, DemoReport, run_demo

#: most worker processes `kvpager demo` starts (each is a process with its own client)
MAX_WORKERS = 256


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
    from click.core import ParameterSource

    @click.command()
    @click.option("--workers", type=int, default=DemoConfig.workers, show_default=True,
                  help=f"Worker processes (at most {MAX_WORKERS}).")
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
        from kvpager.backends import default_device, parse_device
        from kvpager.errors import InvalidArgument, KVPagerError

        if not device:  # unset (or --device ''): as serve's default
            device = default_device()
        try:
            parse_device(device)
        except InvalidArgument as e:  # said here, not after a daemon failed to start
            raise click.BadParameter(str(e), param_hint="'--device'") from None
        if min(workers, requests, system_prompt, new_tokens) < 1:
            raise click.BadParameter("--workers, --requests, --system-prompt and --new-tokens must be >= 1")
        if workers > MAX_WORKERS:  # a process each: a typo must not fork thousands
            raise click.BadParameter(f"at most {MAX_WORKERS} worker processes, not {workers}",
                                     param_hint="'--workers'")
        longest = system_prompt + DemoConfig.user_tokens[1] + new_tokens
        given = click.get_current_context().get_parameter_source("max_model_len") != ParameterSource.DEFAULT
        if given and max_model_len < longest:  # (the default grows to the longest request)
            raise click.BadParameter(f"a contiguous cache must hold the longest request: at least {longest} "
                                     f"tokens here, not {max_model_len}", param_hint="'--max-model-len'")
        cfg = DemoConfig(workers=workers, requests_per_worker=requests, system_prompt_tokens=system_prompt,
                         new_tokens=new_tokens, max_model_len=max(max_model_len, longest), device=device)
        # Size the pool for the workload: prompt blocks once, the rest per request, plus slack.
        per_request = -(-(DemoConfig.user_tokens[1] + new_tokens) // cfg.block_size) + 2
        cfg = dataclasses.replace(cfg, num_blocks=system_prompt // cfg.block_size + workers * requests * per_request + 64)
        try:
            report = run_demo(cfg, None if quiet else lambda line: click.echo(line, err=True))
        except (DemoFailed, KVPagerError) as e:  # its daemon did not start, or it or a worker died
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report_text(report, cfg))
        if not report.check_ok:
            sys.exit(1)

    return demo
