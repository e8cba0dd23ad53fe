"""Work a first run needs done, started in background processes before the command imports torch, so
that it overlaps the command's own imports (~12 s on an H200 host, ~3 s on a small CPU machine).

Two jobs, each started only when it is missing (``start``, a few milliseconds, nothing heavy imported):

* **Kernel warm-up** (GPU machines). On a GPU whose Triton cache is empty, ``analyze`` compiles a dozen
  kernels (the attention-statistics sweep and the spectral estimate's steps, ~10 s on one core of an
  H200 host) one after another, each when a layer first reaches it. Which kernels a run needs depends
  only on the model's shapes (head size, heads, hidden size), the dtype and the spectra method, known
  before the model is loaded: the child ``python -m mcr_exit.prepare kernels`` reads the shapes from the
  model's config (a GGUF's metadata, a folder's or the Hub cache's config.json), runs the public
  functions the statistics call (``fused_attention_stats``, ``estimate_spectrum``) once on random
  tensors of those shapes, so that Triton compiles exactly those kernels into its on-disk cache (safe for
  concurrent writers), and exits. The run finds them there when its first layer needs them. The
  spectral kernels are compiled for Gram matrices of size d: a run over prompts of at least d tokens
  needs no other (tests/gpu). Then, for shorter prompts, for one size that is not a multiple of 16; but
  there Triton also specializes on the 16-byte alignment of slices of the estimate's buffers, which
  depends on the batch, so such a run may still compile a few variants itself. A record
  of each finished warm-up (``<cache>/kernels/<key>.json``; key: the model argument and its file's
  identity, dtype, device, spectra, torch and Triton versions, the kernel sources, the host) keeps later
  runs from starting it again. Only where an NVIDIA driver is present and the device is not ``cpu``.
* **GGUF tokenizer** (a GGUF not in the convert cache yet). ``python -m mcr_exit.prepare tokenizer
  FILE`` hashes the file and converts its tokenizer into the cache entry (``convert_cache``), the part
  of a conversion that needs no model classes; the command, when it reaches the load, waits for it if
  it is still under way (up to 5 s, ``convert_cache._wait_for_tokenizer``), reads it back and converts
  only the weights.

A job that fails or comes too late costs nothing but the work the command then does itself, as it would
have without it; results do not change (the same kernels, the same saved tokenizer a cached load reads).
Nothing starts under torchrun, with ``MCR_EXIT_CACHE=off``, or with ``MCR_EXIT_PREPARE=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from mcr_exit.cache_dir import cache_root, entry_key, known_sha256

ENV = "MCR_EXIT_PREPARE"
_SOURCES = ("models/fused_attention_kernels.py", "models/fused_attention.py", "metrics/cheb_step.py",
            "metrics/subspace_kernels.py", "metrics/spectral_estimate.py", "prepare.py")


def _gpu_present(device: str) -> bool:
    if device == "cpu" or device == "mps":
        return False
    return os.path.exists("/dev/nvidiactl")  # without importing torch: the NVIDIA driver's control device


def _stat(path: Path) -> list:
    try:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def warmup_key(model: str | None, revision: str | None, device: str, dtype: str, spectra: str) -> str:
    """What a finished warm-up is valid for; computed before anything heavy is imported."""
    package = Path(__file__).resolve().parent.parent

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    model_path = Path(model).expanduser() if model else None
    doc = {
        "model": model, "revision": revision, "device": device, "dtype": dtype, "spectra": spectra,
        "model_file": _stat(model_path) if model_path is not None and model_path.exists() else None,
        "python": sys.executable, "torch": version("torch"), "triton": version("triton"),
        "sources": [_stat(package / s) for s in _SOURCES], "host": socket.gethostname(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def start(model: str | None, *, revision: str | None, device: str, dtype: str, spectra: str) -> list:
    """Start what a first run of ``model`` on ``device`` still lacks; returns the child processes."""
    if os.environ.get(ENV, "").strip() == "0" or "WORLD_SIZE" in os.environ:
        return []
    root = cache_root()
    if root is None:
        return []
    procs = [_start_tokenizer(model, root), _start_kernels(model, revision, device, dtype, spectra, root)]
    return [p for p in procs if p is not None]


def _spawn(args: list[str]) -> subprocess.Popen | None:
    try:  # setsid: a Ctrl-C at the terminal does not reach it; it ends when its work is done
        return subprocess.Popen([sys.executable, "-m", "mcr_exit.prepare", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
    except OSError:
        return None


def _start_kernels(model, revision, device, dtype, spectra, root: Path) -> subprocess.Popen | None:
    if not _gpu_present(device):
        return None
    record = root / "kernels" / f"{warmup_key(model, revision, device, dtype, spectra)}.json"
    if record.exists():
        return None
    args = ["kernels", "--device", device, "--dtype", dtype, "--spectra", spectra, "--record", str(record)]
    return _spawn(args + (["--model", model] if model else []) + (["--revision", revision] if revision else []))


def gguf_file(model: str | None) -> Path | None:
    """The GGUF file ``load_model(model)`` opens, where that is known without assembling anything."""
    from mcr_exit.models.registry import default_model_file, lookup, model_cache_dir

    known = lookup(model)
    path = Path(model).expanduser() if model else None
    if model is None or (known is not None and known.builtin and not path.exists()):
        try:
            return default_model_file()
        except Exception:  # noqa: BLE001 - not installed: the command says so
            return None
    if known is not None and not path.exists():
        path = model_cache_dir() / known.cache_file_name
    return path if path.is_file() and path.suffix == ".gguf" else None


def _start_tokenizer(model: str | None, root: Path) -> subprocess.Popen | None:
    if (os.cpu_count() or 1) < 2:
        return None  # one core: the child would only slow the command down
    path = gguf_file(model)
    if path is None:
        return None
    sha = known_sha256(path, root)
    if sha is not None and (root / "gguf" / entry_key(sha) / "tokenizer").is_dir():
        return None
    return _spawn(["tokenizer", str(path)])


# ---- the child --------------------------------------------------------------------------------------------
def model_shapes(model: str | None, revision: str | None = None) -> dict | None:
    """{hidden, heads, kv_heads, head_dim} of what ``load_model(model)`` would open, from its config
    alone (no weights read); None when that cannot be known without loading (a model not assembled
    yet, a config without attention heads)."""
    from mcr_exit.models.registry import lookup

    gguf = gguf_file(model)
    if gguf is not None:
        return _gguf_shapes(gguf)
    if model is None or lookup(model) is not None and not Path(model).expanduser().exists():
        return None  # a known model not assembled yet (the command assembles it; the next run warms up)
    path = Path(model).expanduser()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path) if path.exists() else model, revision=revision)
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if not hidden or not heads:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {"hidden": int(hidden), "heads": int(heads), "kv_heads": int(kv), "head_dim": int(head_dim)}


def _gguf_shapes(path: Path) -> dict | None:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    hidden, heads = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    if not hidden or not heads:
        return None
    kv = value(f"{arch}.attention.head_count_kv") or heads
    head_dim = value(f"{arch}.attention.key_length") or hidden // heads
    return {"hidden": int(hidden), "heads": int(heads), "kv_heads": int(kv), "head_dim": int(head_dim)}


def warm(shapes: dict, device, dtype, spectra: str) -> list[str]:
    """Run the statistics' kernel-using functions once on random tensors of the model's shapes; returns
    what ran. The attention sweep and the estimate at n = d go in two threads (Triton's compiler lets go
    of the interpreter for much of its work), the estimate for shorter prompts after them."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mcr_exit.metrics.spectral_estimate import ESTIMATE_MIN_SIZE, estimate_spectrum
    from mcr_exit.models.fused_attention import fused_attention_stats

    H, Hkv, hd, d = shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["hidden"]

    device = torch.device(device)
    on_gpu = device.type == "cuda"

    def where():  # Triton launches on the current CUDA device
        return torch.cuda.device(device) if on_gpu else contextlib.nullcontext()

    def attention() -> str:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.inference_mode(), where():
            T = 200  # any length: the sweep does not specialize on it
            # (B, H, T, d) views of (B, T, H, d) tensors, the layout (and strides) the model's attention has
            q = torch.randn(1, T, H, hd, generator=gen, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(1, T, Hkv, hd, generator=gen, device=device, dtype=dtype).transpose(1, 2)
            fused_attention_stats(q, k, k, hd ** -0.5, torch.tensor([T], device=device))
            if on_gpu:
                torch.cuda.synchronize(device)
        return f"attention statistics (heads {H}/{Hkv}, head size {hd}, {str(dtype).removeprefix('torch.')})"

    def spectrum(n: int) -> str:
        gen = torch.Generator(device=device).manual_seed(n)
        with torch.inference_mode(), where():
            x = torch.randn(2, n + 8, n, generator=gen, device=device, dtype=torch.float32)
            x[:, :, 0] *= 30.0  # one dominant direction, as hidden states have: every phase of the estimate runs
            estimate_spectrum(x.transpose(1, 2) @ x)
            if on_gpu:
                torch.cuda.synchronize(device)
        return f"spectral estimate (n = {n})"

    first, later = [attention], []
    if spectra in ("auto", "estimate"):  # on a GPU both estimate (``collect.spectral_backend_for``)
        if d >= ESTIMATE_MIN_SIZE:
            first.append(lambda: spectrum(d))
        if d % 16 == 0 and d - 1 >= ESTIMATE_MIN_SIZE:
            later.append(lambda: spectrum(d - 1))  # for shorter prompts: after what every run needs
    with ThreadPoolExecutor(len(first), thread_name_prefix="mcr-warmup") as pool:
        done = [f.result() for f in [pool.submit(j) for j in first]]
    return done + [j() for j in later]


def kernels_main(a) -> int:
    import time

    t0 = time.perf_counter()
    import torch

    if not torch.cuda.is_available():
        return 0
    from mcr_exit.models.loading import resolve_dtype

    device = torch.device("cuda", 0) if a.device in ("auto", "cuda") else torch.device(a.device)
    dtype = resolve_dtype(a.dtype, str(device))
    shapes = model_shapes(a.model, a.revision)
    if shapes is None:
        return 0
    done = warm(shapes, device, dtype, a.spectra)
    if a.record:
        record = Path(a.record)
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"shapes": shapes, "dtype": str(dtype), "ran": done,
                                   "seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
        os.replace(tmp, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcr_exit.prepare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    k = sub.add_parser("kernels", help="compile the statistics' Triton kernels for a model's shapes")
    k.add_argument("--model", default=None)
    k.add_argument("--revision", default=None)
    k.add_argument("--device", default="cuda")
    k.add_argument("--dtype", default="auto")
    k.add_argument("--spectra", default="auto")
    k.add_argument("--record", default=None, help="write this JSON file when done")
    t = sub.add_parser("tokenizer", help="convert a GGUF's tokenizer into the convert cache")
    t.add_argument("gguf")
    a = p.parse_args(argv)
    if a.job == "kernels":
        return kernels_main(a)
    from mcr_exit.models.convert_cache import save_tokenizer

    save_tokenizer(Path(a.gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
