"""`mcr-exit serve`: an OpenAI-compatible server with early-exit embeddings at the profile's layer k."""

from __future__ import annotations

import os
import sys
import time

import click

from mcr_exit.cli.options import model_options, pooling_option
from mcr_exit.cli.phase_text import phase_line


def _check_serve_extra() -> None:
    import importlib.util

    from mcr_exit.errors import MissingExtraError

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(module, "serve")


@click.command("serve")
@model_options
@click.option("--profile", "profile_src", required=True, metavar="FILE|runs:/ID/phase_profile.json|models:/NAME/VER",
              help="Phase profile from `mcr-exit analyze`: its embedding_layer k is the default embedding layer.")
@click.option("--tracking-uri", default=None, help="MLflow URI for runs:/ and models:/ profiles.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 to expose).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--api-key", envvar="MCR_EXIT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health. Prefer the env var "
              "MCR_EXIT_API_KEY or --api-key-file: a key on the command line shows in `ps`.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="Read the API key from this file (its first line).")
@click.option("--no-docs", is_flag=True,
              help="Turn off /docs, /redoc and /openapi.json (with an API key they are behind it).")
@click.option("--served-model-name", multiple=True, help="Extra model name(s) clients may send.")
@click.option("--engine", "engine_kind", type=click.Choice(["transformers", "vllm"]), default="transformers",
              show_default=True, help="transformers: mcr-exit's own engine. vllm: vLLM's async engine on one copy "
              "of the weights, embeddings from its model stopped after block k (extra [vllm]).")
@click.option("--tensor-parallel-size", type=int, default=None, help="vLLM: GPUs one model is split across (1).")
@click.option("--gpu-memory-utilization", type=float, default=None,
              help="vLLM: fraction of each GPU's memory for weights, activations and KV cache (vLLM's 0.9).")
@click.option("--max-model-len", type=int, default=None, help="vLLM: context length (default: the model's).")
@click.option("--quantization", default=None, metavar="METHOD",
              help="vLLM: quantization method, passed through (awq, gptq, fp8, ...; default: the checkpoint's).")
@click.option("--enforce-eager", is_flag=True, help="vLLM: no torch.compile / CUDA graphs (faster start).")
@click.option("--max-layer", type=int, default=None, help="Highest hidden index a request's `layer` may ask for.")
@pooling_option
@click.option("--no-normalize", is_flag=True, help="Return raw pooled vectors instead of L2-normalized ones.")
@click.option("--max-queue", type=int, default=128, show_default=True,
              help="Generation requests waiting for a KV cache slot before 429.")
@click.option("--max-queue-tokens", type=int, default=1 << 20, show_default=True,
              help="Embedding input tokens waiting before 429.")
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True, help="Token budget per embedding batch.")
@click.option("--max-batch-size", type=int, default=64, show_default=True, help="Inputs per embedding batch.")
@click.option("--max-running", type=int, default=64, show_default=True,
              help="Sequences generating at once (one KV cache slot each).")
@click.option("--kv-cache-tokens", type=int, default=None,
              help="KV cache size in tokens (slots of --max-input-tokens + --max-new-tokens). "
              "Default: 8 slots on a CPU.")
@click.option("--kv-cache-memory", type=float, default=None,
              help="KV cache size as a fraction of the GPU's memory, next to the weights and the largest "
              "forward. Default on a GPU: 0.9.")
@click.option("--max-inputs", type=int, default=256, show_default=True, help="Inputs per embedding request.")
@click.option("--max-request-tokens", type=int, default=65536, show_default=True,
              help="Input tokens per embedding request, all inputs together (more: 400).")
@click.option("--max-prompts", type=int, default=16, show_default=True,
              help="Prompts per completions request (at most --max-queue).")
@click.option("--max-input-tokens", type=int, default=2048, show_default=True, help="Tokens per input.")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True, help="Cap on max_tokens.")
@click.option("--max-body-bytes", type=int, default=4 * 1024 * 1024, show_default=True,
              help="Largest request body accepted; a larger one gets 413.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds an embedding request may take in total.")
@click.option("--stall-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a generation request may go without a new token (a stream that progresses runs on).")
@click.option("--queue-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a generation request may wait for a KV cache slot before 429.")
@click.option("--read-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client may take to send a request's headers and body; then the connection "
              "is closed (0: no limit).")
@click.option("--embed-batch-wait", type=float, default=10.0, show_default=True,
              help="Milliseconds a non-full embedding batch may wait for more inputs while sequences generate "
              "(fewer, larger forwards leave generation more of the CPU; 0: never wait).")
