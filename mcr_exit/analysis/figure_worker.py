"""The analysis figures drawn in a process of their own, beside the rest of the work.

Drawing costs seconds (importing matplotlib, laying out text, encoding PNGs), all of it holding the
interpreter; done here it would come after everything else. A ``FigureWorker`` starts
``python -m mcr_exit.analysis.figure_worker`` when the analysis starts: the child imports matplotlib while
this process loads the model, then draws the figures of a finished result while this process writes the
tables and logs the run, and sends each back as PNG bytes. ``collect`` waits for them; the writer puts
them into the staged output folder, which becomes final only after that, so a run is FINISHED only with
its figures written. A worker that cannot start, dies or fails a figure leaves that figure to be drawn
in this process, by the same function: the files are the same either way.

Protocol: pickled ``(file name, figure name, args)`` jobs on the child's stdin, pickled
``(file name, png bytes or None, seconds)`` answers on its stdout, until stdin closes.

In a command run by a warm process (``mcr_exit.warm``), which has matplotlib imported already, the child
is forked from the command's process instead (same protocol over two pipes): it starts drawing at
once, with no interpreter to start and no matplotlib to import beside the statistics.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import mcr_exit


def table_figures(table, phases: dict, title: str) -> list[tuple[str, str, tuple]]:
    """The figures drawn from the layer table alone (they can start before the head maps exist)."""
    return [
        ("bounds.png", "bounds", (table, phases, title)),
        ("figure1_triptych.png", "triptych", (table, phases, title)),
    ]


def head_map_figures(result) -> list[tuple[str, str, tuple]]:
    name = result.profile["model"]["name"]
    return [("attention_maps.png", "head_maps", (result.head_maps, f"{name}, prompt {result.head_maps_prompt}"))]


def analysis_figures(result) -> list[tuple[str, str, tuple]]:
    """The figures of an analysis result as ``(file name, figure name, args)`` jobs (none without head maps,
    i.e. under ``--no-plots``)."""
    if result.head_maps is None:
        return []
    return table_figures(result.table, result.profile["phases"], result.title) + head_map_figures(result)


def draw(figure: str, args: tuple, target) -> None:
    """Draw one figure into ``target`` (a path or a binary file object)."""
    from mcr_exit.analysis import plots

    fn = {"triptych": plots.plot_triptych, "bounds": plots.plot_bounds, "head_maps": plots.plot_head_maps}[figure]
    fn(*args, target)


def render(figure: str, args: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    draw(figure, args, buf)
    return buf.getvalue()


class _Child:
    """One drawing process: jobs go in from sender threads (a pipe holds 64 KiB, and the child reads a job
    only when done with the last one, and with its imports: a write here could wait seconds)."""

    def __init__(self, env: dict):
        self.jobs: list[str] = []
        self.senders: list[threading.Thread] = []
        self.lock = threading.Lock()  # one job at a time into the pipe
        try:
            self.proc: subprocess.Popen | _Forked | None = _Forked.start() if _can_fork() else subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError:
            self.proc = None

    def send(self, jobs: list[tuple[str, str, tuple]]) -> None:
        self.jobs.extend(name for name, _, _ in jobs)
        stdin = self.proc.stdin

        def send() -> None:
            try:
                with self.lock:
                    for job in jobs:
                        pickle.dump(job, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    stdin.flush()
            except (OSError, ValueError, pickle.PicklingError):
                pass  # the child is gone: ``collect`` draws what it did not deliver

        self.senders.append(threading.Thread(target=send, name="mcr-figures", daemon=True))
        self.senders[-1].start()

    def receive(self, done: dict[str, bytes]) -> float:
        """Read the answers into ``done``; returns the child's drawing seconds."""
        seconds = 0.0
        try:
            for _ in self.jobs:
                name, png, took = pickle.load(self.proc.stdout)
                seconds += took
                if png is None:
                    break  # that figure failed there: drawn here, where its error is raised
                done[name] = png
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            pass
        self.stop()
        for sender in self.senders:
            sender.join()
        return seconds

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if kill:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _can_fork() -> bool:
    """A warm child with matplotlib imported and no thread of its own yet: a fork is a ready drawer."""
    return bool(os.environ.get("MCR_EXIT_WARM_CHILD")) and "matplotlib.pyplot" in sys.modules \
        and threading.active_count() == 1 and hasattr(os, "fork")


