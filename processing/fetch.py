"""One bounded, streaming HTTP(S) GET for every download: checkpoints, images, the web demo's URLs.

``with stream(url, ...) as body: for chunk in body: ...`` lets the caller put the bytes where it
wants (the weights downloader: a file, a hash and a progress bar); :func:`fetch_bytes` collects
them in memory under a cap. Every fetch has:

- connect and read timeouts and a total deadline. A watchdog shuts the fetch's sockets when the
  deadline passes, so a server that drips bytes (in the headers or in the body) is abandoned on time;
- an optional byte cap, checked against ``Content-Length`` and again while streaming (decoded bytes,
  so a gzip bomb stops at the cap too); a body shorter than its ``Content-Length`` is an error;
- redirects followed by hand (at most ``max_redirects``), each hop checked like the first;
- host names resolved here, with a timeout, and the connection made to a resolved address (the name
  kept for the Host header, TLS SNI and the certificate check);
- an optional address policy ``allow``, for URLs typed by strangers (the web demo passes
  :func:`is_public_address`). Every address of every hop must pass it before anything connects, and
  the connection goes to a checked address, so a second DNS answer cannot swap in another; proxies
  are ignored, since a proxy would connect on our behalf to an address never checked; URLs with
  credentials or over :data:`MAX_URL_CHARS` characters are refused.

Each caller passes its own timeouts and cap (weights: 10 s / 60 s / 3600 s, no cap; images:
5 s / 10 s / 30 s and the image byte cap).

Without a policy the standard proxy variables (``http_proxy``, ``https_proxy``, ``all_proxy``,
``no_proxy``) are honoured as :mod:`urllib.request` reads them; credentials in a URL are sent as
HTTP Basic auth. Errors are :class:`FetchError` (a ``ValueError`` with ``url`` and ``reason``),
:class:`URLRefusedError` (refused before connecting) and :class:`DeadlineError`; no message ever
shows a user name or password from a URL (:func:`redact`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urljoin, urlsplit

import certifi
import urllib3
import validators
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import make_headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

CA_BUNDLE_ENVS = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
MAX_REDIRECTS = 5
MAX_URL_CHARS = 2048
CHUNK = 64 * 1024
USER_AGENT = "resnext-hub"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Greedy up to the last "@" of the authority, as URL parsers split it.
_CREDENTIALS = re.compile(r"(?<=://)[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub("***@", text)


class FetchError(ValueError):
    """A URL gave no body (HTTP error, timeout, over the cap, cut short). ``url`` and ``reason`` are redacted."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact(url)
        self.reason = redact(reason)
        super().__init__(f"{self.url}: {self.reason}")


class URLRefusedError(FetchError):
    """The URL, or an address it resolves or redirects to, is not allowed; nothing connected to it."""


class DeadlineError(FetchError):
    """The fetch's total deadline passed (a slow or dripping server)."""


def is_url(text: object) -> bool:
    """True for a string that is a well-formed absolute http(s) URL; False for paths and anything else."""
    try:
        scheme = urlsplit(text).scheme.lower() if isinstance(text, str) else ""
    except ValueError:
        return False
    # strict_query=False: "photo.jpg?v" (a query without "=") is common in real image links.
    return scheme in ("http", "https") and bool(validators.url(text, simple_host=True, strict_query=False))


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; False for anything local, private or special.

    IPv4 embedded in IPv6 (mapped, 6to4, NAT64, Teredo) must be public too.
    """
    embedded = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.append(ip.teredo[1])
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(not is_public_address(inner) for inner in embedded):
        return False
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
    special = special or ip.is_reserved or ip.is_unspecified
    return ip.is_global and not special


class _Watchdog:
    """Shuts down every socket of one fetch when its deadline passes, which unblocks any read."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _WatchedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, watchdog: _Watchdog, **kwargs: Any) -> None:
        self._watchdog = watchdog
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._watchdog.watch(sock)  # before any TLS handshake, so a stalled one is cut off too
        return sock


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


def _watch(pool: urllib3.HTTPConnectionPool, watchdog: _Watchdog) -> urllib3.HTTPConnectionPool:
    secure = isinstance(pool, urllib3.HTTPSConnectionPool)
    pool.ConnectionCls = _WatchedHTTPSConnection if secure else _WatchedHTTPConnection
    pool.conn_kw["watchdog"] = watchdog
    return pool


