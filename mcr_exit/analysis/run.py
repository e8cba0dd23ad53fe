"""`mcr-exit analyze` as a function: load, collect, find phases, write outputs, log to MLflow."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mcr_exit import __version__
from mcr_exit.analysis import plots
from mcr_exit.analysis.collect import capture_head_maps
from mcr_exit.analysis.collect import SPECTRA_METHODS, spectral_backend_for
from mcr_exit.analysis.distributed import collect_statistics_distributed, init_from_env, rank
from mcr_exit.analysis.phases import Phases, detect_phases, recommend_embedding_layer
from mcr_exit.analysis.profile import (
    ATTENTION_METRICS,
    HIDDEN_METRICS,
    build_profile,
    head_table,
    layer_table,
    per_prompt_table,
    write_profile,
)
from mcr_exit.data import PromptSet, load_prompts
from mcr_exit.errors import ConfigError
from mcr_exit.models import LoadedModel, load_model
from mcr_exit.models.attention_stats import IMPLEMENTATION
from mcr_exit.models.tokens import encode_prompts, resolve_bos
from mcr_exit.outputs import staged_output_dir


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig:
    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    bos: str = "auto"
    data: str | None = None
    field: str | None = None
    max_prompts: int | None = None
    max_length: int = 1024
    tau: float = 0.3
    batch_size: int = 8
    max_batch_tokens: int = 8192
    output_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str = "mcr-exit"
    mlflow: bool = True
    plots: bool = True
    spectra: str = "auto"

    def __post_init__(self):
        if not (0 < self.tau <= 1):
            raise ConfigError(f"--tau must be in (0, 1], got {self.tau}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.spectra not in SPECTRA_METHODS:
            raise ConfigError(f"--spectra must be one of {', '.join(SPECTRA_METHODS)}, got '{self.spectra}'")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class AnalysisResult:
    profile: dict
    phases: Phases
    output_dir: Path
    run_id: str | None
    seconds: float


def _default_output_dir(model_name: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model_name)
    return Path("mcr-exit-runs") / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def _params(cfg: AnalyzeConfig, loaded: LoadedModel, prompts: PromptSet, bos, n_prompts: int) -> dict:
    return {
        "model": loaded.spec.name,
        "model_source": loaded.spec.source,
        "model_location": loaded.spec.location,
        "revision": loaded.spec.revision or "",
        "dtype": loaded.spec.dtype,
        "device": loaded.spec.device,
        "attn_implementation": f"{IMPLEMENTATION} (streamed statistics: chunked softmax; fused flash-LSE on CUDA half precision)",
        "architecture": loaded.adapter.family,
        "n_layers": loaded.n_layers,
        "bos_policy": bos.policy,
        "bos_token": bos.token or "",
        "max_length": cfg.max_length,
        "tau": cfg.tau,
        "spectra": f"{cfg.spectra} ({spectral_backend_for(cfg.spectra, loaded.input_device)})",
        "dataset_name": prompts.name,
        "dataset_source": prompts.source,
        "dataset_sha256": prompts.digest,
        "n_prompts": n_prompts,
        "package_version": __version__,
    }


def analyze(
    cfg: AnalyzeConfig,
    *,
    loaded: LoadedModel | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
) -> AnalysisResult | None:
    """Run the whole analysis (under torchrun: data-parallel; rank 0 returns the result, others None). Outputs appear in the output directory only when everything succeeded."""
    t0 = time.time()
    prompts = load_prompts(cfg.data, field=cfg.field, max_prompts=cfg.max_prompts)
    if loaded is None:
        device = init_from_env(cfg.device)
        loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=device)
    bos = resolve_bos(loaded.tokenizer, cfg.bos)
    enc = encode_prompts(loaded.tokenizer, prompts.texts, bos, cfg.max_length)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else _default_output_dir(loaded.spec.name)
    params = _params(cfg, loaded, prompts, bos, len(enc.ids))

    def work(logger) -> AnalysisResult:
        progress = progress_factory(len(enc.ids)) if progress_factory else None
        stats = collect_statistics_distributed(
            loaded, enc.ids, tau=cfg.tau, max_batch=cfg.batch_size, max_tokens=cfg.max_batch_tokens,
            progress=progress, spectral_backend=spectral_backend_for(cfg.spectra, loaded.input_device),
        )
        table = layer_table(stats)
        phases = detect_phases(
            **{k: table[k].to_numpy() for k in ("bos_norm", "norm_ratio", "entropy", "entropy_norm", "c", "alpha")},
            sink_rate=table["sink_rate"].to_numpy()[:-1],
        )
        emb, emb_reason = recommend_embedding_layer(phases)
        provenance = {
            "model": {**asdict(loaded.spec), "architecture": loaded.adapter.family,
                      "model_type": loaded.model.config.model_type, "n_heads": stats.n_heads,
                      "hidden_size": int(loaded.model.config.hidden_size)},
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bos": {**asdict(bos), "position0_tokens": enc.position0},
            "data": {"name": prompts.name, "source": prompts.source, "field": prompts.field,
                     "sha256": prompts.digest, "n_prompts": len(enc.ids), "n_dropped_empty": enc.dropped_empty,
                     "n_truncated": enc.truncated, "mean_tokens": float(np.mean(stats.lengths))},
            "config": {"tau": cfg.tau, "max_length": cfg.max_length, "attn_implementation": IMPLEMENTATION},
            "mlflow_run_id": logger.run_id if logger else None,
        }
        final = {k: float(np.nanmean(v)) for k, v in stats.final_normed.items()}
        doc = build_profile(table=table, phases=phases.as_dict(), embedding_layer=emb,
                            embedding_reason=emb_reason, final_normed=final, provenance=provenance)
        with staged_output_dir(out_dir) as staging:
            write_profile(doc, staging)
            table.to_csv(staging / "layers.csv", index=False)
            per_prompt_table(stats, enc.kept).to_csv(staging / "per_prompt.csv.gz", index=False)
            heads = head_table(stats)
            heads.to_csv(staging / "per_head.csv", index=False)
            if cfg.plots:
                title = f"{loaded.spec.name} on {prompts.name} ({len(enc.ids)} prompts)"
                plots.plot_triptych(table, doc["phases"], title, staging / "figure1_triptych.png")
                plots.plot_bounds(table, doc["phases"], title, staging / "bounds.png")
                chosen = plots.representative_heads(heads, doc["phases"], loaded.n_layers)
                example = int(np.argsort(stats.lengths)[len(stats.lengths) // 2])
                maps = capture_head_maps(loaded, enc.ids[example][:96], chosen)
                plots.plot_head_maps(maps, f"{loaded.spec.name}, prompt {enc.kept[example]}",
                                     staging / "attention_maps.png")
            if logger is not None:
                _log_run(logger, table, phases, emb, staging)
                logger.log_dataset(prompts.texts, name=prompts.name, source=prompts.source,
                                   digest=prompts.digest, context="analysis")
        return AnalysisResult(profile=doc, phases=phases, output_dir=out_dir,
                              run_id=logger.run_id if logger else None, seconds=time.time() - t0)

    if rank() != 0:
        # torchrun: other ranks contribute their share of the prompts; rank 0 writes and logs.
        collect_statistics_distributed(loaded, enc.ids, tau=cfg.tau, max_batch=cfg.batch_size,
                                       max_tokens=cfg.max_batch_tokens,
                                       spectral_backend=spectral_backend_for(cfg.spectra, loaded.input_device))
        return None
    if not cfg.mlflow:
        return work(None)
    from mcr_exit.tracking import tracked_run

    with tracked_run(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                     run_name=f"analyze {loaded.spec.name}", tags={"mcr_exit.command": "analyze"}) as logger:
        logger.log_params(params)
        return work(logger)


def _log_run(logger, table, phases: Phases, emb: int, staging: Path) -> None:
    rows = []
    for row in table.to_dict(orient="records"):
        values = {k: row[k] for k in HIDDEN_METRICS}
        values.update({k: row[k] for k in ATTENTION_METRICS})
        rows.append((int(row["index"]), values))
    logger.log_series(rows)
    summary = {
        "peak_norm_ratio": phases.peak_norm_ratio,
        "min_entropy": phases.min_entropy,
        "corr_bos_entropy": phases.corr_bos_entropy,
        "corr_bos_sink_lag1": phases.corr_bos_sink_lag1,
        "embedding_layer": emb,
    }
    if phases.found:
        summary.update({
            "compress_start": phases.compress_start, "refine_start": phases.refine_start,
            "compress_start_frac": phases.compress_start / phases.n_layers,
            "refine_start_frac": phases.refine_start / phases.n_layers,
            "carrier_norm_share": phases.carrier_norm_share,
        })
    logger.log_metrics(summary)
    logger.set_tags({"mcr_exit.phases_found": str(phases.found), "mcr_exit.carrier": str(phases.carrier)})
    logger.log_artifacts(staging)
