"""The warm process itself (``python -m mcr_exit.warm_process``, started by ``mcr_exit.warm.start_later``,
its spec on stdin): import, then fork a child per command that the socket brings, and report each child's
exit status back to its caller. The protocol, the key and the caller's side are in ``mcr_exit.warm``."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from mcr_exit.warm import _FORWARDED, ALWAYS_MODULES, DEFAULT_IDLE_S, DEFAULT_MODULES, _paths, _receive, _send


def _cuda_touched() -> str | None:
    """Why a forked child could not use CUDA, or None: torch initialized it, or the driver runs threads."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_initialized():
        return "torch initialized CUDA"
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip().startswith("cuda"):
                    return "the CUDA driver was initialized"
    return None


def _child(request: dict, fds: list[int], closing: list) -> None:
    """In the forked child: become the caller's process and run its command. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        for obj in closing:  # the warm process's sockets, selector, lock and other children's handles
            with contextlib.suppress(Exception):
                os.close(obj) if isinstance(obj, int) else obj.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in _FORWARDED + (signal.SIGCHLD,):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["MCR_EXIT_WARM_CHILD"] = "1"
        os.environ["MCR_EXIT_STARTED_AT"] = repr(float(request["started"]))
        sys.path[:] = request["path"]
        sys.argv[:] = request["argv"]
        _reopen_std_streams()
        from mcr_exit.cli import main

        main()  # exits through mcr_exit.cli._exit (os._exit after the atexit handlers)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback, as a cold process would print it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reopen_std_streams() -> None:
    """Text streams over the caller's descriptors, buffered as a new process would buffer them."""
    import io

    encoding = os.environ.get("PYTHONIOENCODING", "").split(":")[0] or None
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for fd, name, mode in ((0, "stdin", "rb"), (1, "stdout", "wb"), (2, "stderr", "wb")):
        try:
            raw = open(fd, mode, buffering=0 if (unbuffered and fd) else -1, closefd=False)
        except OSError:
            continue
        tty = os.isatty(fd)
        stream = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace" if fd == 2 else None,
                                  line_buffering=tty or fd == 2, write_through=unbuffered and fd != 0)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def serve(spec: dict) -> int:
    """The warm process's main loop (``python -m mcr_exit.warm_process``, ``spec`` on stdin)."""
    k = spec["key"]
    sock_path, lock_path, _ = _paths(k)
    lock = open(lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another one is starting or running
    os.chdir("/")
    sys.path[:] = spec["path"]
    t0 = time.perf_counter()
    failed = []
    import warnings

    # Python 3.12+ warns at every fork of a process with threads; here they are the libraries' own
    # (OpenBLAS, jemalloc), which handle fork, as for DataLoader workers or a preloading gunicorn.
    warnings.filterwarnings("ignore", message=r"This process \(pid=\d+\) is multi-threaded",
                            category=DeprecationWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mcr_exit.cli  # noqa: F401 - what every command needs first
        os.environ.setdefault("MPLBACKEND", "Agg")  # read at import; the figure processes draw with Agg
        for name in [*(spec.get("modules") or DEFAULT_MODULES), *ALWAYS_MODULES]:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - a module that does not import is left to the command
                failed.append(name)
    why = _cuda_touched()
    print(f"[{time.strftime('%H:%M:%S')}] pid {os.getpid()}: imported {len(sys.modules)} modules in "
          f"{time.perf_counter() - t0:.1f} s ({len(failed)} did not import)", flush=True)
    if why:
        print(f"not serving: {why} while importing; commands run cold", flush=True)
        return 1
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    listener.listen(64)
    lock_stat = os.stat(lock_path)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, caller's connection)
    idle_s, last, served, stopping = float(spec.get("idle", DEFAULT_IDLE_S)), time.monotonic(), 0, False
    born = time.time()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        while True:
            if not children and (stopping or time.monotonic() - last > idle_s or not _still_ours(sock_path, lock_path,
                                                                                                  lock_stat)):
                return 0
            for sel_key, _ in sel.select(timeout=min(idle_s, 30.0)):
                if sel_key.data is None:
                    conn, _ = listener.accept()
                    conn.settimeout(5.0)
                    try:
                        request, fds = _receive(conn, max_fds=3)
                        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))[1]
                    except OSError:
                        conn.close()
                        continue
                    if request is None or uid != os.getuid():
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    op = request.get("op")
                    if op == "ping":
                        _reply(conn, {"pid": os.getpid(), "key": k, "age_s": round(time.time() - born, 1),
                                      "served": served, "running": len(children), "modules": len(sys.modules)})
                    elif op == "stop":
                        stopping = True
                        _reply(conn, {"stopping": True})
                    elif op != "run" or stopping or len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        _reply(conn, {"refused": "stopping" if stopping else "bad request"})
                    else:
                        last = time.monotonic()
                        pid = os.fork()
                        if pid == 0:
                            _child(request, fds, [listener, sel, lock, conn, *children,
                                                  *[c for _, c in children.values()]])
                        with contextlib.suppress(OSError):  # also here, so the group exists before the caller
                            os.setpgid(pid, pid)              # learns its id (as shells do)
                        for fd in fds:
                            os.close(fd)
                        served += 1
                        conn.settimeout(None)
                        pidfd = os.pidfd_open(pid)
                        children[pidfd] = (pid, conn)
                        sel.register(pidfd, selectors.EVENT_READ, "child")
                        sel.register(conn, selectors.EVENT_READ, pidfd)
                        with contextlib.suppress(OSError):
                            _send(conn, {"pid": pid})
                elif sel_key.data == "child":
                    pidfd = sel_key.fd
                    pid, conn = children.pop(pidfd)
                    _, raw = os.waitpid(pid, 0)
                    done = {"signal": os.WTERMSIG(raw)} if os.WIFSIGNALED(raw) else {"status": os.waitstatus_to_exitcode(raw)}
                    sel.unregister(pidfd)
                    os.close(pidfd)
                    with contextlib.suppress(KeyError):  # already unregistered if the caller went away first
                        sel.unregister(conn)
                    with contextlib.suppress(OSError):
                        _send(conn, done)
                    conn.close()
                    last = time.monotonic()
                else:  # the caller's connection: readable only when the caller went away
                    pidfd = sel_key.data
                    if pidfd not in children:  # its child ended earlier in this round
                        continue
                    pid, conn = children[pidfd]
                    sel.unregister(conn)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGTERM)
    finally:
        with contextlib.suppress(OSError):
            if _still_ours(sock_path, lock_path, lock_stat):
                sock_path.unlink()
        listener.close()


def _exit_on_signal(signum, _frame):
    raise SystemExit(0)


def _reply(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        _send(conn, message)
    conn.close()


def _still_ours(sock_path: Path, lock_path: Path, lock_stat: os.stat_result) -> bool:
    try:
        st = os.stat(lock_path)
    except OSError:
        return False
    return sock_path.exists() and (st.st_ino, st.st_dev) == (lock_stat.st_ino, lock_stat.st_dev)


if __name__ == "__main__":
    from mcr_exit.bytecode import keep_bytecode

    keep_bytecode()
    sys.exit(serve(json.loads(sys.stdin.read())))