class _WatchedProxyManager(urllib3.ProxyManager):
    """A proxy manager whose pools register their sockets with one fetch's watchdog."""

    def __init__(self, proxy_url: str, watchdog: _Watchdog, **kwargs: Any) -> None:
        self._watchdog = watchdog
        super().__init__(proxy_url, **kwargs)

    def _new_pool(self, scheme: str, host: str, port: int, request_context: dict | None = None) -> Any:
        return _watch(super()._new_pool(scheme, host, port, request_context), self._watchdog)


class _Hop(NamedTuple):
    """One request's target, from a checked URL."""

    scheme: str
    host: str  # ASCII (IDNA), without brackets
    port: int
    target: str  # path and query, percent-encoded
    host_header: str
    auth: str | None  # "user:password" from the URL


def _split(url: str, guarded: bool) -> _Hop:
    """The parts of an http(s) URL; refuses anything else (and, ``guarded``, credentials and long URLs)."""
    if guarded and len(url) > MAX_URL_CHARS:
        raise URLRefusedError(url, f"the URL is {len(url)} characters long; at most {MAX_URL_CHARS} are accepted")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname or ""
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as error:
        raise URLRefusedError(url, f"not a valid URL ({error})") from error
    if parts.scheme not in ("http", "https"):
        raise URLRefusedError(url, f"only http:// and https:// URLs are accepted, got {parts.scheme or 'no'} scheme")
    if not host:
        raise URLRefusedError(url, "the URL has no host name")
    auth = None
    if parts.username is not None or parts.password is not None:
        if guarded:
            raise URLRefusedError(url, "URLs with a user name or password are not accepted")
        auth = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    default_port = 443 if parts.scheme == "https" else 80
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port in (None, default_port) else f"{bracketed}:{port}"
    # Percent-encode what may not appear raw in a request line (spaces, non-ASCII), as browsers do.
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="!#$%&'()*+,/:;=?@[]~")
    return _Hop(parts.scheme, host, port or default_port, target, host_header, auth)


