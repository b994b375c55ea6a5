"""The `kvpager` command line. Commands only render what the library returns."""

from __future__ import annotations

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


main.add_command(serve)
main.add_command(demo_command())
main.add_command(bench)
main.add_command(events_command)
for _cmd in INSPECT_COMMANDS + CONTROL_COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
