"""`kvpager bench`: run the benchmark tools with a progress bar.

The benchmarks are scripts (`tools/` in a checkout; a wheel installs them in
the package's ``_tools`` folder in a wheel), run as subprocesses, each printing its
table or, with ``--json``, one JSON object. What a benchmark needs beyond
kvpager (a GPU, CuPy, torch) is checked first: one that cannot run here is
listed as skipped with what to install, not failed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import click

from kvpager.inspect_cli import Seconds

#: Where the scripts are: beside the package in a checkout, else where pip put them.
TOOLS_DIRS = (Path(__file__).resolve().parents[1] / "tools", Path(__file__).resolve().parent / "_tools")
# (name, script, needs a GPU, Python modules it imports beyond kvpager's own dependencies)
BENCHMARKS = [
    ("allocator", "bench_allocator.py", False, ()),
    ("rpc", "bench_rpc.py", False, ()),
    ("attention", "bench_attention.py", True, ("cupy", "torch")),
    ("copy", "bench_copy.py", True, ("cupy",)),
    ("swap", "bench_swap.py", True, ("cupy",)),
    ("peers", "bench_peers.py", True, ("cupy", "torch")),  # FlashInfer optional: "absent" columns
]
_INSTALL = {"cupy": "pip install 'kvpager[cuda]' (or 'kvpager[cuda12]')", "torch": "pip install 'kvpager[torch]'"}


def tools_dir() -> Path | None:
    """The first folder of `TOOLS_DIRS` that holds the benchmark scripts."""
    return next((d for d in TOOLS_DIRS if (d / BENCHMARKS[0][1]).is_file()), None)


def missing(needs_gpu: bool, modules: tuple[str, ...], gpu: bool) -> str | None:
    """Why a benchmark cannot run here (what to install), or None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return "needs " + "; ".join(f"{m}: {_INSTALL.get(m, 'pip install ' + m)}" for m in absent)
    if needs_gpu and not gpu:
        return "no GPU"
    return None


@click.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: {benchmark: its --json output}.")
@click.option("--timeout", type=Seconds(open_low=True), default=900, show_default=True, help="Seconds allowed per benchmark.")
def bench(names: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Run the benchmarks (all that this machine can run, or NAMES: allocator, rpc,
    attention, copy, swap, peers) and print their tables."""
    from kvpager.backends import cuda_available

    known = {n for n, *_ in BENCHMARKS}
    unknown = set(names) - known
    if unknown:
        raise click.BadParameter(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(known)}")
    tools = tools_dir()
    if tools is None:
        click.echo("error: the benchmark scripts are not here: looked in " + " and ".join(map(str, TOOLS_DIRS)),
                   err=True)
        click.echo("next: reinstall kvpager with pip (the wheel puts them in the package's _tools folder), "
                   "or run from a source checkout", err=True)
        sys.exit(2)
    gpu = cuda_available()
    chosen, skipped = [], []
    for name, script, needs_gpu, modules in BENCHMARKS:
        if names and name not in names:
            continue
        why = "script missing" if not (tools / script).exists() else missing(needs_gpu, modules, gpu)
        if why:
            skipped.append((name, why))
        else:
            chosen.append((name, script))
    results: dict[str, object] = {}
    failed = []
    with click.progressbar(chosen, label="benchmarks", file=sys.stderr,
                           item_show_func=lambda item: item[0] if item else "") as bar:
        for name, script in bar:
            cmd = [sys.executable, str(tools / script)] + (["--json"] if as_json else [])
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
