"""Clients that send a request too slowly (slow loris) are cut off, not waited for.

uvicorn waits forever for a request's headers once a first byte arrived (its
keep-alive timeout covers only an idle connection), and a route waits forever
for a body that never ends. Each costs a connection and a coroutine, and enough
of them exhaust the file descriptors. Here the headers must arrive within
``--request-timeout`` seconds of the connection (or of the previous answer on a
kept-alive one): else a 408 and the connection is closed. The body has the same
time, checked where it is read (``server/errors.py:read_model``).
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sgljax.server.errors import error_body


def _timeout_answer(seconds: float) -> bytes:
    body = json.dumps(error_body(f"the request's headers did not arrive within {seconds:g} s",
                                 code="request_timeout")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's headers."""

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """A deadline runs while the next request's headers are awaited."""
            waiting = (self.conn.their_state is h11.IDLE and self.cycle is None
                       or self.cycle is not None and self.cycle.response_complete
                       and self.conn.their_state is h11.IDLE)
            if waiting and not self.transport.is_closing():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(seconds, self._too_slow)
            else:
                self._cancel()

        def _cancel(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self.transport.write(_timeout_answer(seconds))
            self.transport.close()

    return HeaderDeadlineProtocol
