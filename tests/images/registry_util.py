"""A real registry for the tests: Debian's ``docker-registry`` (the reference implementation,
github.com/distribution/distribution) on a free port of 127.0.0.1, with a temporary storage
directory and, as asked, htpasswd (Basic) auth, token (Bearer) auth from a token server run here,
or TLS with a CA made here.  A throttling proxy stands between a client and the registry when a
test needs a download slow enough to interrupt, or cut mid-blob.  Nothing leaves 127.0.0.1.

Needs ``apt-get install docker-registry apache2-utils openssl`` (scripts/setup.sh installs them).
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER, PASSWORD = "tester", "s3cret:pw"


def requirement_problem() -> str | None:
    missing = [p for p in ("docker-registry", "htpasswd", "openssl") if shutil.which(p) is None]
    if missing:
        return f"needs {' '.join(missing)} (apt-get install docker-registry apache2-utils openssl)"
    return None


def need_registry() -> None:
    why = requirement_problem()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the registry tests cannot run: {why}")
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=unionfs test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")
    return d / "ca.crt", d / "server.crt", d / "server.key"


@dataclass
class Registry:
    base: Path
    auth: str = "none"               # none | htpasswd | token
    tls: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.base / "data"

    @property
    def certs(self) -> Path:
        return self.base / "certs"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:",
                 "    enabled: true", "http:", f"  addr: 127.0.0.1:{self.port}"]
        if self.tls:
            _ca, crt, key = make_ca(self.certs)
            lines += ["  tls:", f"    certificate: {crt}", f"    key: {key}"]
        if self.auth == "htpasswd":
            subprocess.run(["htpasswd", "-Bbc", str(self.base / "htpasswd"), USER, PASSWORD], check=True,
                           capture_output=True)
            lines += ["auth:", "  htpasswd:", "    realm: unionfs-test", f"    path: {self.base / 'htpasswd'}"]
        elif self.auth == "token":
            self.token_server = TokenServer(self.base / "token")
            lines += ["auth:", "  token:", f"    realm: {self.token_server.url}", "    service: test-registry",
                      "    issuer: unionfs-test-issuer", f"    rootcertbundle: {self.token_server.cert}"]
        (self.base / "config.yml").write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.base / "config.yml")],
                                     stdout=open(self.base / "log", "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {(self.base / 'log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("docker-registry did not start listening in 20 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.token_server is not None:
            self.token_server.stop()

    def blob_path(self, digest: str) -> Path:
        h = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"

    def manifest_digest(self, repo: str, tag: str) -> str:
        link = self.storage / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current/link"
        return link.read_text().strip()

    def manifest(self, repo: str, tag: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.blob_path(self.manifest_digest(repo, tag)).read_bytes())
        return doc


@contextlib.contextmanager
def running_registry(base: Path, auth: str = "none", tls: bool = False) -> Iterator[Registry]:
    need_registry()
    reg = Registry(base, auth, tls)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


# ---------------------------------------------------------------------------------------- token auth


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token server as the registry's ``auth: token`` expects: a JWT (RS256, the signing
    certificate in ``x5c``) granting pull to anyone and push to USER:PASSWORD; every request's
    (user, scopes) is kept in ``requests``."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = d / "token.key", d / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=unionfs test token signer", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[tuple[str | None, list[str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = q.get("scope", [])
                server.requests.append((user, scopes))
                body = json.dumps({"token": server.token(user, scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            kind, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a == "pull" or user is not None]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": "unionfs-test-issuer", "sub": user or "", "aud": "test-registry", "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing}.{_b64(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------- a slow proxy


class Proxy:
    """TCP proxy 127.0.0.1:port -> target; the answers go at *rate* bytes/s (None: at once), and with
    *cut_after* set, the first connection that carried more than that many answer bytes is cut (once).
    What clients sent is kept in ``sent`` (plain HTTP: the request heads can be read there)."""

    def __init__(self, target: int, rate: float | None = None, cut_after: int | None = None) -> None:
        self.target, self.rate, self.cut_after = target, rate, cut_after
        self.sent = bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        moved = 0
        try:
            while data := src.recv(65536):
                if not answers:
                    self.sent += data
                dst.sendall(data)
                moved += len(data)
                if answers and self.cut_after is not None and moved > self.cut_after:
                    self.cut_after = None
                    break
                if answers and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
