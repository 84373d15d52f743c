"""The demo's URL guard: private addresses refused before any connection, on every redirect.

Real HTTP servers on 127.0.0.1 only. Addresses outside loopback appear solely as URLs that must
be refused before a socket is opened, so no traffic leaves the machine.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "space"))

import netguard  # noqa: E402

PHOTO = ROOT / "assets" / "images" / "chelsea.jpg"


def loopback_only(ip) -> bool:
    """The test policy: only 127.0.0.1, so the test servers are reachable and nothing else is."""
    return ip == ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
        "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
        "192.0.2.1", "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "2002:a00:1::1", "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe", "2001:db8::1",
    ],
)  # fmt: skip
def test_local_private_and_special_addresses_are_refused(address: str) -> None:
    assert not netguard.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert netguard.is_public_address(ipaddress.ip_address(address))


@pytest.fixture
def listener():
    """A bare TCP listener on 127.0.0.1 that records whether anything connected to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.3)
    yield sock

    sock.close()


def _connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/x.jpg",
        "http://localhost:{port}/x.jpg",
        "http://0x7f000001:{port}/x.jpg",  # hex and decimal spellings of 127.0.0.1
        "http://2130706433:{port}/x.jpg",
        "http://127.1:{port}/x.jpg",
        "http://[::ffff:127.0.0.1]:{port}/x.jpg",
        "https://127.0.0.1:{port}/x.jpg",
    ],
)
def test_loopback_urls_are_refused_before_connecting(listener: socket.socket, template: str) -> None:
    url = template.format(port=listener.getsockname()[1])
    with pytest.raises(netguard.URLRefusedError, match="only public internet addresses"):
        netguard.fetch(url)
    assert not _connected(listener), f"{url} was refused only after a connection"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://example.org/x.jpg", "only http:// and https://"),
        ("gopher://127.0.0.1:70/", "only http:// and https://"),
        ("http://user:secret@example.org/x.jpg", "user name or password"),
        ("http:///x.jpg", "no host name"),
        ("http://example.org:99999/x.jpg", "not a valid URL"),
        ("http://10.0.0.1/x.jpg", "10.0.0.1 is a local, private or reserved address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a local"),
        ("http://[fd00::1]/x.jpg", "fd00::1 is a local"),
        ("http://example.org/" + "a" * 3000, "at most 2048"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(netguard.URLRefusedError, match=reason):
        netguard.fetch(url)
    assert time.monotonic() - started < 1.0  # refused locally, no network wait


class _Handler(BaseHTTPRequestHandler):
    """Routes for the fetch tests; records each request's path and Host header."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.seen.append((self.path, self.headers.get("Host")))
        port = self.server.server_address[1]
        routes = {
            "/photo.jpg": lambda: self._send(200, PHOTO.read_bytes(), {"Content-Type": "image/jpeg"}),
            "/hop": lambda: self._send(302, headers={"Location": "/photo.jpg"}),
            "/hop-absolute": lambda: self._send(301, headers={"Location": f"http://127.0.0.1:{port}/hop"}),
            "/to-private": lambda: self._send(302, headers={"Location": "http://10.0.0.1/photo.jpg"}),
            "/to-metadata": lambda: self._send(307, headers={"Location": "http://169.254.169.254/"}),
            "/loop": lambda: self._send(302, headers={"Location": "/loop"}),
            "/page": lambda: self._send(200, b"<html>hi</html>", {"Content-Type": "text/html; charset=utf-8"}),
            "/huge-declared": lambda: self._send(200, b"x", {"Content-Length": str(1 << 30)}),
            "/missing": lambda: self._send(404, b"no"),
        }
        if self.path == "/huge-streamed":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:  # the client hung up at the cap, as it should
                pass
            return
        if self.path == "/drip":  # a byte at a time, each within the read timeout: only the deadline ends it
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        routes.get(self.path, lambda: self._send(404))()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_fetch_returns_the_exact_body_and_sends_the_host_header(server) -> None:
    assert netguard.fetch(_url(server, "/photo.jpg"), allow=loopback_only) == PHOTO.read_bytes()
    assert server.seen[-1] == ("/photo.jpg", f"127.0.0.1:{server.server_address[1]}")


def test_redirects_are_followed_and_each_hop_is_checked(server) -> None:
    assert netguard.fetch(_url(server, "/hop-absolute"), allow=loopback_only) == PHOTO.read_bytes()
    assert [path for path, _ in server.seen[-3:]] == ["/hop-absolute", "/hop", "/photo.jpg"]


@pytest.mark.parametrize(("path", "refused"), [("/to-private", "10.0.0.1"), ("/to-metadata", "169.254.169.254")])
def test_a_redirect_to_a_refused_address_stops_before_connecting(server, path: str, refused: str) -> None:
    before = len(server.seen)
    # The first hop is allowed (127.0.0.1); the redirect's target is refused by the same policy.
    with pytest.raises(netguard.URLRefusedError, match=refused.replace(".", r"\.")):
        netguard.fetch(_url(server, path), allow=loopback_only)
    assert [p for p, _ in server.seen[before:]] == [path]


def test_the_default_policy_refuses_the_test_server_itself(server) -> None:
    before = len(server.seen)
    with pytest.raises(netguard.URLRefusedError):
        netguard.fetch(_url(server, "/photo.jpg"))
    assert len(server.seen) == before


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/loop", "more than 5 redirects"),
        ("/page", "text/html page, not an image"),
        ("/huge-declared", "at most 1024 KiB"),
        ("/huge-streamed", "over 1024 KiB"),
        ("/missing", "HTTP 404"),
    ],
)
def test_fetch_failures_are_clear(server, path: str, error: str) -> None:
    with pytest.raises(netguard.FetchError, match=error):
        netguard.fetch(_url(server, path), allow=loopback_only, max_bytes=1 << 20)


def test_a_dripping_server_is_abandoned_at_the_deadline(server) -> None:
    started = time.monotonic()
    with pytest.raises(netguard.FetchError, match="took too long"):
        netguard.fetch(_url(server, "/drip"), allow=loopback_only, deadline_s=1.0)
    assert time.monotonic() - started < 2.0


def test_nothing_listening_is_a_fetch_error(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()  # the port is now closed: connection refused
    with pytest.raises(netguard.FetchError, match="could not connect"):
        netguard.fetch(f"http://127.0.0.1:{port}/x.jpg", allow=loopback_only)
