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
    ("mcr_exit.cli.runs", "runs_command"),
    ("mcr_exit.cli.models", "models_command"),
)


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors (a bad option value, an unknown option) as one line too, without click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from mcr_exit.signals import EXIT_STATUS, Terminated

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Terminated:  # raised only where there was something to clean up; it has been
            click.echo("Terminated (SIGTERM): any MLflow run of it is marked KILLED; no partial output is left.",
                       err=True)
            sys.exit(EXIT_STATUS)
        except click.UsageError as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

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