@click.option("--no-cuda-graphs", is_flag=True,
              help="Run decode steps and embedding batches eagerly instead of replaying CUDA graphs.")
@click.option("--embed-cuda-graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Embedding batches from CUDA graphs per (rows, positions) bucket (GPU only). auto: models of at "
              "most 3e9 parameters, while no sequence generates (beside generation, eagerly: graph batches would "
              "slow the decode steps); on: always; off: never.")
@click.option("--fuse-embeddings", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="While sequences generate, decode steps carry waiting embedding inputs of the served layer "
              "(one pass over the weights for both; the inputs leave the pass after their layer). auto: where "
              "decode steps replay CUDA graphs (a GPU; on the CPU auto is off); on: also eagerly (CPU); off: "
              "embeddings run in batches of their own (docs/serving.md).")
@click.option("--fused-embed-tokens", type=int, default=1024, show_default=True,
              help="Embedding input tokens one decode step may carry (--fuse-embeddings).")
@click.option("--no-compile", is_flag=True,
              help="Capture the decode steps without compiling their blocks first (torch.compile; GPU only). "
              "Compiling adds about 15-20 s to the start on an H200.")
def serve_command(model, revision, dtype, device, profile_src, tracking_uri, host, port, api_key, api_key_file,
                  no_docs, served_model_name, engine_kind, tensor_parallel_size, gpu_memory_utilization,
                  max_model_len, quantization, enforce_eager, max_layer,
                  pooling, no_normalize, max_queue, max_queue_tokens, max_batch_tokens, max_batch_size, max_running,
                  kv_cache_tokens, kv_cache_memory, max_inputs, max_request_tokens, max_prompts, max_input_tokens,
                  max_new_tokens, max_body_bytes, timeout, stall_timeout, queue_timeout, read_timeout,
                  embed_batch_wait, no_cuda_graphs, embed_cuda_graphs, fuse_embeddings, fused_embed_tokens,
                  no_compile):
    """Serve embeddings from the profile's layer k (early exit) and full-depth completions."""
    from mcr_exit.cli.serve_checks import check_listen_address

    _check_serve_extra()
    api_key = _resolve_api_key(api_key, api_key_file)
    vllm_options = _vllm_options(engine_kind, dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len,
                                 quantization, enforce_eager)
    check_listen_address(host, port)  # a bad or busy address fails before anything loads
    if api_key is None and not _is_loopback(host):  # warned only about an address it will serve on
        click.echo(f"warning: serving on {host} without an API key: anyone who can reach this address can use "
                   "the model (set MCR_EXIT_API_KEY or --api-key-file)", err=True)
    from mcr_exit.models import load_model
    from mcr_exit.serving import Engine, EngineConfig
    from mcr_exit.serving.app import create_app
    from mcr_exit.serving.profile_source import check_profile_fits, load_profile_source

    profile = load_profile_source(profile_src, tracking_uri=tracking_uri)  # before the slow model load
    cfg = EngineConfig(max_queue=max_queue, max_queue_tokens=max_queue_tokens, max_batch_tokens=max_batch_tokens,
                       max_batch_size=max_batch_size, max_running=max_running, kv_cache_tokens=kv_cache_tokens,
                       kv_cache_memory=kv_cache_memory, max_inputs=max_inputs, max_prompts=max_prompts,
                       max_request_tokens=max_request_tokens, max_input_tokens=max_input_tokens,
                       max_new_tokens=max_new_tokens, max_layer=max_layer, request_timeout_s=timeout,
                       stall_timeout_s=stall_timeout, queue_timeout_s=queue_timeout, pooling=pooling,
                       normalize=not no_normalize, cuda_graphs=not no_cuda_graphs,
                       compile=not no_compile, embed_batch_wait_s=embed_batch_wait / 1e3,
                       embed_cuda_graphs=embed_cuda_graphs, fuse_embeddings=fuse_embeddings,
                       fused_embed_tokens=fused_embed_tokens)
    if vllm_options is not None:
        engine = _vllm_engine(model, revision, profile, cfg, vllm_options)
    else:
        click.echo(f"loading {model or 'the built-in model'} on {device} ...", err=True)
        loaded = load_model(model, revision=revision, dtype=dtype, device=device)
        check_profile_fits(profile, name=loaded.spec.name, model_type=loaded.model.config.model_type,
                           n_layers=loaded.n_layers, hidden_size=int(loaded.model.config.hidden_size))
        engine = Engine(loaded, profile, cfg)
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes,
                     served_model_names=tuple(served_model_name), docs=not no_docs)
    click.echo(f"{engine.model_id}: {engine.n_layers} blocks; {phase_line(profile.phases, engine.n_layers)}; "
               f"embeddings from hidden {engine.embedding_layer} "
               f"(profile {profile.source}, sha256 {profile.sha256[:12]}); http://{host}:{port}/v1"
               + ("; API key required" if api_key else ""), err=True)
    from mcr_exit.cli.serve_checks import stack_note

    if note := stack_note():
        click.echo(note, err=True)
    run_server(app, engine, host=host, port=port, read_timeout=read_timeout)


