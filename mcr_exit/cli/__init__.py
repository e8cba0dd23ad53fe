"""The `mcr-exit` command line. Every McrExitError, and every failure of the machine rather than of the code
(a full disk, a failing MLflow database: ``errors.environment_failure``), becomes one line on stderr and exit
code 1."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import NoReturn

import click

from mcr_exit import __version__
from mcr_exit.errors import McrExitError, environment_failure

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
    ("mcr_exit.cli.warm", "warm_command"),
)


def _exit(code: int, *, fast: bool) -> NoReturn:
    """End the process. ``fast`` (a command line, not a caller in this process such as a test runner):
    once the atexit handlers have run (MLflow's, logging's, weakref finalizers) and the output is
    flushed, skip the interpreter's teardown, which frees the objects of torch's and transformers'
    thousands of modules one by one: 1-3 s after the work is done and the outputs are written. Where
    another thread still runs (a pool, a server) or a process group is up, the ordinary exit joins them;
    under a profiler or tracer (``python -m cProfile``, which writes its stats after the program
    returns) the ordinary exit lets it finish."""
    from mcr_exit.timing import profiled

    if fast and not profiled() and not any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                         if t is not threading.main_thread()):
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def _warm_or_later(argv: list[str]) -> None:
    """Run an analysis command in this environment's warm process and exit with its status, or, where
    there is none, go on here and start one when this command ends (``mcr_exit.warm``)."""
    from mcr_exit import warm

    if not warm.enabled(argv):
        return
    code = warm.run(argv)
    if code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    atexit.register(_start_warm_quietly)


def _start_warm_quietly() -> None:
    """At exit: a warm process that cannot start (no space, a bad ``MCR_EXIT_WARM_IDLE``) only costs the
    next command its speed; it never adds a traceback to this one's output."""
    from mcr_exit import warm

    try:
        warm.start_later()
    except Exception:  # noqa: BLE001
        pass


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors (a bad option value, an unknown option) as one line too, without click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from mcr_exit.signals import EXIT_STATUS, Terminated

        fast = args is None  # the process's own command line (a test runner passes its arguments)
        if fast:
            from mcr_exit.bytecode import keep_bytecode

            keep_bytecode()
            _warm_or_later(sys.argv[1:])
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Terminated:  # raised only where there was something to clean up; it has been
            click.echo("Terminated (SIGTERM): any MLflow run of it is marked KILLED; no partial output is left.",
                       err=True)
            _exit(EXIT_STATUS, fast=fast)
        except click.UsageError as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            _exit(exc.exit_code, fast=fast)
        except click.ClickException as exc:
            exc.show()
            _exit(exc.exit_code, fast=fast)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            _exit(1, fast=fast)
        _exit(rv if isinstance(rv, int) else 0, fast=fast)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except McrExitError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        except Exception as exc:  # a full disk or a failing database is the machine's fault: one line too
            line = environment_failure(exc)
            if line is None:
                raise
            raise click.ClickException(line) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mcr-exit")
def main():
    """mcr-exit: find a causal LM's mix / compress / refine phases, and serve from them."""


for _module, _attr in COMMANDS:
    main.add_command(getattr(importlib.import_module(_module), _attr))

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
