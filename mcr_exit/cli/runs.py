"""`mcr-exit runs`: MLflow runs left RUNNING by a process that is gone, and their repair."""

from __future__ import annotations

import click


@click.command("runs")
@click.option("--repair", is_flag=True, help="Mark the runs found KILLED (with the tag mcr_exit.ended_by).")
@click.option("--experiment", default=None, help="Only this MLflow experiment. Default: every experiment.")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")
def runs_command(repair, experiment, tracking_uri):
    """List the runs still RUNNING whose process, on this host, is provably gone (killed by SIGKILL, the
    OOM killer, a reboot). Every new run already repairs its own experiment; this covers the rest."""
    from mcr_exit.run_state import check_tracking_server, dead_runs, repair_dead_runs
    from mcr_exit.tracking import experiment_ids, open_client, resolve_tracking_uri

    check_tracking_server(resolve_tracking_uri(tracking_uri))
    client = open_client(tracking_uri)
    ids = experiment_ids(client, experiment)
    found = dead_runs(client, ids)
    for run in found:
        tags = run.data.tags
        click.echo(f"{run.info.run_id}  {tags.get('mlflow.runName', '')}  (pid {tags.get('mcr_exit.pid')} gone)")
    if repair:
        fixed = repair_dead_runs(client, ids)
        click.echo(f"marked {len(fixed)} run(s) KILLED")
    elif found:
        click.echo(f"{len(found)} run(s) left RUNNING by a dead process; --repair marks them KILLED")
    else:
        click.echo("no run is left RUNNING by a dead process")
