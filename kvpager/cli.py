"""The `kvpager` command line. Commands only render what the library returns."""

from __future__ import annotations

import warnings
from typing import Any

import click

from kvpager import __version__
from kvpager.bench_cli import bench
from kvpager.control_cli import COMMANDS as CONTROL_COMMANDS
from kvpager.demo_cli import demo_command
from kvpager.events_cli import events_command
from kvpager.inspect_cli import COMMANDS as INSPECT_COMMANDS
from kvpager.serve_cli import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvpager")
def main() -> None:
    """kvpager: a paged KV-cache memory manager for LLM inference."""
    warnings.showwarning = _one_line


def _one_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """A warning as the commands' other messages are, one line on stderr (Python's
    own form named a source file and line of kvpager's, and printed that line)."""
    click.echo(f"warning: {message}", err=True)


main.add_command(serve)
main.add_command(demo_command())
main.add_command(bench)
main.add_command(events_command)
for _cmd in INSPECT_COMMANDS + CONTROL_COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
