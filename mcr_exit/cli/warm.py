"""`mcr-exit warm`: the warm processes that run the analysis commands without their imports."""

from __future__ import annotations

import click


@click.group("warm")
def warm_command():
    """Warm processes: start one for this environment, list them, stop them (see docs/performance.md)."""


@warm_command.command("start")
@click.option("--wait", type=float, default=120.0, show_default=True,
              help="Seconds to wait until it answers (its imports take that long once).")
def start(wait):
    """Start this environment's warm process now (a cold command starts one when it ends)."""
    from mcr_exit import warm

    k = warm.key()
    if warm.start_later(list(warm.DEFAULT_MODULES), wait=wait):
        click.echo(f"warm process for key {k} started")
    elif any(s["key"] == k for s in warm.status()):
        click.echo(f"warm process for key {k} already running")
    else:
        raise click.ClickException("the warm process did not start; see its log in " + str(warm.folder()))


@warm_command.command("status")
def status():
    """List this user's warm processes."""
    from mcr_exit import warm

    rows = warm.status()
    mine = warm.key()
    for s in rows:
        here = " (this environment)" if s["key"] == mine else ""
        click.echo(f"pid {s['pid']}  key {s['key']}{here}  up {s['age_s']:.0f} s  served {s['served']}  "
                   f"running {s['running']}  modules {s['modules']}")
    if not rows:
        click.echo("no warm process")


@warm_command.command("stop")
def stop():
    """Stop all of this user's warm processes (commands already running finish first)."""
    from mcr_exit import warm

    click.echo(f"stopped {warm.stop()} warm process(es)")
