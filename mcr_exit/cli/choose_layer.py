"""`mcr-exit choose-layer`: combine downstream curves with the phase profile; draw the paper's Figure 8."""

from __future__ import annotations

import click


@click.command("choose-layer")
@click.option("--profile", "profile_path", required=True, metavar="phase_profile.json",
              help="Profile from `mcr-exit analyze`; its embedding_layer is rewritten unless --dry-run.")
@click.option("--lens", "lens_file", default=None, metavar="lens.json",
              help="Result of `mcr-exit lens` (drawn in the figure; not used for the choice).")
@click.option("--lmeval", "lmeval_file", default=None, metavar="lmeval.json",
              help="Result of `mcr-exit lmeval` (drawn in the figure; not used for the choice).")
@click.option("--probe", "probe_file", default=None, metavar="probe.json",
              help="Result of `mcr-exit probe`: its test accuracy chooses the layer when no --mteb is given.")
@click.option("--mteb", "mteb_file", default=None, metavar="mteb.json",
              help="Result of `mcr-exit mteb`: its mean main score chooses the layer.")
@click.option("--figure", default=None, help="Where to draw Figure 8. Default: next to the profile.")
@click.option("--dry-run", is_flag=True, help="Report the choice without rewriting the profile.")
def choose_layer_command(profile_path, lens_file, lmeval_file, probe_file, mteb_file, figure, dry_run):
    """Set embedding_layer from embedding-task evidence (MTEB, else probes); otherwise keep the default."""
    from mcr_exit.evaluation.choose import choose_layer
    from mcr_exit.evaluation.configs import ChooseLayerConfig
    from mcr_exit.evaluation.writers import write_choice

    cfg = ChooseLayerConfig(profile_path=profile_path, lens_file=lens_file, lmeval_file=lmeval_file,
                            probe_file=probe_file, mteb_file=mteb_file, figure=figure, dry_run=dry_run)
    choice = choose_layer(cfg)
    write_choice(choice)
    src = choice.profile["embedding_layer_source"]
    layer = choice.profile["embedding_layer"]
    click.echo(f"embedding_layer = hidden {layer} ({src.get('method')}: {src.get('reason')})")
    if choice.figure:
        click.echo(f"figure: {choice.figure}")
