"""`mcr-exit ablate`: remove the MLP's write into BOS (paper Fig. 4) and clip the BOS residual (Fig. 20)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mcr_exit.cli.options import data_options, model_options, tracking_options
from mcr_exit.errors import ConfigError


def _parse_clip(clip: str | None) -> tuple[float, ...] | None:
    if clip is None:
        return None
    if clip.strip().lower() == "auto":
        return ()
    values = []
    for part in clip.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"--clip: cannot read '{part}' (use auto or values such as 100,1000)") from None
    for g in values:
        if not g > 0:
            raise ConfigError(f"clipping value must be > 0, got {g:g}")
    return tuple(values)


def position0_note(tokenizer, position0: dict[str, int]) -> str | None:
    """A warning when position 0 of some prompts holds no special token (allowed, but said)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    plain = {tok: n for tok, n in position0.items() if tok not in special}
    if not plain:
        return None
    n = sum(plain.values())
    return (f"position 0 holds no special token in {n} of {sum(position0.values())} prompts "
            f"(e.g. {next(iter(plain))!r}): the ablation acts on the first text token")


def _write_outputs(outcome, out_dir: Path, title: str, plots: bool, extra: dict) -> None:
    from mcr_exit.analysis import ablation_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    outcome.summary.to_csv(out_dir / "summary.csv", index=False)
    outcome.side_by_side.to_csv(out_dir / "side_by_side.csv", index=False)
    for r in outcome.results:
        safe = r.variant.name.replace(" ", "_").replace(",", "-")
        r.table.to_csv(out_dir / f"layers_{safe}.csv", index=False)
    doc = {**extra, "blocks": list(outcome.blocks), "spike_layer": outcome.spike_layer,
           "spike_max_abs": outcome.spike_max_abs, "auto_rounds": outcome.auto_log,
           "summary": json.loads(outcome.summary.to_json(orient="records"))}
    (out_dir / "ablation.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not plots:
        return
    base, abl = outcome.results[0], outcome.results[1]
    ablation_plots.plot_ablation_overlay({"baseline": base.table, abl.variant.name: abl.table},
                                         f"{title}: MLP write into BOS removed", out_dir / "ablation_overlay.png",
                                         blocks=outcome.blocks)
    clips = [r for r in outcome.results if r.variant.kind == "clip"]
    if clips:
        tables = {float("inf"): base.table, **{r.variant.gamma: r.table for r in clips}}
        rows = outcome.summary[outcome.summary["kind"].isin(["baseline", "clip"])]
        ablation_plots.plot_clip_sweep(tables, rows, f"{title}: BOS clipped at hidden {outcome.spike_layer}",
                                       out_dir / "clip_sweep.png")


def _log(logger, outcome, out_dir: Path, tracking_uri, experiment, params: dict) -> None:
    from mcr_exit.analysis.profile import ATTENTION_METRICS, HIDDEN_METRICS
    from mcr_exit.tracking import tracked_run

    for r, row in zip(outcome.results, outcome.summary.to_dict(orient="records")):
        with tracked_run(tracking_uri=tracking_uri, experiment=experiment, run_name=r.variant.name,
                         tags={"mcr_exit.command": "ablate-variant", "mcr_exit.variant": r.variant.kind},
                         parent_run_id=logger.run_id) as child:
            child.log_params({**params, "variant": r.variant.name, "kind": r.variant.kind,
                              "blocks": row["blocks"], "clip_layer": row["clip_layer"], "gamma": row["gamma"]})
            child.log_series([(int(t["index"]), {k: t[k] for k in (*HIDDEN_METRICS, *ATTENTION_METRICS)})
                              for t in r.table.to_dict(orient="records")])
            child.log_metrics({k: v for k, v in row.items() if isinstance(v, float)})
    abl = outcome.summary.iloc[1]
    base = outcome.summary.iloc[0]
    logger.log_metrics({
        "baseline_peak_norm_ratio": base["peak_norm_ratio"], "ablated_peak_norm_ratio": abl["peak_norm_ratio"],
        "baseline_entropy_at_spike": base["entropy_at_spike"], "ablated_entropy_at_spike": abl["entropy_at_spike"],
        "baseline_sink_rate_window": base["mean_sink_rate_window"],
        "ablated_sink_rate_window": abl["mean_sink_rate_window"],
        "baseline_loss": base["loss"], "ablated_loss": abl["loss"], "delta_loss": abl["delta_loss"],
    })
    logger.log_artifacts(out_dir)


def summary_text(outcome, note: str | None) -> str:
    s = outcome.summary
    lines = [f"ablated blocks {','.join(map(str, outcome.blocks))} (MLP write into position 0); "
             f"spike layer hidden {outcome.spike_layer}"]
    if note:
        lines.append(f"  note: {note}")
    lines.append(f"  {'variant':<22}{'ratio@spike':>12}{'H@spike':>9}{'peak ratio':>11}{'min H':>8}"
                 f"{'sink(window)':>13}{'loss':>8}{'dloss':>8}")
    for row in s.to_dict(orient="records"):
        lines.append(f"  {row['variant']:<22}{row['norm_ratio_at_spike']:>12.2f}{row['entropy_at_spike']:>9.3f}"
                     f"{row['peak_norm_ratio']:>11.1f}{row['min_entropy']:>8.3f}{row['mean_sink_rate_window']:>13.3f}"
                     f"{row['loss']:>8.3f}{row['delta_loss']:>+8.3f}")
    return "\n".join(lines)


@click.command("ablate")
@model_options
@data_options
@click.option("--blocks", "layers", default="auto", show_default=True, metavar="auto|J,J-K",
              help="Blocks, counted from 0, whose MLP write into position 0 is removed, e.g. 0,5-7 (block j "
                   "reads hidden j and writes hidden j+1); auto = every block that builds the massive activation.")
@click.option("--clip", default=None, metavar="auto|G1,G2,...",
              help="Also clip the BOS residual to [-g, g] at the spike layer, for each value (auto: a sweep).")
@click.option("--clip-layer", type=int, default=None,
              help="Hidden index to clip (default: right after the last ablated block).")
@click.option("--tau", type=float, default=0.3, show_default=True, help="Sink threshold tau in (0, 1].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--output-dir", default=None,
              help="Where to write the outputs. Default: ./mcr-exit-runs/ablate-<model>-<time>.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@tracking_options
def ablate_command(model, revision, dtype, device, data, field, max_prompts, max_length, bos, layers, clip,
                   clip_layer, tau, batch_size, output_dir, no_plots, tracking_uri, experiment, no_mlflow):
    """Causal test: remove the massive activation and watch compression and sinks go."""
    from mcr_exit.analysis.ablation import AblateConfig, run_ablation
    from mcr_exit.data import load_prompts
    from mcr_exit.models import load_model
    from mcr_exit.models.surgery import check_block, parse_blocks
    from mcr_exit.models.tokens import encode_prompts, resolve_bos

    t0 = time.time()
    cfg = AblateConfig(layers=layers, clip=_parse_clip(clip), clip_layer=clip_layer, tau=tau, batch_size=batch_size)
    if not 0 < tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {tau}")
    prompts = load_prompts(data, field=field, max_prompts=max_prompts)
    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    if layers.strip().lower() != "auto":
        parse_blocks(layers, loaded.n_layers)  # fail before any run is opened
    if clip_layer is not None:
        check_block(clip_layer - 1, loaded.n_layers)
    decision = resolve_bos(loaded.tokenizer, bos)
    enc = encode_prompts(loaded.tokenizer, prompts.texts, decision, max_length)
    note = position0_note(loaded.tokenizer, enc.position0)
    if note:
        click.echo(f"note: {note}", err=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in loaded.spec.name)
    out_dir = Path(output_dir or f"mcr-exit-runs/ablate-{safe}-{time.strftime('%Y%m%d-%H%M%S')}")
    params = {"model": loaded.spec.name, "revision": loaded.spec.revision or "", "layers": layers,
              "dataset_name": prompts.name, "n_prompts": len(enc.ids), "bos_token": decision.token or "",
              "tau": tau}
    title = f"{loaded.spec.name} on {prompts.name} ({len(enc.ids)} prompts)"
    extra = {"model": loaded.spec.name, "revision": loaded.spec.revision, "data": prompts.name,
             "n_prompts": len(enc.ids), "position0_note": note, "position0_tokens": enc.position0}

    def work(logger):
        outcome = run_ablation(loaded, enc.ids, cfg, on_result=lambda r: click.echo(
            f"  {r.variant.name}: peak ratio {r.phases.peak_norm_ratio:.1f}, loss {r.loss:.3f}", err=True))
        _write_outputs(outcome, out_dir, title, not no_plots, extra)
        if logger is not None:
            logger.log_params({**params, "blocks": ",".join(map(str, outcome.blocks)),
                               "spike_layer": outcome.spike_layer})
            logger.set_tags({"mcr_exit.position0_special": str(note is None)})
            _log(logger, outcome, out_dir, tracking_uri, experiment, params)
        return outcome

    if no_mlflow:
        outcome, run_id = work(None), None
    else:
        from mcr_exit.tracking import tracked_run

        with tracked_run(tracking_uri=tracking_uri, experiment=experiment, run_name=f"ablate {loaded.spec.name}",
                         tags={"mcr_exit.command": "ablate"}) as logger:
            outcome, run_id = work(logger), logger.run_id
    click.echo(summary_text(outcome, note))
    click.echo(f"  outputs: {out_dir}" + (f"; MLflow run {run_id}" if run_id else "")
               + f"; took {time.time() - t0:.1f} s")
