"""A GGUF file converted once: its de-quantized weights, config and tokenizer kept in a cache folder.

transformers loads a GGUF by reading the whole file three times (tokenizer, config, weights) and
de-quantizing every tensor: 15-40 s for SmolLM2-135M, for the same model every time. ``load_gguf``
converts a file once, writes the result as a plain transformers folder, and later loads read that back
(about a second). A load from the cache gives the same tensors as a load from the GGUF: the weights are
saved exactly as the conversion produced them, in the requested dtype.

Where: ``$MCR_EXIT_CACHE``, else ``$XDG_CACHE_HOME/mcr-exit``, else ``~/.cache/mcr-exit``.
``MCR_EXIT_CACHE=off`` turns the cache off (every load converts). Layout::

    gguf/hashes.json                          sha256 of each GGUF file seen, with its size, times and inode
    gguf/<key>/tokenizer/                     tokenizer.json, tokenizer_config.json, ...
    gguf/<key>/<dtype>/                       config.json, model.safetensors, source.json

The key is the sha256 of the file's bytes, with the transformers and gguf versions and this module's
format number (a later converter may convert differently). Hashing 100 MB costs 0.2 s, 500 MB about
2 s; the hash is therefore remembered in ``hashes.json`` against the file's path, size, mtime, ctime and
inode, and computed again when any of them changes (ctime moves on every write to the file and cannot be
set back, so an edit in place that restores the mtime is still seen). Each entry is written into a
temporary folder and renamed into place, so a reader sees a whole entry or none; a concurrent writer of
the same entry loses the rename and keeps its own copy in memory. An entry that fails to load is removed
and converted again. Delete the folder to reclaim the space (about the float size of each model and dtype).

The cache never fails a load. An entry that would not fit in the free space of the cache's disk (with
``FREE_MARGIN`` to spare) is not written, and a write that fails all the same (a full disk, a read-only
folder) leaves no partial entry behind; either way the load goes on with the converted model in memory,
and a warning says why the next load converts again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from mcr_exit.cache_dir import cache_root, entry_key, file_identity, file_sha256, read_json
from mcr_exit.timing import stage

_PATCHING = threading.Lock()
FREE_MARGIN = 256 * 2**20  # bytes left free on the cache's disk after an entry is written


@contextmanager
def _fast_gguf_reading() -> Iterator[None]:
    """While converting: one GGUF reader per file, shared by the tokenizer, config and weights loaders,
    reading a plain array view of the memory map (numpy's memmap subclass costs ~3x on the ~10^6 small
    slices that parsing a vocabulary makes), and gguf's tensor-name map built once per architecture and
    depth (transformers builds it once per module: ~400 times). Same bytes, same maps: same results."""
    import functools

    import gguf
    import numpy as np

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    readers: dict[str, gguf.GGUFReader] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = PlainReader(path, mode)
        return readers[key]

    with _PATCHING:  # one conversion at a time patches the gguf module
        saved = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(saved[1])
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = saved
            readers.clear()


def _convert(path: Path, model_kwargs: dict, tokenizer_dir: Path | None = None):
    """(tokenizer, model) converted from the GGUF; the tokenizer read from ``tokenizer_dir`` instead where
    an earlier conversion (another dtype) saved it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _fast_gguf_reading():
        with stage("load_model.tokenizer"):
            tokenizer = None
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                with suppress(Exception):  # a damaged folder: convert it again
                    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            if tokenizer is None:
                tokenizer = _convert_tokenizer(path)
        with stage("load_model.gguf"):  # config, read, de-quantize, build
            lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **model_kwargs)
    return tokenizer, lm


def _convert_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def save_tokenizer(path: Path) -> None:
    """Convert the GGUF's tokenizer into its cache entry, unless it is there (or the cache is off).
    The part of a conversion that needs no model classes: ``mcr_exit.prepare`` runs it in the background
    of a command's first load of the file."""
    root = cache_root()
    if root is None:
        return
    entry = root / "gguf" / entry_key(file_sha256(path, root))
    if not (entry / "tokenizer").is_dir():
        entry.mkdir(parents=True, exist_ok=True)
        pending = entry / f".tokenizer.{os.getpid()}.pending"  # a load that comes meanwhile waits for it
        pending.touch()
        try:
            with _fast_gguf_reading():
                tokenizer = _convert_tokenizer(path)
            _write_entry(entry / "tokenizer", lambda d: tokenizer.save_pretrained(d))
        finally:
            pending.unlink(missing_ok=True)


