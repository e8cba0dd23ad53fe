"""SIGTERM as an exception while a command holds something to clean up (an MLflow run, a staging folder).

``docker stop``, Kubernetes and ``timeout`` send SIGTERM. By default it ends the process on the spot and
leaves the MLflow run RUNNING and the staging folder behind. Inside ``sigterm_raises()`` it raises
``Terminated`` instead, so the run ends KILLED and the staging folder is removed on the way out; the
CLI then exits with status 143 (128 + SIGTERM). Outside such a block (model loading, ``serve``, which
has its own handling) SIGTERM keeps its default action.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt: no ``except Exception`` eats it)."""


def _raise_terminated(signum, frame):
    # A second SIGTERM during the clean-up must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated``. Nested blocks share the outer one's handler."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
