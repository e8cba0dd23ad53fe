"""The `mcr-exit` command line. Every McrExitError becomes one line on stderr and exit code 1."""

from __future__ import annotations

import importlib
import sys

import click

from mcr_exit import __version__
from mcr_exit.errors import McrExitError

# (module, click command attribute): one line per command; heavy imports stay inside each command.
COMMANDS = (
    ("mcr_exit.cli.analyze", "analyze_command"),
    ("mcr_exit.cli.lens", "lens_command"),
    ("mcr_exit.cli.probe", "probe_command"),
    ("mcr_exit.cli.mteb_eval", "mteb_command"),
    ("mcr_exit.cli.lmeval", "lmeval_command"),
    ("mcr_exit.cli.choose_layer", "choose_layer_command"),
    ("mcr_exit.cli.serve", "serve_command"),
    ("mcr_exit.cli.ablate", "ablate_command"),
    ("mcr_exit.cli.compare", "compare_command"),
    ("mcr_exit.cli.compare", "sweep_command"),
)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except McrExitError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mcr-exit")
def main():
    """mcr-exit: find a causal LM's mix / compress / refine phases, and serve from them."""


for _module, _attr in COMMANDS:
    main.add_command(getattr(importlib.import_module(_module), _attr))

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
