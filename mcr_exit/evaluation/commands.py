"""The downstream commands as library functions: each takes its config (configs.py), the inputs it read
and the loaded model, and returns a ``CurveRun`` (the curve document and what the writer and the logging
need). They write nothing: ``writers.write_curve_run`` writes, ``results.log_curve_run`` logs.

Inputs are read first (``*_inputs``), before the model loads, so that a missing file or an unreachable
task fails at once; then the caller loads the model (which opens the command's MLflow run) and runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from mcr_exit.evaluation.configs import LensConfig, LmevalConfig, MtebConfig, ProbeConfig


@dataclass(frozen=True, kw_only=True)
class CurveRun:
    """A finished downstream curve, not yet written."""

    kind: str  # lens, probe, mteb, lmeval: the file names <kind>.json, <kind>.csv, <kind>.png
    doc: dict  # the curve document (results.curve_document)
    result: object  # LensResult, ProbeResult, MtebSweep or LmevalSweep
    params: dict  # MLflow params
    model_name: str
    n_layers: int
    output_dir: Path
    profile_path: str | None = None  # a phase_profile.json to rewrite with ``profile`` (mteb --profile)
    profile: dict | None = None


def output_dir_for(output_dir: str | None, command: str, model_name: str) -> Path:
    """--output-dir, else ./mcr-exit-runs/<command>-<model>-<time>."""
    if output_dir:
        return Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("mcr-exit-runs") / f"{command}-{model_name}-{stamp}"


def _curve_run(kind: str, cfg, loaded, result, data: dict, params: dict, **extra) -> CurveRun:
    from mcr_exit.evaluation.results import curve_document

    doc = curve_document(kind, result, loaded=loaded, data=data)
    return CurveRun(kind=kind, doc=doc, result=result, params=params, model_name=loaded.spec.name,
                    n_layers=loaded.adapter.n_layers, output_dir=output_dir_for(cfg.output_dir, kind, loaded.spec.name),
                    **extra)


# lens

def lens_inputs(cfg: LensConfig):
    """The corpus (a PromptSet)."""
    from mcr_exit.data import load_prompts

    return load_prompts(cfg.data, field=cfg.field)


def run_lens(cfg: LensConfig, loaded, prompts, *, progress_factory=None) -> CurveRun:
    """LogitLens cross-entropy, perplexity and entropy at every requested hidden index."""
    from mcr_exit.evaluation.lens import logit_lens

    result = logit_lens(loaded, prompts.texts, window=cfg.window, max_windows=cfg.max_windows,
                        batch_size=cfg.batch_size, bos=cfg.bos, chunk_tokens=cfg.chunk_tokens,
                        layers=cfg.hidden_indices, progress_factory=progress_factory)
    data = {"name": prompts.name, "source": prompts.source, "digest": prompts.digest}
    params = {"data": prompts.source, **result.config, "n_windows": result.n_windows}
    return _curve_run("lens", cfg, loaded, result, data, params)


# probe

def probe_inputs(cfg: ProbeConfig):
    """(train, test or None) labelled texts, each cut to --max-examples."""
    from mcr_exit.evaluation.probes import read_labelled

    train = read_labelled(cfg.train_file, text_field=cfg.text_field, label_field=cfg.label_field)
    test = (read_labelled(cfg.test_file, text_field=cfg.text_field, label_field=cfg.label_field)
            if cfg.test_file else None)
    if cfg.max_examples:
        n = cfg.max_examples
        train = replace(train, texts=train.texts[:n], labels=train.labels[:n])
        test = test and replace(test, texts=test.texts[:n], labels=test.labels[:n])
    return train, test


def run_probe(cfg: ProbeConfig, loaded, inputs) -> CurveRun:
    """A logistic-regression probe per requested hidden index."""
    from mcr_exit.evaluation.probes import probe_layers

    train, test = inputs
    result = probe_layers(loaded, train, test, test_fraction=cfg.test_fraction, seed=cfg.seed, pooling=cfg.pooling,
                          layers=cfg.hidden_indices, c=cfg.c, cache_dir=cfg.cache_dir, bos=cfg.bos,
                          max_length=cfg.max_length, max_batch=cfg.batch_size)
    data = {"name": Path(cfg.train_file).stem, "train": train.source, "test": test.source if test else None,
            "max_examples": cfg.max_examples}
    params = {"train": train.source, "test": test.source if test else "", **result.config,
              "n_train": result.n_train, "n_test": result.n_test}
    return _curve_run("probe", cfg, loaded, result, data, params)


# mteb

def mteb_inputs(cfg: MtebConfig) -> tuple[list, dict | None]:
    """The mteb task objects, their data loaded (an unreachable Hub task fails here, before the model),
    and the --profile document (None without --profile)."""
    from mcr_exit.evaluation.mteb_tasks import custom_task, load_task_data, named_tasks
    from mcr_exit.phase_profile import read_profile

    tasks = named_tasks(list(cfg.tasks)) + [
        custom_task(kind, path, text_field=cfg.text_field, label_field=cfg.label_field)
        for kind, path in cfg.custom_specs]
    load_task_data(tasks)
    return tasks, read_profile(cfg.profile_path) if cfg.profile_path else None


def run_mteb(cfg: MtebConfig, loaded, inputs, *, progress_factory=None) -> CurveRun:
    """MTEB main scores at every requested hidden index; with --profile, the profile with the best layer."""
    from mcr_exit.evaluation.mteb_encoder import mteb_sweep

    tasks, profile = inputs
    result = mteb_sweep(loaded, tasks, layers=cfg.hidden_indices, pooling=cfg.pooling, normalize=cfg.normalize,
                        bos=cfg.bos, max_length=cfg.max_length, batch_size=cfg.batch_size,
                        progress_factory=progress_factory)
    data = {"name": "+".join(result.tasks), "tasks": list(cfg.tasks), "custom": list(cfg.custom)}
    params = {"tasks": ",".join(result.tasks), **result.config}
    run = _curve_run("mteb", cfg, loaded, result, data, params)
    if profile is not None:
        from mcr_exit.evaluation.choose import apply_evidence, embedding_evidence

        run = replace(run, profile_path=cfg.profile_path,
                      profile=apply_evidence(profile, embedding_evidence(mteb=run.doc)))
    return run


# lmeval

def run_lmeval(cfg: LmevalConfig, loaded, *, progress_factory=None) -> CurveRun:
    """lm-eval accuracy through the LogitLens at every requested hidden index (default: the bundled tasks)."""
    from mcr_exit.evaluation.lmeval_model import BUNDLED_TASKS, lmeval_sweep

    names = list(cfg.tasks) or ([] if cfg.task_files else list(BUNDLED_TASKS))
    result = lmeval_sweep(loaded, names, layers=cfg.hidden_indices, task_files=list(cfg.task_files),
                          limit=cfg.limit, batch_size=cfg.batch_size, bos=cfg.bos,
                          include_defaults=cfg.include_defaults, progress_factory=progress_factory)
    data = {"name": "+".join(result.tasks), "task_files": list(cfg.task_files)}
    params = {"tasks": ",".join(result.tasks), **result.config}
    return _curve_run("lmeval", cfg, loaded, result, data, params)
