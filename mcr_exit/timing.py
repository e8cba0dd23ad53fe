"""Wall-clock seconds per stage of a command: where the time to a first result goes.

A ``StageTimer`` records named stages in the order they end. Code deep in the pipeline (the model loader,
the convert cache) marks its stages with the module-level ``stage(name)``, which records into the timer
made active by ``StageTimer.active()`` and does nothing when none is: no timer has to be passed down.

Names are dotted: ``load_model.tokenizer`` is a part of ``load_model``. ``report()`` prints the parts
indented under their stage; ``as_metrics()`` gives MLflow keys ``timing/<name>_s``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ACTIVE: ContextVar[StageTimer | None] = ContextVar("mcr_exit_stage_timer", default=None)
METRIC_PREFIX = "timing/"


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; 10 ms resolution), None where unknown.
    It covers what no timer inside the process can see: the interpreter's start and the first imports."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(stat[stat.rfind(")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


def profiled() -> bool:
    """Whether a profiler or tracer watches this process (``python -m cProfile``, a debugger; on Python
    3.12+ cProfile registers with ``sys.monitoring``)."""
    monitoring = getattr(sys, "monitoring", None)
    return sys.getprofile() is not None or sys.gettrace() is not None or (
        monitoring is not None and monitoring.get_tool(monitoring.PROFILER_ID) is not None)


class StageTimer:
    """Seconds per named stage, plus the total since the timer started (or since ``origin``)."""

    def __init__(self, *, origin: float | None = None):
        self.origin = time.perf_counter() if origin is None else origin
        self.warm = False  # the command runs in a warm process (mcr_exit.warm)
        self.stages: dict[str, float] = {}
        self._started: dict[str, float] = {}  # first start of each stage: the report's order

    @classmethod
    def since_process_start(cls) -> StageTimer:
        """A timer whose total counts from the process's start; that time so far is the stage ``startup``
        (interpreter, command-line parsing, the first imports)."""
        started = os.environ.get("MCR_EXIT_STARTED_AT")  # run by a warm process: the caller's start
        try:
            age = max(0.0, time.time() - float(started)) if started else process_age()
        except ValueError:
            age = process_age()
        timer = cls(origin=time.perf_counter() - (age or 0.0))
        timer.warm = bool(started)
        if age is not None:
            timer.add("startup", age, started=timer.origin)
        return timer

    def add(self, name: str, seconds: float, *, started: float | None = None) -> None:
        """Record (or add to) a stage measured elsewhere, e.g. in a worker thread."""
        self._started.setdefault(name, time.perf_counter() - seconds if started is None else started)
        self.stages[name] = self.stages.get(name, 0.0) + float(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t, started=t)

    @contextmanager
    def active(self) -> Iterator[StageTimer]:
        """Make this the timer that the module-level ``stage`` records into (this thread and its tasks)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def total(self) -> float:
        return time.perf_counter() - self.origin

    def as_metrics(self) -> dict[str, float]:
        """``{"timing/<stage>_s": seconds}`` for every stage, and ``timing/total_s``."""
        out = {f"{METRIC_PREFIX}{name}_s": round(s, 4) for name, s in self.stages.items()}
        out[f"{METRIC_PREFIX}total_s"] = round(self.total(), 4)
        return out

    def _ordered(self) -> list[str]:
        """Stages by start, each followed by its parts (also those recorded later, e.g. from a worker)."""
        by_start = sorted(self.stages, key=lambda n: (self._started[n], n.count(".")))
        out: list[str] = []

        def place(name: str) -> None:
            out.append(name)
            for part in by_start:
                if part.rsplit(".", 1)[0] == name and "." in part:
                    place(part)

        for name in by_start:
            if "." not in name or name.rsplit(".", 1)[0] not in self.stages:
                place(name)
        return out

    def report(self) -> str:
        """One line per stage, parts indented under their stage, the unaccounted rest and the total."""
        total = self.total()
        top = sum(s for name, s in self.stages.items() if "." not in name)
        lines = ["time by stage (in a warm process; startup includes the hand-over):" if self.warm else "time by stage:"]
        width = max([len(n) for n in self.stages] + [12])
        for name in self._ordered():
            s = self.stages[name]
            depth = name.count(".")
            label = ("  " * depth + name.rsplit(".", 1)[-1]).ljust(width + 2)
            lines.append(f"  {label} {s:8.2f} s")
        lines.append(f"  {'(other)'.ljust(width + 2)} {max(0.0, total - top):8.2f} s")
        lines.append(f"  {'total'.ljust(width + 2)} {total:8.2f} s")
        return "\n".join(lines)


def current() -> StageTimer | None:
    """The active timer, if any."""
    return _ACTIVE.get()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage into the active timer; a no-op without one."""
    timer = _ACTIVE.get()
    if timer is None:
        yield
        return
    with timer.stage(name):
        yield