def _wait_for_tokenizer(entry: Path, timeout: float = 5.0) -> None:
    """While a live process converts this entry's tokenizer (``save_tokenizer``), wait for it (up to
    ``timeout`` s) rather than convert it a second time beside it."""
    import time

    deadline = time.monotonic() + timeout
    while not (entry / "tokenizer").is_dir() and time.monotonic() < deadline:
        alive = False
        for marker in entry.glob(".tokenizer.*.pending"):
            try:
                os.kill(int(marker.name.split(".")[2]), 0)
                alive = True
            except (ValueError, ProcessLookupError):
                marker.unlink(missing_ok=True)  # left by a process that died
            except PermissionError:
                alive = True
        if not alive:
            return
        time.sleep(0.02)


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (the first name, e.g. the embedding of tied embeddings)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _write_entry(target: Path, fill) -> None:
    """Fill a temporary sibling folder with ``fill(folder)`` and rename it to ``target``, if nobody did."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)  # fails when a concurrent writer got there first: theirs is as good
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_space(folder: Path, need: int) -> None:
    """Raise ENOSPC when ``need`` bytes (plus ``FREE_MARGIN``) do not fit on ``folder``'s disk."""
    free = shutil.disk_usage(folder).free
    if free < need + FREE_MARGIN:
        raise OSError(errno.ENOSPC, f"the converted weights need {need / 2**30:.2f} GiB and "
                                    f"{free / 2**30:.2f} GiB are free on the disk of {folder}")


def _save_safetensors(tensors: dict, file: Path) -> None:
    """safetensors' ``save_file``, its I/O failures (a full disk) raised as ``OSError`` like any other."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = errno.ENOSPC if "No space left" in str(exc) else errno.EIO
        raise OSError(code, f"{exc} ({file})") from exc


def _save(entry: Path, dtype_dir: Path, tokenizer, lm, source: dict) -> None:
    if not (entry / "tokenizer").is_dir():
        _write_entry(entry / "tokenizer", lambda d: tokenizer.save_pretrained(d))
    if dtype_dir.is_dir():
        return
    tensors = _unique_state_dict(lm)
    _check_space(entry, sum(t.numel() * t.element_size() for t in tensors.values()))

    def fill(folder: Path) -> None:
        config = lm.config.to_dict()
        config.pop("quantization_config", None)  # a plain float checkpoint now
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _save_safetensors(tensors, folder / "model.safetensors")
        (folder / "source.json").write_text(json.dumps(source, indent=2) + "\n")

    _write_entry(dtype_dir, fill)


def _import_model_module(dtype_dir: Path) -> None:
    """Import the module of the class that ``AutoModelForCausalLM`` builds for the entry's config, before
    the build. In a new process that import (transformers' modeling code and what it pulls in: torch's
    distributed tensors, dynamo, the generation utilities) is most of a cached load's time: 2-3 s on a
    small CPU machine, 4-9 s on a GPU host. Done here, it is recorded as ``load_model.imports`` whatever
    the transformers version (5.17's ``AutoModelForCausalLM`` imports it on import, 5.24's only when it
    builds), and ``load_model.build`` is the safetensors read and the build alone. Nothing more is
    imported than the build imports; the build still picks the class itself, and a config that the
    mapping does not know is left to it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = read_json(dtype_dir / "config.json").get("model_type")
    with suppress(Exception):  # an unknown or broken architecture: the build reports it
        MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]


def _load_entry(entry: Path, dtype_dir: Path, model_kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with stage("load_model.tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"))
    with stage("load_model.imports"):
        _import_model_module(dtype_dir)
    with stage("load_model.build"):  # safetensors read + model build
        lm = AutoModelForCausalLM.from_pretrained(str(dtype_dir), **model_kwargs)
    return tokenizer, lm


def load_gguf(path: Path, *, model_kwargs: dict) -> tuple[object, torch.nn.Module]:
    """(tokenizer, model) of a GGUF file: from the cache when it holds the file in this dtype, else
    converted (and written to the cache). ``model_kwargs`` are ``from_pretrained``'s (``dtype`` included).
    The cache never makes a load fail: a cache that cannot be read or written means a conversion."""
    root = cache_root()
    dtype = str(model_kwargs.get("dtype", torch.float32)).removeprefix("torch.")
    entry = dtype_dir = None
    if root is not None:
        with stage("load_model.cache_key"):
            try:
                entry = root / "gguf" / entry_key(file_sha256(path, root))
                dtype_dir = entry / dtype
            except OSError:
                entry = None
    if entry is not None and dtype_dir.is_dir() and (entry / "tokenizer").is_dir():
        try:
            return _load_entry(entry, dtype_dir, model_kwargs)
        except Exception:  # noqa: BLE001 - a damaged entry: convert again below
            shutil.rmtree(dtype_dir, ignore_errors=True)
    if entry is None:  # no cache: as transformers loads it (device map included)
        return _convert(path, model_kwargs)
    # Convert on the CPU with the caller's dtype; a device map is applied by reloading the saved entry.
    with stage("load_model.tokenizer_wait"):
        _wait_for_tokenizer(entry)
    tokenizer, lm = _convert(path, {k: v for k, v in model_kwargs.items() if k != "device_map"}, entry / "tokenizer")
    source = {"gguf": str(Path(os.path.realpath(path))), "dtype": dtype, **file_identity(path)}
    with stage("load_model.cache_write"):
        try:
            _save(entry, dtype_dir, tokenizer, lm, source)
        except OSError as exc:  # read-only or full disk: this load still works, uncached
            detail = exc.strerror or str(exc)
            warnings.warn(f"the conversion of {path.name} was not cached ({detail}); the next load converts "
                          f"it again", RuntimeWarning, stacklevel=2)
            return tokenizer, lm
    if "device_map" in model_kwargs:
        del lm
        return _load_entry(entry, dtype_dir, model_kwargs)
    return tokenizer, lm
