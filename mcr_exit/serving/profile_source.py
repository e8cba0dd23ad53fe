"""Where the phase profile comes from (a file, ``runs:/...`` or ``models:/...``) and whether it fits the model."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.phase_profile import PROFILE_FILE, read_profile


@dataclass(frozen=True, kw_only=True)
class ProfileSource:
    """A validated phase profile and where it was read from."""

    doc: dict
    source: str  # what the user gave: a path, runs:/... or models:/...
    path: str  # the local file that was read (the URI itself for runs:/ and models:/)
    sha256: str

    @property
    def embedding_layer(self) -> int:
        return int(self.doc["embedding_layer"])

    @property
    def phases(self) -> dict:
        return self.doc["phases"]


def _download(uri: str, tracking_uri: str | None, dst: str) -> Path:
    """mlflow's own artifact download for runs:/ and models:/ URIs (through tracking.py)."""
    from mcr_exit.tracking import download_artifacts

    path = download_artifacts(uri, tracking_uri, dst)
    if path.is_dir():
        found = sorted(path.rglob(PROFILE_FILE), key=lambda p: len(p.parts))
        if not found:
            raise DataError(f"{uri} holds no {PROFILE_FILE}")
        path = found[0]
    return path


def load_profile_source(source: str, *, tracking_uri: str | None = None) -> ProfileSource:
    """Read a phase profile from a file, a folder holding one, ``runs:/<id>/phase_profile.json`` or
    ``models:/<name>/<version>`` / ``models:/<name>@<alias>``."""
    if source.startswith(("runs:/", "models:/")):
        with tempfile.TemporaryDirectory(prefix="mcr-exit-profile-") as dst:
            path = _download(source, tracking_uri, dst)
            doc = read_profile(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return ProfileSource(doc=doc, source=source, path=source, sha256=digest)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / PROFILE_FILE
    if not path.exists():
        raise DataError(f"phase profile not found: {source}")
    doc = read_profile(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ProfileSource(doc=doc, source=source, path=str(path.resolve()), sha256=digest)


def check_profile_fits(profile: ProfileSource, *, name: str, model_type: str, n_layers: int,
                       hidden_size: int) -> None:
    """Refuse a profile that was made for another model (ConfigError naming every difference)."""
    m = profile.doc.get("model", {})
    expected = {"name": name, "model_type": model_type, "n_layers": n_layers, "hidden_size": hidden_size}
    found = {"name": m.get("name"), "model_type": m.get("model_type"), "n_layers": profile.doc.get("n_layers"),
             "hidden_size": m.get("hidden_size")}
    diffs = [f"{k} {found[k]!r} != {expected[k]!r}" for k in expected
             if found[k] is not None and found[k] != expected[k]]
    if found["n_layers"] is None or diffs:
        raise ConfigError(f"phase profile {profile.source} was made for another model: "
                          f"{'; '.join(diffs) or 'it states no n_layers'} (profile vs served model)")
    k = profile.embedding_layer
    if not 0 <= k <= n_layers:
        raise ConfigError(f"phase profile {profile.source}: embedding_layer {k} is outside hidden 0..{n_layers}")