class _Forked:
    """A drawing process forked from this one, with what ``_Child`` uses of a ``Popen``."""

    def __init__(self, pid: int, stdin, stdout):
        self.pid, self.stdin, self.stdout = pid, stdin, stdout

    @classmethod
    def start(cls) -> _Forked:
        jobs_r, jobs_w = os.pipe()
        answers_r, answers_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the drawer: never returns
            code = 0
            try:
                keep = {0, 1, 2, jobs_r, answers_w}  # not another drawer's pipe: it would never see EOF
                for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                import signal

                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _serve(os.fdopen(jobs_r, "rb"), os.fdopen(answers_w, "wb"))
            except BaseException:  # noqa: BLE001 - the parent draws what did not come back
                code = 1
            finally:
                os._exit(code)
        os.close(jobs_r)
        os.close(answers_w)
        return cls(pid, os.fdopen(jobs_w, "wb"), os.fdopen(answers_r, "rb"))

    def poll(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        return os.waitstatus_to_exitcode(status) if pid else None

    def kill(self) -> None:
        import signal

        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"figure drawer {self.pid}", timeout)
            time.sleep(0.01)


class FigureWorker:
    """Child processes that draw figures: ``submit`` sends jobs (each to the child with the fewest), and
    ``collect`` returns ``{file name: png bytes}``. Two children where there are cores to spare for them
    (the figures then draw side by side), one on smaller machines."""

    def __init__(self, processes: int | None = None):
        self.jobs: list[tuple[str, str, tuple]] = []
        self.background_s = 0.0  # drawing time spent in the children, together
        env = dict(os.environ, MPLBACKEND="Agg")
        package_root = str(Path(mcr_exit.__file__).resolve().parent.parent)  # the children import this code
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        n = processes if processes is not None else (2 if (os.cpu_count() or 1) >= 4 else 1)
        self.children = [c for c in (_Child(env) for _ in range(n)) if c.proc is not None]

    def submit(self, jobs: list[tuple[str, str, tuple]]) -> None:
        self.jobs.extend(jobs)
        for job in jobs:
            if self.children:
                min(self.children, key=lambda c: len(c.jobs)).send([job])

    def collect(self) -> dict[str, bytes]:
        """PNG bytes per file name for every job submitted; those no child delivered are drawn here."""
        done: dict[str, bytes] = {}
        for child in self.children:
            self.background_s += child.receive(done)
        self.children = []
        for name, figure, args in self.jobs:
            if name not in done:
                done[name] = render(figure, args)
        return done

    def close(self) -> None:
        """End the children without waiting for their figures (the run failed or was stopped)."""
        for child in self.children:
            child.stop(kill=True)
        self.children = []


def _serve(channel_in=None, channel_out=None) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    channel_in = channel_in or sys.stdin.buffer
    channel_out = channel_out or sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not enter the answers
    from mcr_exit.analysis import plots

    plots._plt()  # matplotlib imported now, while the parent loads its model
    while True:
        try:
            name, figure, args = pickle.load(channel_in)
        except EOFError:
            return
        t = time.perf_counter()
        try:
            png = render(figure, args)
        except Exception:  # noqa: BLE001 - the parent draws it again and raises the error itself
            png = None
        pickle.dump((name, png, time.perf_counter() - t), channel_out, protocol=pickle.HIGHEST_PROTOCOL)
        channel_out.flush()


if __name__ == "__main__":
    _serve()
