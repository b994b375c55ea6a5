"""`kvpager bench`: run the benchmark tools in ``tools/`` with a progress bar.

The benchmarks live in the source checkout (they import baselines such as
torch that kvpager itself does not need), so this command runs them from
there as subprocesses and prints each one's table, or one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

TOOLS = Path(__file__).resolve().parents[1] / "tools"
# (name, script, needs a GPU)
BENCHMARKS = [
    ("allocator", "bench_allocator.py", False),
    ("rpc", "bench_rpc.py", False),
    ("attention", "bench_attention.py", True),
    ("copy", "bench_copy.py", True),
    ("swap", "bench_swap.py", True),
]


@click.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: {benchmark: its --json output}.")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds allowed per benchmark.")
def bench(names: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Run the benchmarks (all that this machine can run, or NAMES: allocator, rpc,
    attention, copy, swap) and print their tables."""
    from kvpager.backends import cuda_available

    known = {n for n, _, _ in BENCHMARKS}
    unknown = set(names) - known
    if unknown:
        raise click.BadParameter(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(known)}")
    if not TOOLS.is_dir():
        click.echo(f"error: no tools/ directory next to the kvpager package ({TOOLS})", err=True)
        click.echo("next: run from a source checkout installed with `pip install -e .`", err=True)
        sys.exit(2)
    gpu = cuda_available()
    chosen, skipped = [], []
    for name, script, needs_gpu in BENCHMARKS:
        if names and name not in names:
            continue
        if not (TOOLS / script).exists() or (needs_gpu and not gpu):
            skipped.append((name, "no GPU" if needs_gpu and not gpu else "script missing"))
        else:
            chosen.append((name, script))
    results: dict[str, object] = {}
    failed = []
    with click.progressbar(chosen, label="benchmarks", file=sys.stderr,
                           item_show_func=lambda item: item[0] if item else "") as bar:
        for name, script in bar:
            cmd = [sys.executable, str(TOOLS / script)] + (["--json"] if as_json else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                failed.append((name, f"timed out after {timeout:g}s"))
                continue
            if proc.returncode != 0:
                failed.append((name, (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]))
                continue
            results[name] = json.loads(proc.stdout) if as_json else proc.stdout.rstrip()
    if as_json:
        click.echo(json.dumps(dict(results=results, skipped=dict(skipped), failed=dict(failed)), indent=2))
    else:
        for name, text in results.items():
            click.echo(f"\n== {name} ==\n{text}")
        for name, why in skipped:
            click.echo(f"\n== {name} == skipped: {why}")
        for name, why in failed:
            click.echo(f"\n== {name} == FAILED: {why}", err=True)
    if failed:
        sys.exit(1)
