"""``serve``'s front door: the public HTTP and gRPC ports, forwarding to a Triton server on loopback ports only.

The ``tritonserver`` that PyTriton bundles has no request-size limit (no ``--http-max-input-size``, no
gRPC message-size option): it reads a whole HTTP body (of any size) or gRPC message (up to 2 GiB) and
copies it into the Python backend's and PyTriton's shared memory before a per-image cap can refuse
anything. So
``serve`` listens on the ports clients reach and forwards each request to that server:

- **Size, before the body is copied.** An HTTP request whose ``Content-Length`` is over
  ``max_request_bytes`` is answered ``413`` with Triton's JSON error (``{"error": ...}``) without
  forwarding a byte; its body is read and dropped (for at most :data:`LINGER_S`), so the client gets
  the answer rather than a reset. A body without a length (chunked) or compressed
  (``Content-Encoding``) is counted as it is forwarded, decompressed, and cut at the limit (also
  ``413``). A gRPC message over the limit is refused by gRPC itself from its length prefix:
  ``RESOURCE_EXHAUSTED``, "Received message larger than max (N vs. M)".
- **Many and stalled clients.** One event loop serves every connection, so a client that waits, sends
  nothing or drips bytes holds no thread and delays no one. A connection that sends no request for
  :data:`IDLE_TIMEOUT_S` is closed; a body that stops arriving for :data:`BODY_TIMEOUT_S` is answered
  ``408``. Bodies are streamed through in chunks, never held whole by the door.
- **Graceful stop.** :meth:`Door.stop` stops accepting (the ports close; a new gRPC call gets
  ``UNAVAILABLE``) and waits up to its timeout for the requests in flight to be answered, so stopping
  Triton afterwards cuts none.

Everything else passes unchanged: paths, headers (hop-by-hop ones aside), status codes, gRPC status
and details, Triton's access token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future

import aiohttp
import grpc
from aiohttp import web
from yarl import URL

log = logging.getLogger(__name__)

GRPC_MESSAGE_CAP = 2**31 - 1  # gRPC's own bound on one message (a signed 32-bit length)
IDLE_TIMEOUT_S = 30.0  # a connection without a request (none yet, or none since the last answer)
BODY_TIMEOUT_S = 30.0  # a request body that stops arriving
LINGER_S = 10.0  # how long a refused body is read and dropped, so its client reads the refusal
DRAIN_TIMEOUT_S = 30.0  # how long a stop waits for the requests in flight
GRPC_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"  # the one streaming call of Triton's API
# Headers of one connection, not of the request or response (RFC 9110, 7.6.1), and those the door rewrites.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect", "host"}
)
_GRPC_OWN_METADATA = frozenset({"user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-encoding"})


class _Refused(Exception):
    """A request the door answers itself: ``status`` and the client's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(size: int | None, limit: int) -> str:
    """The message for a request over the limit: ``size`` declared, or None when it was counted as it arrived."""
    what = "the request's body grew" if size is None else f"the request is {size} bytes,"
    return (
        f"{what} over this server's limit of {limit} bytes (serve --max-request-bytes): "
        "send fewer or smaller images per request, or start serve with a larger --max-request-bytes"
    )