def _vllm_options(engine_kind, dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len, quantization,
                  enforce_eager):
    """The checked vLLM options (None for the transformers engine, which refuses vLLM's flags)."""
    from mcr_exit.errors import ConfigError

    given = {"--tensor-parallel-size": tensor_parallel_size, "--gpu-memory-utilization": gpu_memory_utilization,
             "--max-model-len": max_model_len, "--quantization": quantization,
             "--enforce-eager": enforce_eager or None}
    if engine_kind != "vllm":
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise ConfigError(f"{', '.join(named)} only apply to --engine vllm")
        return None
    from mcr_exit.serving.vllm_generator import VllmOptions, require_vllm

    options = VllmOptions(tensor_parallel_size=1 if tensor_parallel_size is None else tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                          quantization=quantization, enforce_eager=enforce_eager, dtype=dtype)
    require_vllm()
    options.check_quantization()
    return options


def _vllm_engine(model, revision, profile, cfg, options):
    """vLLM's async engine on the model, and the engine the routes talk to (no transformers weights here)."""
    from transformers import AutoTokenizer

    from mcr_exit.serving.profile_source import check_profile_fits
    from mcr_exit.serving.vllm_engine import VllmEngine
    from mcr_exit.serving.vllm_generator import model_shape, resolve_model, start_async_llm

    where = resolve_model(model, revision=revision)
    shape = model_shape(where.location)
    check_profile_fits(profile, name=where.name, model_type=shape["model_type"], n_layers=shape["n_layers"],
                       hidden_size=shape["hidden_size"])
    tokenizer = AutoTokenizer.from_pretrained(where.location)
    click.echo(f"starting vLLM on {where.location} (tensor parallel {options.tensor_parallel_size}) ...", err=True)
    llm = start_async_llm(where.location, options, max_num_seqs=cfg.max_running)
    return VllmEngine(llm, tokenizer, name=where.name, location=where.location, n_layers=shape["n_layers"],
                      hidden_size=shape["hidden_size"], vocab_size=shape["vocab_size"],
                      max_positions=shape["max_positions"], profile=profile, config=cfg,
                      max_model_len=options.max_model_len)


def _resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key / MCR_EXIT_API_KEY or from the first line of --api-key-file (not both)."""
    from mcr_exit.errors import ConfigError

    if api_key_file is None:
        return api_key or None
    if api_key:
        raise ConfigError("give the API key once: --api-key (or MCR_EXIT_API_KEY) or --api-key-file")
    try:
        lines = open(api_key_file, encoding="utf-8").read().splitlines()  # noqa: SIM115 - a one-shot read
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read --api-key-file {api_key_file}: {type(exc).__name__}") from exc
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {api_key_file} holds no key on its first line")
    return key


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def run_server(app, engine, *, host: str, port: int, log_level: str = "info",
               read_timeout: float = 30.0, switch_interval_s: float = 0.0005) -> None:
    """uvicorn, with SIGINT / SIGTERM also cancelling in-flight generation at once (streams end, the
    connections close, and the process exits without waiting for them to finish)."""
    import uvicorn

    stopped = {}

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            stopped.setdefault("t", time.monotonic())
            engine.scheduler.stop()
            super().handle_exit(sig, frame)

    # The engine's threads and the event loop share the GIL: a short switch interval lets a decode step
    # go on as soon as the loop has handed out the last one's text (the default, 5 ms, caps steps).
    sys.setswitchinterval(switch_interval_s)
    from mcr_exit.serving.http_timeouts import server_config

    config = server_config(app, host=host, port=port, read_timeout=read_timeout, log_level=log_level,
                           timeout_graceful_shutdown=1)
    try:
        _Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: the shutdown already happened
        pass
    if "t" in stopped:
        click.echo(f"mcr-exit: stopped {time.monotonic() - stopped['t']:.2f} s after the signal", err=True)
        # Everything is shut down; skip the interpreter's teardown of torch and the model, which takes
        # seconds on a loaded machine and would hold the exit past the 2 s a supervisor expects.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
