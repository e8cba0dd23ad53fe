"""`mcr-exit serve`'s checks that need no model, run first: a bad or busy address fails in a second,
with one line, not after the model has loaded (or, for a port beyond 65535, with a C++ abort)."""

from __future__ import annotations

import socket

from mcr_exit.errors import ConfigError


def check_listen_address(host: str, port: int) -> None:
    """One-line ConfigError unless ``host:port`` is a valid address this process can listen on now.

    The test socket is bound with SO_REUSEADDR, as uvicorn binds its own, so a port that only holds
    connections in TIME_WAIT passes; one that another process listens on does not.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host}: not an address this machine can listen on ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def server_stack() -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn's ``auto`` picks in this environment: uvloop and httptools
    where installed (the ``serve`` extra installs both), else asyncio's loop and the pure-Python h11."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def stack_note() -> str | None:
    """A line for the operator when the server would run on the slower stack, else None."""
    import sys

    loop, http = server_stack()
    missing = [name for name, have in (("uvloop", loop == "uvloop" or sys.platform == "win32"),
                                       ("httptools", http == "httptools")) if not have]
    if not missing:
        return None
    return (f"note: {' and '.join(missing)} not installed, so the server runs {loop}'s event loop and the {http} "
            f"parser (pip install {' '.join(missing)}, or the serve extra; on an H200 they made embeddings "
            "through HTTP 1.4x and 64 streams 1.25x faster)")
