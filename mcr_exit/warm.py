"""A warm process: the analysis commands without the seconds of imports before them.

Importing torch, transformers, MLflow and the rest takes 5 s on a small CPU machine and 9-16 s on some GPU
hosts, on every run, while the work on a small prompt set takes a second or two. A user who changes a
flag and looks again pays the imports every time. So, like the daemons of Gradle or Bazel:

- A command of ``WARM_COMMANDS`` that finds no warm process for its environment runs as usual and, when it
  ends, starts one in the background (``python -m mcr_exit.warm_process``). That process imports the
  modules the command used (the list comes from the command's own ``sys.modules``), then waits on a Unix socket.
- The next such command connects and hands over its arguments, working folder, environment, umask, module
  search path and its standard input, output and error (the file descriptors themselves, ``SCM_RIGHTS``).
  The warm process forks a child that runs the command as a new process would, in a process group of its
  own; the caller forwards its signals (Ctrl-C, SIGTERM, SIGHUP) to that group, waits, and exits with the
  child's status. A child killed by a signal makes the caller end by the same signal.
- A warm process serves one environment: the key is the Python executable and its flags (``-O``, ``-W``),
  the module search path (all but its first entry, the script's or working folder), every environment
  variable but a few that only
  describe the terminal or the shell (``IGNORED_ENV``), and the file stamps of mcr-exit's sources and of
  torch, transformers, MLflow and the libraries below them. Anything else finds no warm process and runs
  cold: an edited source file or an upgraded package is never served by a stale process.
- CUDA is never initialized in the warm process (a forked child could not use it); where an import
  did, the warm process exits at once and every command runs cold.
- It exits after ``MCR_EXIT_WARM_IDLE`` seconds without a command (default 900), on ``mcr-exit warm
  stop``, and when its lock or socket file is removed. ``MCR_EXIT_WARM=0`` turns it all off (the test
  suite does); it is never used under ``torchrun``, from inside a warm child, with ``-X`` options
  (``-X importtime``) or under a profiler or tracer (they watch the caller, not the child).

What a cold process reads from the environment once, at import (``OMP_NUM_THREADS``, ``HF_HOME``, ...),
is covered by the key. What it reads later is read by the child from the caller's environment, set before
the command starts. Not carried over: resource limits (``ulimit``), the controlling terminal (a child's
``isatty`` is right, but Ctrl-Z stops the caller only) and the caller's real process id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

WARM_COMMANDS = frozenset({"analyze", "lens", "probe", "ablate", "choose-layer"})
DEFAULT_IDLE_S = 900.0
STARTING_WAIT_S = 60.0  # the longest a command waits for a warm process that is still importing
# What a cold ``analyze`` needs beyond what ``mcr_exit.cli`` imports (``mcr-exit warm start``).
DEFAULT_MODULES = ("mcr_exit.analysis.run", "mcr_exit.tracking", "mlflow", "mlflow.tracking",
                   "transformers.models.llama.modeling_llama")
# Always imported too: matplotlib for the figures, drawn in processes forked from the command's
# (``analysis.figure_worker``), which then start with it imported.
ALWAYS_MODULES = ("mcr_exit.analysis.plots", "matplotlib", "matplotlib.pyplot")
# Packages whose installed files enter the key (an upgrade of any of them means another process).
STAMPED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "mlflow", "sklearn",
                    "scipy", "pandas", "gguf", "triton", "click", "matplotlib", "accelerate")
# Environment variables that only describe the terminal or the shell: not part of the key.
IGNORED_ENV = frozenset({
    "PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLORTERM", "COLUMNS", "LINES", "DISPLAY", "WAYLAND_DISPLAY",
    "XAUTHORITY", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND", "LS_COLORS", "MAIL", "TMUX", "TMUX_PANE",
    "STY", "WINDOW", "DBUS_SESSION_BUS_ADDRESS", "LESS", "LESSOPEN", "LESSCLOSE", "PAGER", "EDITOR", "VISUAL",
    "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "WT_SESSION",
    "SECURITYSESSIONID", "LC_TERMINAL", "LC_TERMINAL_VERSION", "TERM_PROGRAM", "TERM_PROGRAM_VERSION",
    "TERM_SESSION_ID", "VTE_VERSION", "WINDOWID", "KONSOLE_VERSION", "KITTY_WINDOW_ID", "ITERM_SESSION_ID",
    "VSCODE_GIT_IPC_HANDLE", "VSCODE_IPC_HOOK_CLI", "HISTFILE", "HISTSIZE", "HISTFILESIZE", "HISTCONTROL",
})
_INTERNAL_ENV = ("MCR_EXIT_WARM_CHILD", "MCR_EXIT_STARTED_AT")
_AT_START: tuple[str, dict, list] | None = None  # key, environment and search path when ``run`` was asked
_HEADER = struct.Struct("!I")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def enabled(argv: list[str]) -> bool:
    """Whether this command line may be run by (and leave behind) a warm process."""
    env = os.environ
    if env.get("MCR_EXIT_WARM", "1").strip().lower() in ("0", "false", "no", "off", ""):
        return False
    if env.get("MCR_EXIT_WARM_CHILD") or any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")):
        return False
    if not argv or argv[0] not in WARM_COMMANDS or "--help" in argv or "-h" in argv:
        return False
    from mcr_exit.timing import profiled

    if sys._xoptions or profiled():  # a profiler or tracer watches this process, not another
        return False
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "pidfd_open")


def folder() -> Path:
    """Where the sockets, locks and logs are: ``MCR_EXIT_WARM_DIR``, else ``$XDG_RUNTIME_DIR/mcr-exit``, else
    ``/tmp/mcr-exit-warm-<uid>``; created private to this user, refused if anyone else may write to it."""
    given = os.environ.get("MCR_EXIT_WARM_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(given) if given else Path(runtime) / "mcr-exit" if runtime else Path(f"/tmp/mcr-exit-warm-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{path} is not private to this user")
    return path


def _stamp(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), st.st_mtime_ns, st.st_size]


def _sources_stamp() -> str:
    """A digest of mcr-exit's own source files (name, modification time, size)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(str(root).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                h.update(json.dumps(_stamp(Path(dirpath) / name)).encode())
    return h.hexdigest()


