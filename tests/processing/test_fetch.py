"""The one bounded fetch: the address policy (private addresses refused before any connection, on
every redirect), limits, redirects, proxies, credentials, and URL recognition.

Real HTTP servers on 127.0.0.1 only. Addresses outside loopback appear solely as URLs that must
be refused before a socket is opened, so no traffic leaves the machine.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT
from rawserver import RawServer, drip, reply

from resnext_hub.processing import InvalidImageError, fetch, load_image
from resnext_hub.processing.fetch import is_public_address, is_url

PHOTO = ROOT / "assets" / "images" / "chelsea.jpg"
# The web demo's settings (through the image loader): a public-only policy, an image, its limits.
GUARDED = {
    "allow": is_public_address,
    "expected": "an image",
    "max_bytes": 10 * 1024 * 1024,
    "connect_timeout_s": 5.0,
    "read_timeout_s": 10.0,
    "deadline_s": 15.0,
}


def guarded_fetch(url: str, **options) -> bytes:
    """``fetch.fetch_bytes`` as the web demo calls it (``options`` override)."""
    return fetch.fetch_bytes(url, **{**GUARDED, **options})


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
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


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
    with pytest.raises(fetch.URLRefusedError, match="only public internet addresses"):
        guarded_fetch(url)
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
    with pytest.raises(fetch.URLRefusedError, match=reason):
        guarded_fetch(url)
    assert time.monotonic() - started < 1.0  # refused locally, no network wait


class _Handler(BaseHTTPRequestHandler):
    """Routes for the fetch tests; records each request's path and Host header, and its Authorization."""

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
        self.server.auth.append(self.headers.get("Authorization"))
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
    httpd.auth = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_fetch_returns_the_exact_body_and_sends_the_host_header(server) -> None:
    assert guarded_fetch(_url(server, "/photo.jpg"), allow=loopback_only) == PHOTO.read_bytes()
    assert server.seen[-1] == ("/photo.jpg", f"127.0.0.1:{server.server_address[1]}")


def test_redirects_are_followed_and_each_hop_is_checked(server) -> None:
    assert guarded_fetch(_url(server, "/hop-absolute"), allow=loopback_only) == PHOTO.read_bytes()
    assert [path for path, _ in server.seen[-3:]] == ["/hop-absolute", "/hop", "/photo.jpg"]


@pytest.mark.parametrize(("path", "refused"), [("/to-private", "10.0.0.1"), ("/to-metadata", "169.254.169.254")])
def test_a_redirect_to_a_refused_address_stops_before_connecting(server, path: str, refused: str) -> None:
    before = len(server.seen)
    # The first hop is allowed (127.0.0.1); the redirect's target is refused by the same policy.
    with pytest.raises(fetch.URLRefusedError, match=refused.replace(".", r"\.")):
        guarded_fetch(_url(server, path), allow=loopback_only)
    assert [p for p, _ in server.seen[before:]] == [path]


def test_the_public_policy_refuses_the_test_server_itself(server) -> None:
    before = len(server.seen)
    with pytest.raises(fetch.URLRefusedError):
        guarded_fetch(_url(server, "/photo.jpg"))
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
    with pytest.raises(fetch.FetchError, match=error):
        guarded_fetch(_url(server, path), allow=loopback_only, max_bytes=1 << 20)


def test_a_dripping_server_is_abandoned_at_the_deadline(server) -> None:
    started = time.monotonic()
    with pytest.raises(fetch.FetchError, match="took too long"):
        guarded_fetch(_url(server, "/drip"), allow=loopback_only, deadline_s=1.0)
    assert time.monotonic() - started < 2.0


