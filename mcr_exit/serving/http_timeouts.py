"""A read deadline for uvicorn's HTTP protocols: slow or half-sent requests are closed.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``, after a response) but has no
header or body timeout: a client that connects and sends nothing, or half a request line, or a
Content-Length body that never arrives, holds its connection forever. The protocol classes below add
one deadline per request: from the connection's start (or the request's first byte, on a kept-alive
connection) until the request (headers and body) is complete. Past it the connection is closed; an
app still reading that body sees ``http.disconnect``. A request's heads are also capped in size.

This works at the transport level (asyncio protocols), not in the ASGI app, so it also covers requests
that never reach the app. ``server_config`` builds a ``uvicorn.Config`` with it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mcr_exit.serving")
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; llhttp itself sets no limit


class _ReadDeadline:
    """Mixin for a uvicorn HTTP protocol: ``read_timeout`` seconds to receive each request whole."""

    read_timeout: float = 30.0

    def _arm(self) -> None:
        if getattr(self, "_deadline", None) is None and self.read_timeout > 0:
            self._deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        handle, self._deadline = getattr(self, "_deadline", None), None
        if handle is not None:
            handle.cancel()

    def _read_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request was not received within %g s", self.read_timeout)
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # a client that connects and sends nothing gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def _httptools_class():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DeadlineHttpToolsProtocol(_ReadDeadline, HttpToolsProtocol):
        _head_bytes = 0
        _in_head = True
        _tail = b""  # the last bytes of the head so far: its end (CRLF CRLF) may straddle two reads

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                # only the head counts: a slow server reads the head and a large body in one piece
                seen = self._tail + data
                end = seen.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = seen[-3:]
                if self._head_bytes > MAX_HEAD_BYTES:
                    self.send_400_response("Request headers too large.")
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_head, self._head_bytes, self._tail = True, 0, b""  # next: the next request's head
            super().on_message_complete()

    return DeadlineHttpToolsProtocol


def _h11_class():
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(_ReadDeadline, H11Protocol):
        def _follow(self) -> None:
            conn = getattr(self, "conn", None)
            if conn is None or self.transport.is_closing():
                return
            if conn.their_state is h11.DONE or (conn.their_state is h11.IDLE and not conn.trailing_data[0]):
                self._disarm()  # the request is whole (or nothing of the next one has come)
            else:
                self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # the next cycle starts on what is buffered: maybe half a request
            self._follow()

    return DeadlineH11Protocol


def protocol_class(http: str, read_timeout: float):
    """uvicorn's ``http`` protocol ("auto", "httptools" or "h11") with the read deadline."""
    if http == "auto":
        import importlib.util

        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    base = {"httptools": _httptools_class, "h11": _h11_class}[http]()
    return type(base.__name__, (base,), {"read_timeout": float(read_timeout)})


def server_config(app, *, host: str, port: int, read_timeout: float = 30.0, http: str = "auto", **kwargs):
    """A ``uvicorn.Config`` whose connections must deliver each request within ``read_timeout`` s (0: off)."""
    import uvicorn

    if read_timeout and read_timeout > 0:
        kwargs["http"] = protocol_class(http, read_timeout)
    else:
        kwargs["http"] = http
    return uvicorn.Config(app, host=host, port=port, **kwargs)
