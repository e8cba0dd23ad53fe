"""The one writer of each command's output folder, always through ``staged_output_dir``: a folder
appears whole (with the ordinary folder mode) or not at all. Each writer takes a finished result."""

from __future__ import annotations

import json
from pathlib import Path

from mcr_exit.outputs import staged_output_dir
from mcr_exit.phase_profile import write_profile
from mcr_exit.timing import stage


def write_analysis(result, out_dir: Path, *, figures=None) -> Path:
    """analyze: phase_profile.json, layers.csv, per_prompt.csv.gz, per_head.csv and the figures. The
    figures are drawn here, or collected from ``figures`` (a ``FigureWorker`` given the result's figures),
    which drew them meanwhile; the folder becomes final only once they are written."""
    from mcr_exit.analysis.figure_worker import analysis_figures, draw

    with staged_output_dir(out_dir) as staging:
        with stage("tables"):
            write_profile(result.profile, staging)
            result.table.to_csv(staging / "layers.csv", index=False)
            result.per_prompt.to_csv(staging / "per_prompt.csv.gz", index=False)
            result.heads.to_csv(staging / "per_head.csv", index=False)
            if result.spike_tokens is not None:
                result.spike_tokens.to_csv(staging / "spike_tokens.csv", index=False)
        with stage("figures"):  # with a worker: only what is left of its drawing when the tables are done
            if figures is not None:
                for name, png in figures.collect().items():
                    (staging / name).write_bytes(png)
            else:
                for name, figure, args in analysis_figures(result):
                    draw(figure, args, staging / name)
    return Path(out_dir)


def _safe(name: str) -> str:
    return name.replace(" ", "_").replace(",", "-")


def write_ablation(result, out_dir: Path, *, plots: bool) -> Path:
    """ablate: summary.csv, side_by_side.csv, one layers_<variant>.csv each, ablation.json, figures."""
    from mcr_exit.analysis import ablation_plots

    outcome = result.outcome
    with staged_output_dir(out_dir) as staging:
        outcome.summary.to_csv(staging / "summary.csv", index=False)
        outcome.side_by_side.to_csv(staging / "side_by_side.csv", index=False)
        for r in outcome.results:
            r.table.to_csv(staging / f"layers_{_safe(r.variant.name)}.csv", index=False)
        doc = {**result.provenance, "blocks": list(outcome.blocks), "spike_layer": outcome.spike_layer,
               "spike_max_abs": outcome.spike_max_abs, "auto_rounds": outcome.auto_log,
               "summary": json.loads(outcome.summary.to_json(orient="records"))}
        (staging / "ablation.json").write_text(json.dumps(doc, indent=2) + "\n")
        if plots:
            base, abl = outcome.results[0], outcome.results[1]
            ablation_plots.plot_ablation_overlay(
                {"baseline": base.table, abl.variant.name: abl.table}, f"{result.title}: MLP write into BOS removed",
                staging / "ablation_overlay.png", blocks=outcome.blocks)
            clips = [r for r in outcome.results if r.variant.kind == "clip"]
            if clips:
                tables = {float("inf"): base.table, **{r.variant.gamma: r.table for r in clips}}
                rows = outcome.summary[outcome.summary["kind"].isin(["baseline", "clip"])]
                ablation_plots.plot_clip_sweep(tables, rows,
                                               f"{result.title}: BOS clipped at hidden {outcome.spike_layer}",
                                               staging / "clip_sweep.png")
    return Path(out_dir)


def write_comparison(cmp, out_dir: Path, *, plots: bool) -> Path:
    """compare: comparison.csv, comparison.json, relative_depth.png."""
    from mcr_exit.analysis import ablation_plots

    with staged_output_dir(out_dir) as staging:
        cmp.table.to_csv(staging / "comparison.csv", index=False)
        (staging / "comparison.json").write_text(json.dumps(
            {"runs": json.loads(cmp.table.to_json(orient="records")), "pooled": cmp.pooled}, indent=2) + "\n")
        if plots:
            n_layers = dict(zip(cmp.table["label"], cmp.table["n_layers"]))
            ablation_plots.plot_relative_depth(cmp.series, n_layers, f"{len(cmp.table)} runs against relative depth",
                                               staging / "relative_depth.png")
    return Path(out_dir)


def write_sweep_summary(table, tables: dict, steps: dict, folder: Path, *, title: str, plots: bool) -> None:
    """sweep: sweep.csv and training_sweep.png, into the sweep's (staged) folder."""
    from mcr_exit.analysis import ablation_plots

    table.to_csv(folder / "sweep.csv", index=False)
    if plots:
        ablation_plots.plot_training_sweep(tables, steps, title, folder / "training_sweep.png")