def _getaddrinfo(host: str, port: int, timeout_s: float) -> list[tuple]:
    """``socket.getaddrinfo`` abandoned after ``timeout_s``: it has no timeout of its own."""
    outcome: list = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except (OSError, UnicodeError) as error:
            outcome.append(error)

    # A daemon thread: a lookup stuck past its timeout is left behind without holding up exit.
    thread = threading.Thread(target=lookup, name="fetch-dns", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _resolve(url: str, hop: _Hop, timeout_s: float) -> list[IPAddress]:
    """Every address of ``hop.host``, looked up within ``timeout_s``."""
    try:
        infos = _getaddrinfo(hop.host, hop.port, timeout_s)
    except TimeoutError as error:
        raise FetchError(url, f"looking up {hop.host!r} took over {timeout_s:g} s") from error
    except (OSError, UnicodeError) as error:
        raise FetchError(url, f"the host name {hop.host!r} could not be resolved") from error
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise FetchError(url, f"the host name {hop.host!r} has no address")
    return addresses


def _check(url: str, hop: _Hop, addresses: list[IPAddress], allow: AddressPolicy) -> None:
    refused = [str(a) for a in addresses if not allow(a)]
    if refused:
        literal = [str(a) for a in addresses] == [hop.host]
        what = f"{hop.host} is" if literal else f"{hop.host} resolves to {', '.join(refused)}, which is"
        raise URLRefusedError(
            url, f"{what} a local, private or reserved address; only public internet addresses are allowed"
        )


def _proxy(hop: _Hop) -> str | None:
    """The proxy URL for ``hop`` from the environment, or None (none set, or ``no_proxy`` matches)."""
    # urllib.request reads the variables curl and requests honour: http_proxy, https_proxy,
    # all_proxy and no_proxy, in either case (and the system settings on macOS and Windows).
    proxies = urllib.request.getproxies()
    proxy = proxies.get(hop.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(hop.host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _size(count: int) -> str:
    return f"{count // 1024} KiB" if count >= 1024 and count % 1024 == 0 else f"{count} bytes"


def _declared_length(response: urllib3.BaseHTTPResponse) -> int | None:
    """Content-Length as bytes on the wire; None when absent, malformed or overridden by chunking."""
    declared = response.headers.get("Content-Length", "").strip()
    return int(declared) if declared.isdigit() and not response.chunked else None


class Body:
    """An open response: iterate it once for the decoded chunks (each checked against the cap and the deadline).

    ``url``: after redirects; ``headers``; ``length``: its Content-Length (bytes on the wire), or None.
    """

    def __init__(self, url: str, headers: Mapping[str, str], length: int | None, chunks: Iterator[bytes]) -> None:
        self.url = url
        self.headers = headers
        self.length = length
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


class _Fetch:
    """One fetch's settings, deadline and watchdog, shared by its hops and its body."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        deadline_s: float,
        max_bytes: int | None,
        max_redirects: int,
        allow: AddressPolicy | None,
        headers: Mapping[str, str] | None,
        expected: str | None,
    ) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allow = allow
        self.headers = dict(headers or {})
        self.expected = expected
        self.watchdog = _Watchdog(deadline_s)

    def _late(self) -> bool:
        return self.watchdog.expired or time.monotonic() >= self.deadline

    def _deadline_error(self, url: str) -> DeadlineError:
        why = f"gave up at the {self.deadline_s:g} s deadline; the server is too slow or drips bytes"
        return DeadlineError(url, f"took too long ({why})")

    def _failure(self, url: str, hop: _Hop, error: BaseException) -> FetchError:
        """The FetchError for a network error (the deadline, when that is what cut it off)."""
        if self._late():
            return self._deadline_error(url)
        if isinstance(error, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass: test it first
            return FetchError(url, f"could not connect to {hop.host_header} (connection refused or unreachable)")
        if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
            return FetchError(url, f"timed out connecting to {hop.host_header}")
        if isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return FetchError(url, f"timed out waiting for {hop.host_header} to send")
        if isinstance(error, urllib3.exceptions.ProxyError):
            return FetchError(url, f"the proxy failed: {error}")
        if isinstance(error, urllib3.exceptions.SSLError):
            return FetchError(url, f"the TLS connection failed: {error}")
        return FetchError(url, f"the transfer failed: {error}")

    def open(self) -> tuple[urllib3.BaseHTTPResponse, Callable[[], None], str, _Hop]:
        """Follow redirects to a 200 reply: (response with its body unread, its closer, its URL, its hop)."""
        url = self.url
        for _ in range(self.max_redirects + 1):
            hop = _split(url, guarded=self.allow is not None)
            try:
                response, close = self._request(url, hop)
            except FetchError:
                raise
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise self._failure(url, hop, error) from error
            try:
                if self.watchdog.expired:  # headers cut off by it can look complete
                    raise self._deadline_error(url)
                if response.status not in _REDIRECTS:
                    self._check_reply(url, response)
                    return response, close, url, hop
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(url, f"HTTP {response.status} redirect without a Location header")
            except BaseException:
                response.close()
                close()
                raise
            response.close()
            close()
            # A relative Location keeps the URL's credentials (same host); an absolute one carries its own.
            url = urljoin(url, location)
        plural = "" if self.max_redirects == 1 else "s"
        raise FetchError(self.url, f"more than {self.max_redirects} redirect{plural}")

    def _timeout(self, url: str) -> urllib3.Timeout:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._deadline_error(url)
        return urllib3.Timeout(connect=min(self.connect_timeout_s, remaining), read=min(self.read_timeout_s, remaining))

    def _request(self, url: str, hop: _Hop) -> tuple[urllib3.BaseHTTPResponse, Callable[[], None]]:
        """One GET for ``hop`` (body unread), and what closes its connections."""
        timeout = self._timeout(url)
        headers = {"Host": hop.host_header, "User-Agent": USER_AGENT, **self.headers}
        if hop.auth is not None:
            headers.update(make_headers(basic_auth=hop.auth))
        options = {"headers": headers, "redirect": False, "retries": False, "preload_content": False}
        proxy = None if self.allow is not None else _proxy(hop)
        if proxy is not None:
            proxy_parts = urlsplit(proxy)
            proxy_headers = None
            if proxy_parts.username is not None:
                credentials = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}"
                proxy_headers = make_headers(proxy_basic_auth=credentials)
            manager = _WatchedProxyManager(
                proxy, self.watchdog, proxy_headers=proxy_headers, ca_certs=self._ca_bundle()
            )
            try:
                absolute = f"{hop.scheme}://{hop.host_header}{hop.target}"
                return manager.urlopen("GET", absolute, timeout=timeout, **options), manager.clear
            except BaseException:
                manager.clear()
                raise
        addresses = _resolve(url, hop, timeout.connect_timeout)
        if self.allow is not None:
            _check(url, hop, addresses, self.allow)
        for address in addresses[:-1]:
            try:
                return self._send(hop, address, timeout, options)
            except urllib3.exceptions.NewConnectionError:
                continue  # refused or unreachable there: try the host's next address
        return self._send(hop, addresses[-1], timeout, options)

    def _ca_bundle(self) -> str:
        """Certificates to trust: a corporate bundle named as requests/OpenSSL users do, else certifi's.

        Under an address policy (a public web app) only certifi's: visitors' requests must not
        depend on the operator's environment.
        """
        if self.allow is None:
            for name in CA_BUNDLE_ENVS:
                if os.environ.get(name):
                    return os.environ[name]
        return certifi.where()

    def _send(
        self, hop: _Hop, address: IPAddress, timeout: urllib3.Timeout, options: dict[str, Any]
    ) -> tuple[urllib3.BaseHTTPResponse, Callable[[], None]]:
        """GET from ``address`` itself (already checked), with the host's name for Host, SNI and the certificate."""
        pool_options = {"port": hop.port, "timeout": timeout, "retries": False, "maxsize": 1}
        if hop.scheme == "https":
            pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
                str(address),
                server_hostname=hop.host,
                assert_hostname=hop.host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=self._ca_bundle(),
                **pool_options,
            )
        else:
            pool = urllib3.HTTPConnectionPool(str(address), **pool_options)
        _watch(pool, self.watchdog)
        try:
            return pool.urlopen("GET", hop.target, assert_same_host=False, **options), pool.close
        except BaseException:
            pool.close()
            raise

    def _check_reply(self, url: str, response: urllib3.BaseHTTPResponse) -> None:
        status = response.status
        if status >= 400:
            raise FetchError(url, f"the server answered HTTP {status} {response.reason or ''}".rstrip())
        if status != 200:
            raise FetchError(url, f"the server answered HTTP {status}, expected 200")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if self.expected and content_type.startswith("text/"):
            raise FetchError(url, f"the URL gives a {content_type} page, not {self.expected} (link to the file itself)")
        declared = _declared_length(response)
        if self.max_bytes is not None and declared is not None and declared > self.max_bytes:
            cap = f"at most {_size(self.max_bytes)} are accepted"
            raise FetchError(url, f"the body of {declared} bytes is over the cap ({cap})")

    def chunks(self, response: urllib3.BaseHTTPResponse, url: str, hop: _Hop) -> Iterator[bytes]:
        """The decoded body, a read at a time, within the cap and the deadline; refuses a short body."""
        declared = _declared_length(response)
        received = 0
        try:
            # read1: whatever has arrived (up to CHUNK), so the cap is checked as bytes come in.
            while chunk := response.read1(CHUNK, decode_content=True):
                received += len(chunk)
                if self.max_bytes is not None and received > self.max_bytes:
                    raise FetchError(url, f"the body grew over {_size(self.max_bytes)}, the cap, while still streaming")
                if self.watchdog.expired:
                    raise self._deadline_error(url)
                yield chunk
        except FetchError:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if not self._late() and "IncompleteRead" in str(error):
                raise FetchError(url, _cut_short(response.tell(), declared)) from error
            raise self._failure(url, hop, error) from error
        if self.watchdog.expired:  # its shutdown looks like the end of the body
            raise self._deadline_error(url)
        if declared is not None and response.tell() < declared:
            raise FetchError(url, _cut_short(response.tell(), declared))


def _cut_short(received: int, declared: int | None) -> str:
    return f"the body was cut short (IncompleteRead: {received} of {declared} bytes)"


@contextmanager
def stream(
    url: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    deadline_s: float,
    max_bytes: int | None = None,
    max_redirects: int = MAX_REDIRECTS,
    allow: AddressPolicy | None = None,
    headers: Mapping[str, str] | None = None,
    expected: str | None = None,
) -> Iterator[Body]:
    """GET ``url`` and yield its :class:`Body`, to be iterated inside the ``with`` block.

    The timeouts bound each connect and each wait for bytes; ``deadline_s`` bounds everything from
    the first lookup to the last byte. ``max_bytes``: cap on the decoded body (None: no cap).
    ``allow``: address policy (see the module docstring); None allows any address. ``expected``:
    what the body must be, in words ("an image"); a text/* reply (an error or login page) is then
    refused. Raises :class:`FetchError` (or a subclass), on opening or while iterating.
    """
    fetch = _Fetch(
        url,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        deadline_s=deadline_s,
        max_bytes=max_bytes,
        max_redirects=max_redirects,
        allow=allow,
        headers=headers,
        expected=expected,
    )
    with fetch.watchdog:
        response, close, final_url, hop = fetch.open()
        try:
            yield Body(final_url, response.headers, _declared_length(response), fetch.chunks(response, final_url, hop))
        finally:
            response.close()
            close()


def fetch_bytes(url: str, *, max_bytes: int, **options: Any) -> bytes:
    """The body of ``url``, at most ``max_bytes`` long; ``options`` are :func:`stream`'s keywords."""
    body = bytearray()
    with stream(url, max_bytes=max_bytes, **options) as response:
        for chunk in response:
            body += chunk
    return bytes(body)
