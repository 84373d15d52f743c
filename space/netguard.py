"""Fetch an image URL for a public web app without letting visitors reach private networks.

A visitor's URL is a server-side request made from the app's host (SSRF). Before any
connection, every address the host name resolves to must be public: loopback, private,
link-local (cloud metadata at 169.254.169.254), shared, reserved, multicast and
unspecified addresses are refused, including IPv4 embedded in IPv6 (mapped, 6to4,
NAT64, Teredo). The connection then goes to the checked address itself, with the name
kept only for the Host header and TLS, so a second DNS answer cannot swap in another
address (DNS rebinding). Redirects are followed by hand, and each hop is checked the
same way. Proxy variables are ignored on purpose: a proxy would connect on our behalf to
an address we never checked. The body is capped while streaming, within a total deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
DEADLINE_S = 15.0
DNS_TIMEOUT_S = 5.0
MAX_REDIRECTS = 5
MAX_BYTES = 10 * 1024 * 1024
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# getaddrinfo has no timeout of its own; a small pool lets a stuck lookup be abandoned.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="netguard-dns")


class URLRefusedError(ValueError):
    """The URL, or an address it resolves or redirects to, is not allowed. No connection was made to it."""


class FetchError(ValueError):
    """The URL is allowed but did not give a body: HTTP error, timeout, too large, not an image."""


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; False for anything local, private or special."""
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


def resolve(host: str, port: int, allow: AddressPolicy = is_public_address) -> list[IPAddress]:
    """All addresses of ``host``; raises :class:`URLRefusedError` unless every one is allowed."""
    try:
        infos = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(DNS_TIMEOUT_S)
    except FutureTimeout as error:
        raise FetchError(f"looking up {host!r} took over {DNS_TIMEOUT_S:g} s") from error
    except (OSError, UnicodeError) as error:
        raise FetchError(f"the host name {host!r} could not be resolved") from error
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    refused = [str(a) for a in addresses if not allow(a)]
    if refused or not addresses:
        literal = [str(a) for a in addresses] == [host.strip("[]")]
        what = f"{host} is" if literal else f"{host} resolves to {', '.join(refused) or 'nothing'}, which is"
        raise URLRefusedError(
            f"{what} a local, private or reserved address; only public internet addresses are allowed"
        )
    return addresses


def _split(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path+query, Host header) of an http(s) URL; refuses anything else."""
    if len(url) > 2048:
        raise URLRefusedError(f"the URL is {len(url)} characters long; at most 2048 are accepted")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise URLRefusedError(f"not a valid URL ({error})") from error
    if parts.scheme not in ("http", "https"):
        raise URLRefusedError(f"only http:// and https:// URLs are accepted, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise URLRefusedError("the URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise URLRefusedError("URLs with a user name or password are not accepted")
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.hostname
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port in (None, default_port) else f"{bracketed}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or default_port, target, host_header


def _open(url: str, allow: AddressPolicy, deadline: float) -> urllib3.BaseHTTPResponse:
    """One request, to a checked address of the URL's host; the response is not read yet."""
    scheme, host, port, target, host_header = _split(url)
    address = str(resolve(host, port, allow)[0])
    remaining = max(0.1, deadline - time.monotonic())
    timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, remaining), read=min(READ_TIMEOUT_S, remaining))
    options = {"port": port, "timeout": timeout, "retries": False, "maxsize": 1}
    if scheme == "https":
        # Connect to the checked address; verify the certificate against the name in the URL.
        pool = urllib3.HTTPSConnectionPool(
            address,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            **options,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, **options)
    headers = {
        "Host": host_header,
        "User-Agent": "resnext-hub-demo/1",
        "Accept": "image/*",
        "Accept-Encoding": "identity",
    }
    try:
        return pool.urlopen(
            "GET", target, headers=headers, redirect=False, retries=False, preload_content=False, assert_same_host=False
        )
    except urllib3.exceptions.NewConnectionError as error:  # a ConnectTimeoutError subclass: test it first
        raise FetchError(f"could not connect to {host} (connection refused or unreachable)") from error
    except urllib3.exceptions.TimeoutError as error:
        raise FetchError(f"{host} did not answer in time") from error
    except urllib3.exceptions.HTTPError as error:
        raise FetchError(f"could not connect to {host}: {type(error).__name__}") from error


def _read_capped(response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"the image is {int(declared) // 1024} KiB; at most {max_bytes // 1024} KiB are accepted")
    body = bytearray()
    try:
        # read1: whatever has arrived (one recv), so the deadline is checked even when bytes trickle in.
        while chunk := response.read1(_CHUNK, decode_content=True):
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"the image is over {max_bytes // 1024} KiB, the most accepted")
            if time.monotonic() > deadline:
                raise FetchError("the download took too long")
    except urllib3.exceptions.TimeoutError as error:
        raise FetchError("the server stopped sending in the middle of the image") from error
    except urllib3.exceptions.HTTPError as error:
        raise FetchError(f"the download failed: {type(error).__name__}") from error
    return bytes(body)


def fetch(
    url: str,
    *,
    max_bytes: int = MAX_BYTES,
    deadline_s: float = DEADLINE_S,
    max_redirects: int = MAX_REDIRECTS,
    allow: AddressPolicy = is_public_address,
) -> bytes:
    """The body of ``url`` (at most ``max_bytes``), refusing non-public addresses on every hop.

    Raises :class:`URLRefusedError` (before connecting) or :class:`FetchError`. ``allow``
    decides which resolved addresses may be contacted; tests pass a loopback-only policy.
    """
    deadline = time.monotonic() + deadline_s
    for _ in range(max_redirects + 1):
        response = _open(url, allow, deadline)
        try:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"HTTP {response.status} redirect without a Location header")
                url = urljoin(url, location)
                continue
            if response.status >= 400:
                raise FetchError(f"the server answered HTTP {response.status} {response.reason or ''}".rstrip())
            if response.status != 200:
                raise FetchError(f"the server answered HTTP {response.status}, expected 200")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type.startswith("text/"):
                raise FetchError(f"the URL gives a {content_type} page, not an image: link to the image file itself")
            return _read_capped(response, max_bytes, deadline)
        finally:
            response.release_conn()
            response.close()
    raise FetchError(f"more than {max_redirects} redirects")
