"""A request-size limit in front of the web demo: a body over the limit is refused before it is read.

Gradio caps each uploaded file (``max_file_size``) but reads any other body whole (its JSON API
parses ``/call/...`` and ``/queue/join`` bodies of any size), so the limit is checked here, for
every request, by this ASGI middleware.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestSizeLimit:
    """ASGI middleware refusing (413) any HTTP request whose body is over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before any of the body is read; a body
    without one (chunked) is refused as soon as what arrived passes the limit. The app then sees the
    client as gone, and what it sends afterwards is dropped: no request costs more than the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        refused = started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the refusal was sent (or the response had begun): the app's answer is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise  # the app's own failure; one from the cut-off body is expected and already answered

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"Request body too large: at most {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None without a valid one (the server refuses malformed ones itself)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
