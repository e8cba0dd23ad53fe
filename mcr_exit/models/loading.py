"""Load a causal LM from a Hub id, a local transformers folder or a .gguf file."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mcr_exit.errors import ConfigError, ModelLoadError
from mcr_exit.models.adapters import ArchitectureAdapter, adapter_for
from mcr_exit.models.convert_cache import load_gguf
from mcr_exit.models.registry import DEFAULT_MODEL_NAME, default_model_file  # noqa: F401 - re-exported
from mcr_exit.timing import stage

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a model came from and how it was loaded (provenance for every result)."""

    name: str
    source: str  # "gguf", "folder" or "hub"
    location: str
    revision: str | None
    dtype: str
    device: str


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    spec: ModelSpec

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def input_device(self) -> torch.device:
        return self.adapter.embed.weight.device


def resolve_device(device: str) -> str:
    """Validate a --device value: cpu, cuda, cuda:N, mps or auto (device_map='auto')."""
    if device in ("cpu", "auto"):
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' is not available: no CUDA GPU is visible")
        if ":" in device:
            idx = device.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ConfigError(f"device '{device}' is not available: {torch.cuda.device_count()} GPU(s) visible")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' is not available on this machine")
        return device
    raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N, mps or auto")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}': use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep * 2 in name


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"corrupt GGUF file {path}: it does not start with the GGUF magic bytes")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a model loads, back on after (unless it was off already).

    A load in a new process imports transformers' modeling code (~2,000 modules) and reads a tokenizer,
    allocating a few hundred thousand objects that stay alive; every automatic collection meanwhile walks
    the older ones again and frees nothing: about a quarter of a cached load. Reference counting still
    frees what a load drops, and any cycles it leaves are collected once the collector is back on."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def load_model(
    model: str | None = None,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load model and tokenizer; ``model=None`` is the built-in SmolLM2-135M-Instruct GGUF. A GGUF file is
    converted once and read back from the convert cache afterwards (``convert_cache``, docs/performance.md).
    The garbage collector's cycle detection is paused meanwhile (``_gc_paused``)."""
    with _gc_paused():
        return _load_model(model, revision=revision, dtype=dtype, device=device,
                           attn_implementation=attn_implementation)


def _load_model(model: str | None, *, revision: str | None, dtype: str, device: str,
                attn_implementation: str) -> LoadedModel:
    from mcr_exit.models.registry import resolve_model_name

    model = resolve_model_name(model)  # a short name (`mcr-exit models`) -> its GGUF file, assembled once
    with stage("load_model.imports"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

    # Our own progress bar covers the prompts; the loaders' bars and warnings would bury error lines.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if device == "auto":
        kwargs["device_map"] = "auto"
    tok_kwargs: dict = {}
    if model is None:
        path = default_model_file()
        source, name, location = "gguf", DEFAULT_MODEL_NAME, str(path)
    else:
        path = Path(model).expanduser()
        if path.exists():
            source = "gguf" if path.is_file() else "folder"
            if path.is_file() and path.suffix != ".gguf":
                raise ModelLoadError(f"model file {path} is not a .gguf file (give a folder, a .gguf or a Hub id)")
            name, location = (path.stem if source == "gguf" else path.name), str(path.resolve())
        elif _looks_like_path(model):
            raise ModelLoadError(f"model path does not exist: {model}")
        else:
            source, name, location = "hub", model, model
    if source == "gguf":
        _check_gguf(path)
    else:
        load_from = location
        if revision:
            kwargs["revision"] = tok_kwargs["revision"] = revision
    try:
        if source == "gguf":  # converted once, then read back from the cache (convert_cache.py)
            tokenizer, lm = load_gguf(path, model_kwargs=kwargs)
        else:
            with stage("load_model.tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(load_from, **tok_kwargs)
            with stage("load_model.build"):
                lm = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one line for the user
        if source != "gguf":
            what = f"cannot load model '{model}'"
        else:  # the file's bytes, or the machine (memory, disk) that reads them
            what = "cannot load GGUF file" if isinstance(exc, (OSError, MemoryError)) else "corrupt GGUF file"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{what} {location if source == 'gguf' else ''}: {detail}".replace("  ", " ")) from exc
    if device not in ("auto", "cpu"):
        with stage("load_model.to_device"):
            lm = lm.to(device)
    lm.eval()
    spec = ModelSpec(
        name=name,
        source=source,
        location=location,
        revision=revision,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device,
    )
    return LoadedModel(model=lm, tokenizer=tokenizer, adapter=adapter_for(lm), spec=spec)


def from_objects(model: torch.nn.Module, tokenizer, *, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (tests, notebooks)."""
    model.eval()
    p = next(model.parameters())
    spec = ModelSpec(
        name=name, source="object", location=name, revision=None,
        dtype=str(p.dtype).removeprefix("torch."), device=str(p.device),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=spec)
