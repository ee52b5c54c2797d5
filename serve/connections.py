"""Bounds on HTTP connections that uvicorn lacks: how many may be open, and how long one may take to send a request
head. Beyond max_connections a new connection is answered 503 and closed as it opens; one whose request head has
not come whole within head_timeout_s is answered 408 and closed. (Idle keep-alive connections close after
uvicorn's timeout_keep_alive; a body that comes too slowly is the routes' own deadline, serve/app.py.)
"""

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the server's one-line JSON error, closing the connection."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def bounded_protocol(max_connections: int, head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with these bounds."""

    class BoundedH11Protocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(
                    answer(
                        503,
                        "Service Unavailable",
                        f"the server holds its limit of {max_connections} open connections; retry later",
                    )
                )
                transport.close()
                return
            self.head_deadline = self.loop.call_later(head_timeout_s, self.head_late)

        def head_late(self) -> None:
            """No request head has come whole since the connection opened, or since its last answer."""
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            self.transport.write(
                answer(408, "Request Timeout", f"no whole request head within {head_timeout_s:g} s; send it at once")
            )
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            if not self.transport.is_closing():
                self.head_deadline = self.loop.call_later(head_timeout_s, self.head_late)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

    return BoundedH11Protocol
