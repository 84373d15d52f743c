"""A raw-socket HTTP server on 127.0.0.1 that misbehaves on purpose.

``http.server`` always sends well-formed replies; the faults users meet are not. Each
:class:`RawServer` answers every connection with one *behaviour*, a function of the
accepted socket and a stop event (set when the server closes, so stalled handlers end).
The factories below build the behaviours the hardening tests need: short bodies,
stalls, drips, huge bodies with or without ``Content-Length``, HTML error pages.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

Behaviour = Callable[[socket.socket, threading.Event], None]


def _read_request(conn: socket.socket) -> bytes:
    """Read the request head (up to the blank line) so the client is not reset mid-send."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply(
    body: bytes,
    *,
    status: str = "200 OK",
    content_type: str = "application/octet-stream",
    content_length: int | None | bool = True,
    headers: dict[str, str] | None = None,
) -> Behaviour:
    """A complete reply. ``content_length``: True = the true length, False = none (close ends
    the body), an int = that (possibly false) length."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        head = {"Content-Type": content_type, **(headers or {})}
        if content_length is True:
            head["Content-Length"] = str(len(body))
        elif content_length is not False and content_length is not None:
            head["Content-Length"] = str(content_length)
        conn.sendall(_head(status, head) + body)

    return behaviour


def stall(*, send_head: bool = False) -> Behaviour:
    """Accept and never answer (or send the head and then no body) until the server stops."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        if send_head:
            conn.sendall(_head("200 OK", {"Content-Type": "image/png", "Content-Length": "1000"}))
        stop.wait()

    return behaviour


def drip(*, interval_s: float = 0.05, in_head: bool = False, content_length: int | None = 100_000) -> Behaviour:
    """One byte every ``interval_s``, forever: in the body, or (``in_head``) in a header line."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        if in_head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            headers = {"Content-Type": "image/png"}
            if content_length is not None:
                headers["Content-Length"] = str(content_length)
            conn.sendall(_head("200 OK", headers))
        while not stop.wait(interval_s):
            conn.sendall(b"a")

    return behaviour


def endless(*, content_length: int | None = None, chunk: bytes = b"\0" * 65536) -> Behaviour:
    """A body that never ends (or claims ``content_length``): sent as fast as the client reads."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        headers = {"Content-Type": "image/png"}
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        conn.sendall(_head("200 OK", headers))
        while not stop.is_set():
            conn.sendall(chunk)

    return behaviour


NOT_FOUND = reply(b"", status="404 Not Found", content_type="text/plain")


class RawServer:
    """``with RawServer(behaviour) as server: fetch(server.url + "/x.jpg")``.

    ``behaviour`` answers every request, or a dict maps request paths to behaviours (404
    for others). ``paths`` lists the requested paths, in order.
    """

    def __init__(self, behaviour: Behaviour | dict[str, Behaviour], *, accept: bool = True) -> None:
        self.behaviour = behaviour
        self.accept = accept
        self.connections = 0
        self.paths: list[str] = []
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        # With accept=False the kernel still completes the TCP handshake (backlog): a
        # server that "accepts and never answers" from the client's point of view.
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, conn: socket.socket) -> None:
        try:
            request_line = _read_request(conn).split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = request_line[1] if len(request_line) > 1 else ""
            self.paths.append(path)
            behaviour = self.behaviour
            if isinstance(behaviour, dict):
                behaviour = behaviour.get(path, NOT_FOUND)
            behaviour(conn, self.stop)
        except OSError:
            pass  # the client gave up: that is what these tests provoke
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def __enter__(self) -> RawServer:
        if self.accept:
            thread = threading.Thread(target=self._serve, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.sock.close()