class _OneLine(logging.LoggerAdapter):
    """aiohttp's server log: a client's malformed or abandoned request is one debug line, never a traceback."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        error = kwargs.pop("exc_info", None)
        kwargs.pop("stack_info", None)
        error = sys.exc_info()[1] if error is True else error
        if isinstance(error, BaseException):
            msg = f"{msg} ({type(error).__name__}: {error})"
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)


def _error(status: int, message: str, *, close: bool) -> web.Response:
    """Triton's JSON error answer; ``close``: the connection ends after it (no body is waited for)."""
    response = web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")
    if close:
        response.force_close()
    return response


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Door:
    """The public HTTP and gRPC listeners of ``serve``, forwarding to Triton at ``upstream_http``/``upstream_grpc``.

    ``upstream_*`` are ``"127.0.0.1:PORT"``; the timeouts default to :data:`IDLE_TIMEOUT_S` and
    :data:`BODY_TIMEOUT_S`. :meth:`start` binds both ports (``OSError`` when one cannot
    be) and serves them from an event loop in a thread of its own; :meth:`stop` drains and closes.
    """

    def __init__(
        self,
        *,
        host: str,
        http_port: int,
        grpc_port: int,
        upstream_http: str,
        upstream_grpc: str,
        max_request_bytes: int,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        if not 1 <= max_request_bytes <= GRPC_MESSAGE_CAP:
            raise ValueError(f"max_request_bytes must be in 1..{GRPC_MESSAGE_CAP}, got {max_request_bytes}")
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.upstream_http, self.upstream_grpc = upstream_http, upstream_grpc
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s, self.body_timeout_s = idle_timeout_s, body_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed: asyncio.Event | None = None
        self._draining = False
        self._busy: set[object] = set()

    # -- lifecycle (called from the serving thread) -------------------------------------------------

    def start(self) -> None:
        """Bind both ports and start serving; ``OSError`` if a port cannot be listened on."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),), name="serve-door", daemon=True)
        self._thread.start()
        ready.result()

    def stop(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop accepting, wait up to ``timeout`` s for the requests in flight to be answered, close."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop).result()
        self._thread.join()

    def __enter__(self) -> Door:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the event loop -----------------------------------------------------------------------------

    async def _main(self, ready: Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,  # Triton's compressed answers pass as they are
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        self._channel = grpc.aio.insecure_channel(
            self.upstream_grpc,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        self._web = web.Server(
            self._http,
            keepalive_timeout=self.idle_timeout_s,
            lingering_time=LINGER_S,
            access_log=None,
            logger=_OneLine(logging.getLogger(f"{__name__}.http"), {}),
        )
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a busy port is an error, not shared
                ("grpc.server_handshake_timeout_ms", int(self.idle_timeout_s * 1000)),
                ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1000)),
            ]
        )
        self._grpc.add_generic_rpc_handlers((_GrpcForward(self._channel),))
        self._listener = None
        try:
            self._listener = await self._loop.create_server(self._web, self.host, self.http_port, reuse_address=True)
            try:
                bound = self._grpc.add_insecure_port(_grpc_address(self.host, self.grpc_port))
            except RuntimeError as error:  # grpc raises for a port it cannot bind
                bound, reason = 0, str(error)
            else:
                reason = "address in use or not available"
            if not bound:
                raise OSError(f"cannot listen on {self.host}:{self.grpc_port} for gRPC ({reason})")
            await self._grpc.start()
        except BaseException as error:
            await self._close()
            ready.set_exception(error)
            return
        ready.set_result(None)
        await self._closed.wait()

    async def _drain(self, timeout: float) -> None:
        self._draining = True
        if self._listener is not None:
            self._listener.close()  # no new connections
        for connection in self._web.connections:
            if connection not in self._busy:
                connection.close()  # idle (kept alive between requests): nothing to finish
        if self._busy:
            log.info("finishing %d HTTP request(s) in flight (at most %g s)", len(self._busy), timeout)
        await asyncio.gather(self._web.shutdown(timeout), self._grpc.stop(timeout))
        await self._close()
        self._closed.set()

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._grpc.stop(0)
        await self._channel.close()
        await self._session.close()

    # -- HTTP -----------------------------------------------------------------------------------------

    async def _http(self, request: web.BaseRequest) -> web.StreamResponse:
        self._busy.add(request.protocol)  # the connections with a request in flight: a stop waits for them
        try:
            return await self._forward(request)
        finally:
            self._busy.discard(request.protocol)

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._draining:
            return _error(503, "the server is stopping: send the request again (to another server)", close=True)
        declared = request.content_length
        if declared is not None and declared > self.max_request_bytes:
            return _error(413, too_large(declared, self.max_request_bytes), close=False)
        if request.headers.get("Expect", "").lower() == "100-continue" and request.body_exists:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_BY_HOP}
        body = _Body(request, self.max_request_bytes, self.body_timeout_s) if request.body_exists else None
        if body is not None and (declared is None or "Content-Encoding" in headers):
            headers.pop("Content-Length", None)  # decompressed or chunked: forwarded chunked
            headers.pop("Content-Encoding", None)
        url = URL(f"http://{self.upstream_http}{request.raw_path}", encoded=True)
        response = None
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body.chunks() if body else None, allow_redirects=False
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except Exception as error:  # one answer (or one log line), never a traceback
            refused = body.refused if body is not None else None  # raised while sending: as is or wrapped
            if refused is not None:
                return _error(refused.status, refused.message, close=refused.status != 413)
            if response is not None and response.prepared:
                raise  # Triton's answer had begun: the connection is closed (aiohttp logs one debug line)
            if isinstance(error, aiohttp.ClientConnectorError):
                return _error(503, "the Triton server behind serve is not reachable (starting or stopping)", close=True)
            log.warning("forwarding %s %s failed: %s: %s", request.method, request.path, type(error).__name__, error)
            return _error(502, f"forwarding the request to Triton failed ({type(error).__name__})", close=True)


class _Body:
    """A request body forwarded chunk by chunk, counted against the limit (after decompression) and timed."""

    def __init__(self, request: web.BaseRequest, limit: int, timeout_s: float) -> None:
        self.request, self.limit, self.timeout_s = request, limit, timeout_s
        self.refused: _Refused | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            try:
                chunk = await asyncio.wait_for(self.request.content.readany(), self.timeout_s)
            except asyncio.TimeoutError:
                self.refused = _Refused(408, f"the request body stopped arriving for {self.timeout_s:g} s")
                raise self.refused from None
            except (OSError, aiohttp.ClientError, web.HTTPException) as error:  # the client left or sent garbage
                self.refused = _Refused(400, f"the request body could not be read ({type(error).__name__})")
                raise self.refused from None
            if not chunk:
                return
            received += len(chunk)
            if received > self.limit:
                self.refused = _Refused(413, too_large(None, self.limit))
                raise self.refused
            yield chunk


class _GrpcForward(grpc.GenericRpcHandler):
    """Every gRPC call of Triton's API forwarded as raw bytes (the message-size limit is the server's option)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method == GRPC_STREAM_METHOD:

            async def stream(requests, context):
                call = self.channel.stream_stream(method)(requests, metadata=_metadata(context))
                try:
                    async for response in call:
                        yield response
                    return
                except Exception as error:
                    code, reason = _status(error)
                await context.abort(code, reason)

            return grpc.stream_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context) -> bytes:
            call = self.channel.unary_unary(method)
            try:
                return await call(request, metadata=_metadata(context), timeout=context.time_remaining())
            except Exception as error:
                code, reason = _status(error)
            await context.abort(code, reason)

        return grpc.unary_unary_rpc_method_handler(unary)


def _metadata(context) -> tuple[tuple[str, str | bytes], ...]:
    """The client's metadata to pass on (the access token among it), without what gRPC sets itself."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(":") and key not in _GRPC_OWN_METADATA
    )


def _status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status to answer for a failed forward: Triton's own, or UNAVAILABLE with the reason."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    log.warning("forwarding a gRPC call failed: %s: %s", type(error).__name__, error)
    return grpc.StatusCode.UNAVAILABLE, f"forwarding the call to Triton failed ({type(error).__name__})"
