"""Which process owns a piece of work (a staging folder, an MLflow run), and whether it is provably gone.

An owner is recorded as host, pid, the pid's start time and the machine's boot id. Work is stale only
when this host can prove its owner dead: the pid is gone, or now belongs to a process that started at
another time, or the machine has rebooted since. An owner on another host is never judged (a shared
disk or tracking server may serve machines this process cannot see).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id") or ""


def process_start(pid: int) -> str:
    """The pid's start time in clock ticks since boot (Linux ``/proc``), or "" where it cannot be read."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def current_owner() -> dict[str, str]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "start": process_start(pid), "boot": boot_id()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_is_dead(owner: dict) -> bool:
    """True only when ``owner`` (as from ``current_owner``) is provably no longer running."""
    try:
        host, pid = str(owner["host"]), int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    boot = boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return True  # rebooted since: every process of that boot is gone
    if not _pid_alive(pid):
        return True
    start = process_start(pid)
    return bool(owner.get("start") and start and start != owner["start"])  # the pid was reused
