"""Where a server's threads spend their time: a sampling thread for the serving benchmark.

Every ``interval`` seconds it reads ``sys._current_frames()`` and counts, per thread and per wall-clock
second, the innermost frame together with the innermost frame of mcr-exit's own code. It writes the counts
as JSON every few seconds and at exit. ``summarize`` turns the counts of a time window into the top entries
per thread: a thread seen mostly in ``select`` or ``wait`` is idle; a thread seen in Python code is busy or
waiting for the GIL.

    MCR_EXIT_STACK_SAMPLES=/tmp/samples.json python benchmarks/serving_models.py serve ...
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict


def _where(frame) -> str:
    leaf = frame
    own = None
    f = frame
    while f is not None:
        if "/mcr_exit/" in f.f_code.co_filename:
            own = f
            break
        f = f.f_back

    def name(fr) -> str:
        return f"{os.path.basename(fr.f_code.co_filename)}:{fr.f_code.co_name}:{fr.f_lineno}"

    return name(leaf) if own is None or own is leaf else f"{name(leaf)} <- {name(own)}"


class Sampler:
    def __init__(self, path: str, interval: float = 0.002):
        self.path, self.interval = path, interval
        self.counts: dict[int, Counter] = defaultdict(Counter)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> "Sampler":
        self.thread.start()
        atexit.register(self.dump)
        return self

    def _run(self) -> None:
        me, last = threading.get_ident(), time.time()
        while not self._stop.wait(self.interval):
            now = time.time()
            names = {t.ident: t.name for t in threading.enumerate()}
            with self._lock:
                bucket = self.counts[int(now)]
                for tid, frame in sys._current_frames().items():
                    if tid != me:
                        bucket[f"{names.get(tid, tid)} | {_where(frame)}"] += 1
            if now - last > 5:
                self.dump()
                last = now

    def dump(self) -> None:
        with self._lock:
            data = {str(s): dict(c) for s, c in self.counts.items()}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)


def start_from_env() -> Sampler | None:
    path = os.environ.get("MCR_EXIT_STACK_SAMPLES")
    return Sampler(path).start() if path else None


def summarize(path: str, t0: float, t1: float, top: int = 12) -> str:
    """The top entries per thread between wall-clock times t0 and t1, with their shares of the samples."""
    with open(path) as f:
        data = json.load(f)
    total: Counter = Counter()
    for second, counts in data.items():
        if t0 <= int(second) + 0.5 <= t1:
            total.update(counts)
    by_thread: dict[str, Counter] = defaultdict(Counter)
    for key, n in total.items():
        thread, where = key.split(" | ", 1)
        by_thread[thread][where] += n
    lines = []
    for thread, counts in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values())
        lines.append(f"  thread {thread}: {n} samples")
        for where, c in counts.most_common(top):
            lines.append(f"    {c / n:6.1%}  {where}")
    return "\n".join(lines)