def key() -> str:
    """This environment's key (see the module's description)."""
    stamps = []
    for name in STAMPED_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        stamps.append(_stamp(Path(spec.origin)) if spec is not None and spec.origin else [name, None])
    parts = {
        "exe": sys.executable, "version": sys.version, "uid": os.getuid(), "path": sys.path[1:],
        "flags": subprocess._args_from_interpreter_flags(),  # -O, -W, -X, -E, ... (as multiprocessing passes them)
        "env": sorted((k, v) for k, v in os.environ.items() if k not in IGNORED_ENV and k not in _INTERNAL_ENV),
        "packages": stamps, "sources": _sources_stamp(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _paths(k: str) -> tuple[Path, Path, Path]:
    base = folder() / k
    return base.with_suffix(".sock"), base.with_suffix(".lock"), base.with_suffix(".log")


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(message).encode()
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _receive(sock: socket.socket, *, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (and any file descriptors sent with it); None at end of stream."""
    fds: list[int] = []
    buf = b""
    while len(buf) < _HEADER.size or len(buf) < _HEADER.size + _HEADER.unpack_from(buf)[0]:
        if max_fds and not fds:
            chunk, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, max_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(1 << 16)
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        buf += chunk
    (n,) = _HEADER.unpack_from(buf)
    return json.loads(buf[_HEADER.size : _HEADER.size + n]), fds


def _connect(k: str, timeout: float | None = 2.0) -> socket.socket | None:
    try:
        path = _paths(k)[0]
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _started_at() -> float:
    from mcr_exit.timing import process_age

    return time.time() - (process_age() or 0.0)


# ----------------------------------------------------------------------------------------------- caller

def run(argv: list[str]) -> int | None:
    """Run the command line ``argv`` (without the program name) in this environment's warm process and
    return its exit status; None where none took it (the caller runs it itself)."""
    global _AT_START
    try:
        k = key()
        _AT_START = (k, dict(os.environ), [p or os.getcwd() for p in sys.path])
        sock = _connect(k) or _wait_for_starting(k)
    except OSError:
        return None
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    if sock is None:
        return None
    with sock:
        mask = os.umask(0)
        os.umask(mask)
        request = {"op": "run", "argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ),
                   "umask": mask, "path": [p or os.getcwd() for p in sys.path], "started": _started_at()}
        try:
            _send(sock, request, [0, 1, 2])
            sock.settimeout(None)
            reply, _ = _receive(sock)
        except OSError:
            return None
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        if not reply or "pid" not in reply:  # refused (e.g. shutting down): run cold
            return None
        group = int(reply["pid"])

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)

        for sig in _FORWARDED:
            signal.signal(sig, forward)
        try:
            done, _ = _receive(sock)
        except OSError:
            done = None
    if done is None:
        print("mcr-exit: the warm process went away before the command ended; its exit status is unknown",
              file=sys.stderr)
        return 1
    if done.get("signal"):
        sig = int(done["signal"])
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return int(done.get("status", 1))


def _starting(k: str) -> bool:
    """Whether a warm process for ``k`` holds its lock (it is importing, or serving)."""
    try:
        with open(_paths(k)[1], "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


def _wait_for_starting(k: str, timeout: float = STARTING_WAIT_S) -> socket.socket | None:
    """A warm process that is still importing is worth waiting for (a cold run would import as long):
    wait until it answers, or until it is gone."""
    deadline = time.monotonic() + timeout
    while _starting(k) and time.monotonic() < deadline:
        time.sleep(0.05)
        sock = _connect(k)
        if sock is not None:
            return sock
    return None


def start_later(modules: list[str] | None = None, *, wait: float = 0.0) -> bool:
    """Start the warm process of this environment (as it was when ``run`` was asked, if it was) in the
    background; it imports ``modules``, default: what this process has imported so far. False where one
    is already running. With ``wait``, wait up to that many seconds until it answers."""
    try:
        k, env, path = _AT_START or (key(), dict(os.environ), [p or os.getcwd() for p in sys.path])
        log_path = _paths(k)[2]
    except OSError:
        return False
    probe = _connect(k)
    if probe is not None:
        probe.close()
        return False
    if _starting(k):  # one is importing: do not start another
        return False
    names = modules if modules is not None else [m for m in list(sys.modules) if _preloadable(m)]
    spec = {"key": k, "path": path, "modules": names, "idle": float(env.get("MCR_EXIT_WARM_IDLE", DEFAULT_IDLE_S))}
    env = {name: v for name, v in env.items() if name not in _INTERNAL_ENV}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(), "-m",
                                 "mcr_exit.warm_process"],
                                stdin=subprocess.PIPE, stdout=log,
                                stderr=log, env=env, start_new_session=True, close_fds=True)
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        probe = _connect(k)
        if probe is not None:
            probe.close()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return True


def _preloadable(name: str) -> bool:
    top = name.split(".", 1)[0]
    return not (name in ("__main__", "__mp_main__", "sitecustomize", "usercustomize") or ".__main__" in name
                or top in ("tests", "conftest", "_pytest", "pytest", "pluggy") or name.startswith("mcr_exit.warm"))


def status() -> list[dict]:
    """Every warm process of this user that answers: pid, key, age, commands served."""
    out = []
    for path in sorted(folder().glob("*.sock")):
        sock = _connect(path.stem)
        if sock is None:
            continue
        with sock:
            try:
                _send(sock, {"op": "ping"})
                reply, _ = _receive(sock)
            except OSError:
                reply = None
        if reply:
            out.append(reply)
    return out


def stop(k: str | None = None) -> int:
    """Stop the warm process of key ``k`` (default: all of this user's); how many were told to stop."""
    n = 0
    for path in sorted(folder().glob("*.sock")) if k is None else [_paths(k)[0]]:
        sock = _connect(path.stem)
        if sock is None:
            continue
        with sock:
            with contextlib.suppress(OSError):
                _send(sock, {"op": "stop"})
                if _receive(sock)[0] is not None:
                    n += 1
    return n