def test_nothing_listening_is_a_fetch_error(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()  # the port is now closed: connection refused
    with pytest.raises(fetch.FetchError, match="could not connect"):
        guarded_fetch(f"http://127.0.0.1:{port}/x.jpg", allow=loopback_only)


# --- without a policy: the same limits, for the weights downloader and the image loader --------

LIMITS = {"connect_timeout_s": 5.0, "read_timeout_s": 10.0, "deadline_s": 15.0}


def test_stream_gives_the_length_then_the_chunks_into_any_sink(server) -> None:
    received = bytearray()
    with fetch.stream(_url(server, "/hop"), **LIMITS) as body:
        assert body.length == PHOTO.stat().st_size and body.url == _url(server, "/photo.jpg")
        for chunk in body:
            received += chunk
    assert received == PHOTO.read_bytes()


def test_any_address_is_allowed_without_a_policy(server) -> None:
    assert fetch.fetch_bytes(_url(server, "/photo.jpg"), max_bytes=1 << 20, **LIMITS) == PHOTO.read_bytes()
    # localhost may resolve to ::1 first, where nothing listens: the next address is tried.
    local = f"http://localhost:{server.server_address[1]}/photo.jpg"
    assert fetch.fetch_bytes(local, max_bytes=1 << 20, **LIMITS) == PHOTO.read_bytes()


@pytest.mark.parametrize(("max_redirects", "error"), [(0, "more than 0 redirects"), (1, "more than 1 redirect$")])
def test_the_redirect_limit_is_the_callers(server, max_redirects: int, error: str) -> None:
    url = _url(server, "/hop-absolute")  # two redirects to the photo
    with pytest.raises(fetch.FetchError, match=error):
        fetch.fetch_bytes(url, max_bytes=1 << 20, max_redirects=max_redirects, **LIMITS)
    assert fetch.fetch_bytes(url, max_bytes=1 << 20, max_redirects=2, **LIMITS) == PHOTO.read_bytes()


def test_a_body_shorter_than_its_content_length_is_an_error() -> None:
    with RawServer(reply(b"x" * 300, content_length=1000)) as raw:
        with pytest.raises(fetch.FetchError, match=r"cut short \(IncompleteRead: 300 of 1000 bytes\)"):
            fetch.fetch_bytes(raw.url + "/x", max_bytes=1 << 20, **LIMITS)


def test_a_server_dripping_its_headers_is_abandoned_at_the_deadline() -> None:
    """Each byte comes within the read timeout: only the watchdog's deadline ends the wait."""
    with RawServer(drip(interval_s=0.05, in_head=True)) as raw:
        started = time.monotonic()
        with pytest.raises(fetch.DeadlineError, match="took too long"):
            with fetch.stream(raw.url + "/x", connect_timeout_s=5.0, read_timeout_s=5.0, deadline_s=1.0):
                pass
        assert time.monotonic() - started < 2.0


def test_the_image_loader_is_cut_off_by_its_deadline_too() -> None:
    with RawServer(drip(interval_s=0.05, in_head=True)) as raw:
        started = time.monotonic()
        with pytest.raises(InvalidImageError, match="deadline") as caught:
            load_image(raw.url + "/x.jpg", deadline_s=1.0)
        assert time.monotonic() - started < 2.0
    assert isinstance(caught.value.__cause__, fetch.DeadlineError)


# --- credentials -------------------------------------------------------------------------------


def test_credentials_are_sent_as_basic_auth_and_never_shown(server) -> None:
    url = f"http://alice:s3cr%40t@127.0.0.1:{server.server_address[1]}/missing"
    before = len(server.auth)
    with pytest.raises(fetch.FetchError, match="HTTP 404") as caught:
        fetch.fetch_bytes(url, max_bytes=1 << 20, **LIMITS)
    assert server.auth[before:] == ["Basic YWxpY2U6czNjckB0"]  # alice:s3cr@t
    assert "s3cr" not in str(caught.value) and "alice" not in str(caught.value)
    assert caught.value.url == f"http://***@127.0.0.1:{server.server_address[1]}/missing"


def test_credentials_stay_on_their_host(server) -> None:
    """A relative redirect keeps them; an absolute one (here to the same server) carries its own: none."""
    port = server.server_address[1]
    before = len(server.auth)
    assert fetch.fetch_bytes(f"http://a:b@127.0.0.1:{port}/hop", max_bytes=1 << 20, **LIMITS) == PHOTO.read_bytes()
    assert fetch.fetch_bytes(f"http://a:b@127.0.0.1:{port}/hop-absolute", max_bytes=1 << 20, **LIMITS)
    assert server.auth[before:] == ["Basic YTpi", "Basic YTpi", "Basic YTpi", None, None]


def test_no_message_shows_credentials(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()
    url = f"https://bob:hunter2@127.0.0.1:{port}/x.jpg"
    with pytest.raises(fetch.FetchError, match="could not connect") as caught:
        fetch.fetch_bytes(url, max_bytes=1 << 20, **LIMITS)
    with pytest.raises(InvalidImageError, match="could not be fetched") as loaded:
        load_image(url)
    with pytest.raises(fetch.URLRefusedError, match="user name or password") as refused:
        guarded_fetch(url)
    for error in (caught.value, loaded.value, refused.value):
        assert "hunter2" not in str(error) and "bob" not in str(error), str(error)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:p@host/x", "http://***@host/x"),
        ("https://token@host:8443/x?q=1", "https://***@host:8443/x?q=1"),
        ("http://u:p@ss@host/x", "http://***@host/x"),  # a raw "@" in the password: parsers split at the last
        ("get http://a:b@one/x then https://c:d@two/y", "get http://***@one/x then https://***@two/y"),
        ("http://host/path@v2", "http://host/path@v2"),
        ("/plain/path@2x.png", "/plain/path@2x.png"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert fetch.redact(text) == shown


# --- proxies -----------------------------------------------------------------------------------


@pytest.fixture
def proxy(monkeypatch):
    """A "proxy" on 127.0.0.1 that answers every request with the photo; set as http_proxy."""
    with RawServer(reply(PHOTO.read_bytes(), content_type="image/jpeg")) as raw:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", raw.url)
        monkeypatch.setenv("no_proxy", "")
        yield raw


def test_the_proxy_variables_are_honoured_without_a_policy(proxy, server, monkeypatch) -> None:
    url = "http://images.example/photo.jpg"  # never resolved here: the proxy fetches it
    assert fetch.fetch_bytes(url, max_bytes=1 << 20, **LIMITS) == PHOTO.read_bytes()
    assert proxy.paths == [url]
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert fetch.fetch_bytes(_url(server, "/photo.jpg"), max_bytes=1 << 20, **LIMITS) == PHOTO.read_bytes()
    assert proxy.paths == [url]


def test_a_policy_ignores_the_proxy_variables(proxy, server) -> None:
    before = len(server.seen)
    assert guarded_fetch(_url(server, "/photo.jpg"), allow=loopback_only) == PHOTO.read_bytes()
    assert proxy.paths == [] and len(server.seen) == before + 1


# --- the image loader with a policy (the web demo) ---------------------------------------------


def test_the_image_loader_passes_the_policy_on(server) -> None:
    assert load_image(_url(server, "/photo.jpg"), allow=loopback_only).size == load_image(PHOTO).size
    with pytest.raises(InvalidImageError, match="refused: 127.0.0.1 is a local") as caught:
        load_image(_url(server, "/photo.jpg"), allow=is_public_address)
    assert isinstance(caught.value.__cause__, fetch.URLRefusedError)


@pytest.mark.parametrize("text", [str(PHOTO), "/etc/passwd", "file:///etc/passwd", "photo.jpg"])
def test_with_a_policy_text_is_never_opened_as_a_local_file(text: str) -> None:
    with pytest.raises(InvalidImageError, match="refused: only http:// and https://"):
        load_image(text, allow=is_public_address)


# --- URL recognition ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "http://example.org/a.jpg",
        "https://example.org/a.jpg?v",
        "https://example.org/a.jpg?w=320&fmt=jpg",
        "HTTPS://EXAMPLE.ORG/A.JPG",
        "http://localhost:8080/x.jpg",
        "http://localhost/x.jpg",
        "http://127.0.0.1:5000/x",
        "http://[::1]:8080/a.jpg",
        "http://[2001:db8::1]/a.jpg",
        "https://user:pw@example.org/a.jpg",
    ],
)
def test_urls_are_recognised(text: str) -> None:
    assert is_url(text)


@pytest.mark.parametrize(
    "text",
    [
        "/tmp/a.jpg",
        "a.jpg",
        "images/a.jpg",
        "./a.jpg",
        "~/a.jpg",
        "C:\\photos\\a.jpg",
        "ftp://example.org/a.jpg",
        "file:///etc/passwd",
        "data:image/png;base64,iVBORw0KGgo=",
        "http://",
        "http:///x.jpg",
        "http://[::1",
        "https://example.org/a b.jpg",
        "",
        b"http://example.org/a.jpg",
        ROOT / "http:" / "example.org",
        None,
    ],
)
def test_paths_and_other_schemes_are_not_urls(text) -> None:
    assert not is_url(text)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate (a corporate mirror's own CA)."""
    import ssl
    import subprocess

    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    (folder / "photo.jpg").write_bytes(PHOTO.read_bytes())
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_a_corporate_ca_bundle_is_trusted_when_named_and_only_then(https_server, monkeypatch, variable) -> None:
    base, cert = https_server
    options = {"max_bytes": 1 << 20, "connect_timeout_s": 5.0, "read_timeout_s": 5.0, "deadline_s": 10.0}
    for name in fetch.CA_BUNDLE_ENVS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(fetch.FetchError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        fetch.fetch_bytes(f"{base}/photo.jpg", **options)
    monkeypatch.setenv(variable, str(cert))
    assert fetch.fetch_bytes(f"{base}/photo.jpg", **options) == PHOTO.read_bytes()
    # A public web app's visitors never get the operator's trust store.
    with pytest.raises(fetch.FetchError):
        fetch.fetch_bytes(f"{base}/photo.jpg", allow=loopback_only, **options)
