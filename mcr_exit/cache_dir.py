"""Where mcr-exit keeps what it computes once: ``$MCR_EXIT_CACHE``, else ``$XDG_CACHE_HOME/mcr-exit``, else
``~/.cache/mcr-exit``; ``MCR_EXIT_CACHE=off`` turns the caches that can be off (converted models, BOS
evidence, compiled-kernel records) off. Imports nothing heavy: a command asks for it before torch loads."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path

CACHE_ENV = "MCR_EXIT_CACHE"
OFF_WORDS = ("off", "0", "none", "false", "no")  # a setting that turns something off
GGUF_FORMAT = 1  # the convert cache's layout (models/convert_cache.py): bump when it or what is saved changes


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/mcr-exit``, else ``~/.cache/mcr-exit``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mcr-exit"


def cache_root() -> Path | None:
    """The cache folder, or None when ``MCR_EXIT_CACHE=off``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env and env.lower() in OFF_WORDS:
        return None
    if env:
        return Path(env).expanduser()
    return default_cache_root()


# ---- the convert cache's keys (models/convert_cache.py), here so that a command can look before torch loads
def file_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_json_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def known_sha256(path: Path, root: Path) -> str | None:
    """The sha256 remembered for the file under ``root``, if its size, times and inode have not changed."""
    path = Path(os.path.realpath(path))
    ident = file_identity(path)
    known = read_json(root / "gguf" / "hashes.json").get(str(path))
    if isinstance(known, dict) and {k: known.get(k) for k in ident} == ident and known.get("sha256"):
        return str(known["sha256"])
    return None


def file_sha256(path: Path, root: Path | None = None) -> str:
    """sha256 of the file's bytes, remembered under ``root`` while the file's size, times and inode stay."""
    path = Path(os.path.realpath(path))
    known = known_sha256(path, root) if root is not None else None
    if known is not None:
        return known
    ident = file_identity(path)
    index = root / "gguf" / "hashes.json" if root is not None else None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    sha = digest.hexdigest()
    if index is not None and file_identity(path) == ident:  # unchanged while it was read
        with suppress(OSError):
            doc = read_json(index)
            doc[str(path)] = {**ident, "sha256": sha}
            write_json_atomic(index, doc)
    return sha


def entry_key(sha256: str) -> str:
    """The entry's folder name: the file's hash and the versions of what converts it (read from the
    installed packages' metadata: importing gguf costs a second, and a cache hit needs none of it)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    return f"{sha256[:32]}-tf{installed('transformers')}-gguf{installed('gguf')}-f{GGUF_FORMAT}"
