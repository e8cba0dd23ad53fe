"""Run state around MLflow: the tracking server checked before any work, runs that record their owner
process, and runs left RUNNING by a dead process found and marked KILLED.

A process killed by SIGKILL (or the OOM killer, or a power cut) cannot end its run. Each run therefore
records its owner (``mcr_exit.host``, ``mcr_exit.pid``, ``mcr_exit.pid_start``, ``mcr_exit.boot``), and
every new run of the experiment first marks KILLED the RUNNING runs whose owner is provably gone
(``repair_dead_runs``). ``mcr-exit runs --repair`` does the same across experiments on demand.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from mcr_exit.errors import ConfigError
from mcr_exit.owner import current_owner, owner_is_dead

OWNER_TAGS = {"host": "mcr_exit.host", "pid": "mcr_exit.pid", "start": "mcr_exit.pid_start", "boot": "mcr_exit.boot"}
REPAIR_TAG = "mcr_exit.ended_by"
REPAIR_NOTE = "repair: its process was gone (killed without a chance to end the run)"
CONNECT_TRIES = 2
CONNECT_TIMEOUT_S = 3.0


def owner_tags() -> dict[str, str]:
    """The tags that name the process owning a run (this one)."""
    owner = current_owner()
    return {tag: owner[key] for key, tag in OWNER_TAGS.items() if owner[key]}


def _check_sqlite_path(uri: str) -> None:
    """A ``sqlite:///`` store's database must be a file, or a name in a folder that exists or can be
    made: a file where a folder must go is found here, not as a traceback from inside MLflow."""
    name = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
    if not name or name == ":memory:":
        return
    db = Path(name)
    if db.is_dir():
        raise ConfigError(f"MLflow tracking URI {uri}: {db} is a folder, not a database file")
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"MLflow tracking URI {uri}: {folder} is a file, so the database cannot be made under it")
    if not os.access(folder if not db.exists() else db, os.W_OK):
        raise ConfigError(f"MLflow tracking URI {uri}: {db if db.exists() else folder} is not writable")


def check_tracking_server(uri: str) -> None:
    """For an http(s) tracking URI, one-line ConfigError unless its host accepts a connection (2 tries,
    3 s each): a dead server is found in seconds, before a model is loaded, not after minutes of retries.
    For a ``sqlite:///`` URI, the same for a database that cannot be made or written (``_check_sqlite_path``)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        _check_sqlite_path(uri)
        return
    if parsed.scheme not in ("http", "https"):
        return
    host = parsed.hostname
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"MLflow tracking URI {uri}: the port is not a number in 0..65535") from None
    if not host:
        raise ConfigError(f"MLflow tracking URI {uri} names no host")
    error: OSError | None = None
    for attempt in range(CONNECT_TRIES):
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            error = exc
            if attempt + 1 < CONNECT_TRIES:
                time.sleep(0.5)
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    raise ConfigError(f"MLflow tracking server {uri} is not reachable ({reason}); start it, or pass "
                      "--tracking-uri sqlite:///mlflow.db, or --no-mlflow")


def _owner_of(run) -> dict[str, str]:
    tags = run.data.tags
    return {key: tags.get(tag, "") for key, tag in OWNER_TAGS.items()}


def dead_runs(client, experiment_ids: list[str]) -> list:
    """RUNNING runs of these experiments started on this host whose owner process is provably gone."""
    if not experiment_ids:
        return []
    host = socket.gethostname().replace("'", "")
    flt = f"attributes.status = 'RUNNING' and tags.`{OWNER_TAGS['host']}` = '{host}'"
    runs = client.search_runs(experiment_ids, flt, max_results=1000)
    return [r for r in runs if owner_is_dead(_owner_of(r))]


def repair_dead_runs(client, experiment_ids: list[str], *, strict: bool = True) -> list[str]:
    """Mark KILLED the runs ``dead_runs`` finds (with a tag saying why); returns their ids.
    ``strict=False`` (a new run repairing on its way): a store that cannot answer the search does not
    stop the new run, which goes on without the repair."""
    try:
        found = dead_runs(client, experiment_ids)
    except Exception:  # noqa: BLE001 - MLflow stores raise many types; the repair is a courtesy here
        if strict:
            raise
        return []
    fixed = []
    for run in found:
        client.set_tag(run.info.run_id, REPAIR_TAG, REPAIR_NOTE)
        client.set_terminated(run.info.run_id, status="KILLED")
        fixed.append(run.info.run_id)
    return fixed


def preflight(output_dir: str | None, *, mlflow: bool, tracking_uri: str | None) -> None:
    """What can fail without the model, checked before anything heavy is imported or loaded: the output
    folder may be written (outputs.check_output_dir; for the default folder, its parent) and the
    tracking server answers."""
    from pathlib import Path

    from mcr_exit.outputs import check_output_dir

    if output_dir:
        check_output_dir(output_dir)
    else:  # a new folder with a time stamp: only its parent needs checking
        check_output_dir(Path("mcr-exit-runs") / f".unwritten-{time.time_ns()}", replace=False)
    if mlflow:
        from mcr_exit.tracking import resolve_tracking_uri

        check_tracking_server(resolve_tracking_uri(tracking_uri))
