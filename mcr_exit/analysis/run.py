"""`mcr-exit analyze` as a pipeline: a config that validates itself, ``measure`` (the work, returning a
result), one writer (``writers.write_analysis``) and logging that consumes the finished result
(``run_logs.log_analysis``). ``analyze`` runs them in order, inside an MLflow run opened at the start;
the figures are drawn meanwhile in a process of their own (``figure_worker``), started with the run, and
the output folder and the run's artifacts follow once they are written. Each stage is timed
(``mcr_exit/timing.py``): ``--verbose`` prints the seconds, the run records them as ``timing/*``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mcr_exit import __version__
from mcr_exit.analysis.collect import SPECTRA_METHODS, capture_head_maps, spectral_backend_for
from mcr_exit.analysis.distributed import collect_statistics_distributed, init_from_env, rank
from mcr_exit.analysis.phases import Phases, detect_phases, recommend_embedding_layer
from mcr_exit.analysis.profile import build_profile, head_table, layer_table, per_prompt_table
from mcr_exit.analysis.spikes import spike_summary, spike_tokens_table
from mcr_exit.data import PromptSet, load_prompts
from mcr_exit.errors import ConfigError
from mcr_exit.models import LoadedModel, load_model
from mcr_exit.models.attention_stats import IMPLEMENTATION
from mcr_exit.models.bos_choice import decide_bos
from mcr_exit.models.tokens import EncodedPrompts, encode_prompts
from mcr_exit.phase_profile import clean_json, portable_data_source, portable_location
from mcr_exit.run_state import preflight
from mcr_exit.timing import StageTimer, stage


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
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"--max-prompts must be at least 1, got {self.max_prompts}")


@dataclass(frozen=True, kw_only=True)
class AnalysisResult:
    profile: dict  # the phase_profile.json document
    phases: Phases
    table: pd.DataFrame  # layers.csv
    per_prompt: pd.DataFrame  # per_prompt.csv.gz
    heads: pd.DataFrame  # per_head.csv
    head_maps: dict | None  # (block, head) -> (T, T) attention map of one prompt, for the figure
    head_maps_prompt: int | None
    title: str
    output_dir: Path
    run_id: str | None
    seconds: float
    spike_tokens: pd.DataFrame | None = None  # spike_tokens.csv: the largest-norm tokens per hidden index


def default_output_dir(prefix: str, model_name: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model_name)
    return Path("mcr-exit-runs") / f"{prefix}{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_params(cfg: AnalyzeConfig, loaded: LoadedModel, prompts: PromptSet, bos, n_prompts: int) -> dict:
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
        "n_records_missing_field": prompts.n_missing,
        "package_version": __version__,
    }


def _collect(cfg: AnalyzeConfig, loaded: LoadedModel, enc: EncodedPrompts, progress=None):
    return collect_statistics_distributed(
        loaded, enc.ids, tau=cfg.tau, max_batch=cfg.batch_size, max_tokens=cfg.max_batch_tokens,
        progress=progress, spectral_backend=spectral_backend_for(cfg.spectra, loaded.input_device),
    )


def measure(cfg: AnalyzeConfig, loaded: LoadedModel, prompts: PromptSet, bos, enc: EncodedPrompts, *,
            out_dir: Path, run_id: str | None, progress=None, t0: float | None = None,
            on_table: Callable[[pd.DataFrame, dict, str], None] | None = None) -> AnalysisResult:
    """The work: statistics, tables, phases and the profile document (nothing is written here).
    ``on_table(table, phases, title)`` is called as soon as the layer table and its phases exist (the
    figures drawn from them can start while the rest is computed)."""
    t0 = time.time() if t0 is None else t0
    title = f"{loaded.spec.name} on {prompts.name} ({len(enc.ids)} prompts)"
    with stage("statistics"):  # forward passes and the statistics reduced on the fly
        stats = _collect(cfg, loaded, enc, progress)
    with stage("phases"):
        table = layer_table(stats)
        phases = detect_phases(
            **{k: table[k].to_numpy() for k in ("bos_norm", "norm_ratio", "entropy", "entropy_norm", "c", "alpha")},
            sink_rate=table["sink_rate"].to_numpy()[:-1],
        )
        emb, emb_reason = recommend_embedding_layer(phases)
    spec = {**asdict(loaded.spec), "location": portable_location(loaded.spec.source, loaded.spec.location)}
    provenance = {
        "model": {**spec, "architecture": loaded.adapter.family, "model_type": loaded.model.config.model_type,
                  "n_heads": stats.n_heads, "hidden_size": int(loaded.model.config.hidden_size)},
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bos": {**asdict(bos), "position0_tokens": enc.position0},
        "data": {"name": prompts.name, "source": portable_data_source(prompts.source), "field": prompts.field,
                 "sha256": prompts.digest, "n_prompts": len(enc.ids), "n_missing_field": prompts.n_missing,
                 "n_dropped_empty": enc.dropped_empty,
                 "n_truncated": enc.truncated, "mean_tokens": float(np.mean(stats.lengths))},
        "config": {"tau": cfg.tau, "max_length": cfg.max_length, "attn_implementation": IMPLEMENTATION},
        "mlflow_run_id": run_id,
    }
    final = {k: float(np.nanmean(v)) for k, v in stats.final_normed.items()}
    with stage("phases"):
        tokens = spike_tokens_table(stats, enc.ids, loaded.tokenizer)
        doc = build_profile(table=table, phases=phases.as_dict(), embedding_layer=emb, embedding_reason=emb_reason,
                            final_normed=final, provenance=provenance)
        doc["massive_activations"] = clean_json(spike_summary(stats, tokens))
    if on_table is not None and cfg.plots:
        on_table(table, doc["phases"], title)
    with stage("phases"):
        heads = head_table(stats)
        per_prompt = per_prompt_table(stats, enc.kept)
    maps = example = None
    if cfg.plots:
        from mcr_exit.analysis.plots import representative_heads

        with stage("head_maps"):
            chosen = representative_heads(heads, doc["phases"], loaded.n_layers)
            example = int(np.argsort(stats.lengths)[len(stats.lengths) // 2])
            maps = capture_head_maps(loaded, enc.ids[example][:96], chosen)
            example = enc.kept[example]
    return AnalysisResult(
        profile=doc, phases=phases, table=table, per_prompt=per_prompt, heads=heads,
        head_maps=maps, head_maps_prompt=example, output_dir=out_dir, run_id=run_id, seconds=time.time() - t0,
        title=title,
        spike_tokens=tokens,
    )


def analyze(
    cfg: AnalyzeConfig,
    *,
    loaded: LoadedModel | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
    timer: StageTimer | None = None,
) -> AnalysisResult | None:
    """Run the whole analysis (under torchrun: data-parallel; rank 0 returns the result, others None).
    The MLflow run opens before the work (its duration and inputs are the analysis's); outputs appear
    in the output directory only when everything succeeded. ``timer`` receives the seconds of each stage
    (docs/performance.md); the run records them as ``timing/<stage>_s``."""
    timer = StageTimer() if timer is None else timer
    with timer.active():
        return _analyze(cfg, loaded, progress_factory, timer)


def _analyze(cfg: AnalyzeConfig, loaded: LoadedModel | None, progress_factory, timer: StageTimer):
    t0 = time.time()
    with stage("preflight"):
        preflight(cfg.output_dir, mlflow=cfg.mlflow, tracking_uri=cfg.tracking_uri)
    figures = None
    if cfg.plots and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 alone writes
        from mcr_exit.analysis.figure_worker import FigureWorker

        figures = FigureWorker()  # imports matplotlib now, in a process of its own
    try:
        return _run_stages(cfg, loaded, progress_factory, timer, figures, t0)
    finally:
        if figures is not None:
            figures.close()


def _run_stages(cfg, loaded, progress_factory, timer: StageTimer, figures, t0: float):
    from mcr_exit.analysis.figure_worker import head_map_figures, table_figures
    from mcr_exit.analysis.run_logs import log_analysis
    from mcr_exit.analysis.writers import write_analysis
    from mcr_exit.tracking import maybe_run, run_name, run_tags

    with stage("data"):
        prompts = load_prompts(cfg.data, field=cfg.field, max_prompts=cfg.max_prompts)
    if loaded is None:
        with stage("load_model"):
            device = init_from_env(cfg.device)
            loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=device)
    with stage("encode"):
        bos = decide_bos(loaded, cfg.bos)
        enc = encode_prompts(loaded.tokenizer, prompts.texts, bos, cfg.max_length)
    if rank() != 0:
        # torchrun: other ranks contribute their share of the prompts; rank 0 writes and logs.
        _collect(cfg, loaded, enc)
        return None
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir("", loaded.spec.name)
    spec = loaded.spec
    with ExitStack() as stack:
        with stage("mlflow_start"):
            logger = stack.enter_context(maybe_run(
                cfg.mlflow, tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                run_name=run_name("analyze", spec.name, revision=spec.revision, bos=bos.policy,
                                  data=prompts.name, dtype=spec.dtype),
                tags=run_tags("analyze", model=spec.name, revision=spec.revision, bos=bos.policy,
                              data=prompts.name, dtype=spec.dtype)))
            if logger is not None:
                logger.log_params(run_params(cfg, loaded, prompts, bos, len(enc.ids)))
                logger.log_dataset(prompts.texts, name=prompts.name, source=prompts.source,
                                   digest=prompts.digest, context="analysis")
        progress = progress_factory(len(enc.ids)) if progress_factory else None
        result = measure(cfg, loaded, prompts, bos, enc, out_dir=out_dir, progress=progress, t0=t0,
                         run_id=logger.run_id if logger else None,
                         on_table=None if figures is None else lambda *a: figures.submit(table_figures(*a)))
        if figures is not None and result.head_maps is not None:
            figures.submit(head_map_figures(result))  # drawn beside what follows
        if logger is not None:
            with stage("mlflow_log"):
                log_analysis(logger, result)
        write_analysis(result, out_dir, figures=figures)
        if figures is not None:
            timer.add("figures.in_worker", figures.background_s)
        if logger is not None:
            with stage("mlflow_artifacts"):
                logger.log_artifacts(out_dir)
            logger.log_metrics(timer.as_metrics())
    return result
