"""`unionfs pull` and `unionfs push`: the OCI distribution (Docker Registry v2) protocol over httpx.

A ``Registry`` talks to one registry host: it finds the scheme (HTTPS, verified against the system's
CAs plus ``*.crt`` of the cert dir; plain HTTP only when the user said ``tls_verify=False`` for it and
HTTPS fails, as podman does), answers ``WWW-Authenticate`` challenges (Bearer: a token from the realm,
anonymous or with credentials; Basic: the credentials on every request) and turns every failure into
one ``ImageError`` line.  One ``httpx.Client`` (thread-safe, one connection pool) serves the worker
threads that fetch or upload several layers at once.

A pull verifies every byte it keeps: manifests and the config against their digests, each layer blob
while it streams into ``partial/`` of the store (a pull killed mid-blob resumes there with an HTTP
Range request, or starts the blob again when the registry ignores the range), and each layer's
diff_id while it is unpacked into the store's ``tmp/``.  Nothing becomes visible before everything
is verified (``Store.add_images``); layers already in the store are not fetched.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .auth import Reference, find_credentials
from .sources import INDEX_TYPES, LayerRef, check_digest
from .store import CONFIG_TYPE, MANIFEST_TYPE, FileSource, Store, hexof
from .unpack import CHUNK, ImageError

log = logging.getLogger(__name__)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, MANIFEST_TYPE, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20
WORKERS = 3
RETRIES = 3
CERTS_D = "/etc/containers/certs.d"
# (description, total bytes) -> advance(n): one progress bar per layer, or a no-op
Bars = Callable[[str, int], Callable[[int], None]]


def _no_bar(_what: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class Options:
    """What a user may say about a registry: --tls-verify, --cert-dir, --creds, --authfile."""

    tls_verify: bool = True
    cert_dir: str | None = None
    creds: tuple[str, str] | None = None
    authfile: str | None = None
    timeout: float = 60.0


@dataclass
class _Challenge:
    scheme: str                      # "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> _Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return _Challenge(scheme.lower(), params)


def ssl_context(host: str, cert_dir: str | None) -> ssl.SSLContext:
    """The system's CAs plus every ``*.crt`` in *cert_dir* (default /etc/containers/certs.d/HOST),
    and a client certificate from ``*.cert`` + ``*.key`` there, as podman reads that directory."""
    ctx = ssl.create_default_context()
    d = Path(cert_dir) if cert_dir else Path(CERTS_D) / host
    if d.is_dir():
        for f in sorted(d.iterdir()):
            try:
                if f.suffix == ".crt":
                    ctx.load_verify_locations(cafile=str(f))
                elif f.suffix == ".cert" and f.with_suffix(".key").exists():
                    ctx.load_cert_chain(str(f), str(f.with_suffix(".key")))
            except (ssl.SSLError, OSError) as e:
                raise ImageError(f"{f}: unusable certificate: {e}") from None
    elif cert_dir:
        raise ImageError(f"{cert_dir}: no such directory")
    return ctx


def _registry_error(resp: httpx.Response) -> str:
    """The registry's own words for a failure: the first of its ``errors``, or the HTTP reason."""
    try:
        errors = resp.json().get("errors") or []
        first = errors[0]
        return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except Exception:      # any body at all: a proxy's HTML page, nothing, broken JSON
        return resp.reason_phrase or "error"


class Registry:
    """One registry host, spoken to over HTTPS (or HTTP when allowed), with its auth worked out."""

    def __init__(self, host: str, opts: Options) -> None:
        self.host = host
        self.opts = opts
        self.creds = opts.creds or find_credentials(host, opts.authfile)
        if host == "registry-1.docker.io" and opts.creds is None:
            self.creds = find_credentials("docker.io", opts.authfile)
        verify: ssl.SSLContext | bool = ssl_context(host, opts.cert_dir) if opts.tls_verify else False
        self.http = httpx.Client(verify=verify, follow_redirects=True, timeout=httpx.Timeout(
            opts.timeout, connect=min(opts.timeout, 15.0)), headers={"User-Agent": "unionfs"})
        self.base = ""
        self._lock = threading.Lock()
        self._challenge: _Challenge | None = None
        self._tokens: dict[tuple[str, ...], str] = {}

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ connection and auth

    def ping(self) -> None:
        """Find the scheme (and the challenge) with ``GET /v2/``."""
        schemes = ["https"] if self.opts.tls_verify else ["https", "http"]
        last: Exception | None = None
        for scheme in schemes:
            try:
                resp = self.http.get(f"{scheme}://{self.host}/v2/")
            except httpx.HTTPError as e:
                last = e
                continue
            self.base = f"{scheme}://{self.host}"
            if resp.status_code == 401:
                self._challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            elif resp.status_code >= 400 and resp.status_code != 404:
                raise ImageError(f"{self.host}: not a registry: GET /v2/ answered {resp.status_code} "
                                 f"{_registry_error(resp)}")
            return
        raise ImageError(f"{self.host}: cannot connect: {_why(last)}")

    def _authorization(self, scope: tuple[str, ...]) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            if not self.creds:
                return None
            return "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        if ch.scheme == "bearer":
            with self._lock:
                token = self._tokens.get(scope)
            if token is None:
                token = self._token(ch, scope)
            return f"Bearer {token}"
        raise ImageError(f"{self.host}: unsupported authentication scheme {ch.scheme!r}")

    def _token(self, ch: _Challenge, scope: tuple[str, ...]) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise ImageError(f"{self.host}: bearer challenge without a realm")
        params: list[tuple[str, str | int | float | bool | None]] = [("scope", s) for s in scope]
        if "service" in ch.params:
            params.append(("service", ch.params["service"]))
        try:
            auth = httpx.BasicAuth(*self.creds) if self.creds else None
            resp = self.http.get(realm, params=params, auth=auth)
        except httpx.HTTPError as e:
            raise ImageError(f"{self.host}: token server {realm}: {_why(e)}") from None
        if resp.status_code in (401, 403):
            who = f"as {self.creds[0]}" if self.creds else "anonymously"
            raise ImageError(f"{self.host}: the token server refused to log in {who} "
                             f"({resp.status_code} {_registry_error(resp)})")
        if resp.status_code != 200:
            raise ImageError(f"{self.host}: token server {realm}: {resp.status_code} {_registry_error(resp)}")
        try:
            body = resp.json()
            token = str(body.get("token") or body["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise ImageError(f"{self.host}: token server {realm}: no token in its answer") from None
        with self._lock:
            self._tokens[scope] = token
        return token

    def request(self, method: str, url: str, scope: tuple[str, ...], *, stream: bool = False,
                body: Callable[[], Any] | None = None, **kw: Any) -> httpx.Response:
        """One request with the auth the registry asks for: on a 401 the challenge is answered and
        the request sent once more (*body*, a callable, makes its content afresh each time)."""
        if not self.base:
            self.ping()
        if url.startswith("/"):
            url = self.base + url
        headers = dict(kw.pop("headers", {}))
        for attempt in range(2):
            auth = self._authorization(scope)
            if auth:
                headers["Authorization"] = auth
            content = body() if body is not None else None
            try:
                req = self.http.build_request(method, url, headers=headers, content=content, **kw)
                resp = self.http.send(req, stream=stream)
            except httpx.HTTPError as e:
                raise TransientError(f"{self.host}: {method} {_short(url)}: {_why(e)}") from None
            if resp.status_code != 401 or attempt:
                return resp
            resp.close()
            ch = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if ch is None or (ch.scheme == "basic" and not self.creds):
                return resp
            with self._lock:
                self._challenge = ch
                self._tokens.pop(scope, None)
        return resp

    def check(self, resp: httpx.Response, what: str) -> httpx.Response:
        """*resp* when it is a success; otherwise one line that says what went wrong."""
        if resp.status_code < 400:
            return resp
        resp.read()
        why = _registry_error(resp)
        if resp.status_code == 401:
            hint = (f"log in with `unionfs login {self.host}` or pass --creds" if not self.creds
                    else "the credentials were refused")
            raise ImageError(f"{what}: authentication required (401 {why}): {hint}")
        if resp.status_code == 403:
            raise ImageError(f"{what}: access denied (403 {why})")
        if resp.status_code == 404:
            raise ImageError(f"{what}: not found (404 {why})")
        if resp.status_code >= 500:
            raise TransientError(f"{what}: the registry failed ({resp.status_code} {why})")
        raise ImageError(f"{what}: {resp.status_code} {why}")

    # ------------------------------------------------------------------ reading

    def manifest(self, repo: str, reference: str, accept: str = ACCEPT) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest; a digest reference is verified."""
        what = f"{self.host}/{repo}" + (f"@{reference}" if ":" in reference else f":{reference}")
        resp = self.check(self.request("GET", f"/v2/{repo}/manifests/{reference}", _pull(repo),
                                       headers={"Accept": accept}), what)
        data = resp.content
        if len(data) > MAX_MANIFEST:
            raise ImageError(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise ImageError(f"{what}: manifest digest mismatch: got {digest}")
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return data, media, digest

    def blob_bytes(self, repo: str, digest: str, limit: int = MAX_MANIFEST) -> bytes:
        what = f"{self.host}/{repo}: blob {digest}"
        resp = self.check(self.request("GET", f"/v2/{repo}/blobs/{digest}", _pull(repo)), what)
        if len(resp.content) > limit:
            raise ImageError(f"{what}: larger than {limit} bytes")
        check_digest(what, resp.content, digest)
        return resp.content

    def fetch_blob(self, repo: str, digest: str, dest: Path, advance: Callable[[int], None]) -> int:
        """Stream blob *digest* into *dest*, verifying it; what is already in *dest* (an interrupted
        pull's) is kept when the registry honours a Range request.  Returns the bytes resumed."""
        sha = hashlib.sha256()
        have = 0
        if dest.exists():
            with open(dest, "rb") as f:
                while chunk := f.read(CHUNK):
                    sha.update(chunk)
                    have += len(chunk)
        headers = {"Range": f"bytes={have}-"} if have else {}
        what = f"{self.host}/{repo}: blob {digest}"
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", _pull(repo), stream=True, headers=headers)
        try:
            resumed = have if (have and resp.status_code == 206 and
                               resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")) else 0
            if have and not resumed and resp.status_code in (206, 416):
                resp.close()          # the registry cannot go on from there: all of it again
                dest.unlink()
                return self.fetch_blob(repo, digest, dest, advance)
            if not resumed:
                self.check(resp, what)
                sha, have = hashlib.sha256(), 0
            advance(have)
            try:
                with open(dest, "ab" if resumed else "wb") as f:
                    for chunk in resp.iter_bytes(CHUNK):
                        f.write(chunk)
                        sha.update(chunk)
                        advance(len(chunk))
            except httpx.HTTPError as e:      # kept: the next try (or pull) goes on from there
                raise TransientError(f"{what}: {_why(e)}") from None
            except OSError:                   # a full disk: nothing of it stays
                dest.unlink(missing_ok=True)
                raise
        finally:
            resp.close()
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            dest.unlink()
            raise ImageError(f"{what}: digest mismatch: got {got}")
        return resumed

    # ------------------------------------------------------------------ writing

    def has_blob(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", _push(repo))
        if resp.status_code == 404:
            return False
        self.check(resp, f"{self.host}/{repo}: blob {digest}")
        return True

    def mount_blob(self, repo: str, digest: str, source: str) -> str | None:
        """Ask for *digest* to be mounted from repository *source*: None when it was, else the upload
        location the registry opened instead."""
        scope = _push(repo) + (f"repository:{source}:pull",)
        resp = self.check(self.request("POST", f"/v2/{repo}/blobs/uploads/", scope,
                                       params={"mount": digest, "from": source}),
                          f"{self.host}/{repo}: mount of {digest}")
        if resp.status_code == 201:
            return None
        return self._location(resp)

    def upload_blob(self, repo: str, digest: str, path: Path, size: int, chunk_size: int,
                    location: str | None, advance: Callable[[int], None]) -> None:
        """Upload the blob at *path*: in one PUT (*chunk_size* 0), or in PATCH chunks then a PUT."""
        what = f"{self.host}/{repo}: upload of {digest}"
        if location is None:
            location = self._location(self.check(
                self.request("POST", f"/v2/{repo}/blobs/uploads/", _push(repo)), what))
        octet = {"Content-Type": "application/octet-stream"}
        if chunk_size > 0:
            with open(path, "rb") as f:
                start = 0
                while chunk := f.read(chunk_size):
                    end = start + len(chunk) - 1
                    resp = self.check(self.request(
                        "PATCH", location, _push(repo), body=lambda c=chunk: c,  # type: ignore[misc]
                        headers={**octet, "Content-Range": f"{start}-{end}"}), what)
                    location = self._location(resp)
                    start = end + 1
                    advance(len(chunk))
            url = httpx.URL(location).copy_merge_params({"digest": digest})
            self.check(self.request("PUT", str(url), _push(repo), headers={"Content-Length": "0"}), what)
            return
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        self.check(self.request("PUT", str(url), _push(repo), body=lambda: _file_chunks(path, advance),
                                headers={**octet, "Content-Length": str(size)}), what)

    def put_manifest(self, repo: str, reference: str, data: bytes, media: str) -> str:
        resp = self.check(self.request("PUT", f"/v2/{repo}/manifests/{reference}", _push(repo),
                                       body=lambda: data, headers={"Content-Type": media}),
                          f"{self.host}/{repo}:{reference}: manifest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise ImageError(f"{self.host}/{repo}:{reference}: the registry stored the manifest as {said}, "
                             f"not {digest}")
        return digest

    def _location(self, resp: httpx.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise ImageError(f"{self.host}: the registry gave no upload location")
        return str(resp.url.join(loc))


class TransientError(ImageError):
    """A failure worth one more try (a dropped connection, a 5xx)."""


def _pull(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def _push(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def _why(e: Exception | None) -> str:
    text = str(e) if e is not None else "no answer"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    if "WRONG_VERSION_NUMBER" in text:
        return "it does not speak TLS (for a plain HTTP registry: --tls-verify=false)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ("TLS certificate not trusted (put its CA in /etc/containers/certs.d/HOST/ca.crt or "
                "pass --cert-dir; --tls-verify=false to skip the check)")
    return text.splitlines()[0] if text else type(e).__name__


def _short(url: str) -> str:
    return url.split("?", 1)[0]


def _file_chunks(path: Path, advance: Callable[[int], None]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            advance(len(chunk))
            yield chunk


def _retrying(fn: Callable[[], Any], what: str) -> Any:
    for attempt in range(RETRIES):
        try:
            return fn()
        except TransientError as e:
            if attempt == RETRIES - 1:
                raise
            log.info("%s: %s; trying again", what, e)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- pull


def host_platform() -> tuple[str, str, str | None]:
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
    return "linux", arch, {"arm64": "v8", "arm": "v7"}.get(arch)


def parse_platform(text: str | None) -> tuple[str, str, str | None]:
    if not text:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"--platform {text}: want OS/ARCH[/VARIANT], e.g. linux/arm64")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def choose_manifest(index: Any, platform: tuple[str, str, str | None], what: str) -> str:
    """The digest of the index entry for *platform* (a missing variant matches any)."""
    want_os, want_arch, want_variant = platform
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ImageError(f"{what}: malformed image index")
    seen = []
    for strict in (True, False):
        for d in entries:
            p = d.get("platform") or {} if isinstance(d, dict) else {}
            variant = f"/{p['variant']}" if p.get("variant") else ""
            seen.append(f"{p.get('os')}/{p.get('architecture')}{variant}")
            if p.get("os") == want_os and p.get("architecture") == want_arch and (
                    not strict or want_variant is None or p.get("variant") in (None, want_variant)):
                return str(d["digest"])
    have = ", ".join(dict.fromkeys(seen)) or "nothing"
    raise ImageError(f"{what}: no image for {'/'.join(x for x in platform if x)} (it has: {have})")


@dataclass
class PullResult:
    image_id: str
    name: str
    fetched: int          # layers downloaded
    stored: int           # layers that were in the store already
    resumed: int          # downloads that went on from an interrupted pull


def pull(store: Store, ref: Reference, opts: Options, platform: str | None = None,
         bars: Bars = _no_bar) -> PullResult:
    reg = Registry(ref.host, opts)
    try:
        return _pull_with(reg, store, ref, parse_platform(platform), bars)
    finally:
        reg.close()


def _pull_with(reg: Registry, store: Store, ref: Reference, platform: tuple[str, str, str | None],
               bars: Bars) -> PullResult:
    repo, what = ref.repository, str(ref)
    data, media, _digest = _retrying(lambda: reg.manifest(repo, ref.reference), what)
    doc = _json(data, what)
    if media in INDEX_TYPES or (media not in (MANIFEST_TYPE, DOCKER_MANIFEST) and "manifests" in doc):
        chosen = choose_manifest(doc, platform, what)
        data, media, _digest = _retrying(lambda: reg.manifest(repo, chosen), what)
        doc = _json(data, what)
    if doc.get("schemaVersion") == 1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported")
    try:
        cdesc = doc["config"]
        layer_descs = [(str(d["digest"]), int(d["size"]), str(d.get("mediaType", ""))) for d in doc["layers"]]
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"{what}: malformed image manifest") from None
    config = _retrying(lambda: reg.blob_bytes(repo, str(cdesc["digest"]), 16 << 20), what)
    cfg = _json(config, f"{what}: config")
    try:
        diff_ids = [str(d) for d in cfg["rootfs"]["diff_ids"]]
    except (KeyError, TypeError):
        raise ImageError(f"{what}: the config has no rootfs.diff_ids") from None
    if len(diff_ids) != len(layer_descs):
        raise ImageError(f"{what}: {len(layer_descs)} layers but {len(diff_ids)} diff_ids in the config")
    layers = {diff_id: LayerRef("", digest, size, diff_id, mt)
              for diff_id, (digest, size, mt) in zip(diff_ids, layer_descs, strict=True)}
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    name = str(ref)
    resumed: list[str] = []

    def make(todo: list[str], work: Path) -> None:
        partial = store.partial_dir()

        def one(diff_id: str) -> None:
            layer = layers[diff_id]
            assert layer.digest is not None
            dest = partial / hexof(layer.digest)
            advance = bars(layer.digest[7:19], layer.size or 0)
            if _retrying(lambda: reg.fetch_blob(repo, str(layer.digest), dest, advance), what):
                resumed.append(diff_id)
            blob = work / f"{hexof(diff_id)}.blob"
            os.replace(dest, blob)
            store._unpack_layer(FileSource(), LayerRef(str(blob), layer.digest, layer.size, diff_id,
                                                      layer.media_type), work, None)

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for future in [pool.submit(one, d) for d in todo]:
                future.result()

    todo = store.add_images(list(layers), make, [(image_id, config, [name])])
    for diff_id in layers:
        store.note_source(diff_id, ref.repo_path())
    return PullResult(image_id, name, len(todo), len(layers) - len(todo), len(resumed))


def _json(data: bytes, what: str) -> Any:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    return doc


# ---------------------------------------------------------------------- push


@dataclass
class PushResult:
    digest: str
    uploaded: int         # blobs sent
    present: int          # blobs the registry had
    mounted: int          # blobs mounted from another repository


def push(store: Store, image: str, ref: Reference, opts: Options, chunk_size: int = 0,
         bars: Bars = _no_bar) -> PushResult:
    img = store.image(image)
    manifest = store.manifest_bytes(img.id)
    config_path = store.root / "images" / hexof(img.id) / "config.json"
    config = config_path.read_bytes()
    repo = ref.repository
    blobs: list[tuple[str, Path, int, list[str]]] = [(img.id, config_path, len(config), [])]
    for diff_id in img.diff_ids:
        info = store.layer_info(diff_id)
        blobs.append((str(info["digest"]), store.root / "layers" / f"{hexof(diff_id)}.blob",
                      int(info["blob_size"]), list(info.get("sources", []))))
    reg = Registry(ref.host, opts)
    counts = {"uploaded": 0, "present": 0, "mounted": 0}
    lock = threading.Lock()

    def one(digest: str, path: Path, size: int, sources: list[str]) -> None:
        what = f"{ref.repo_path()}: blob {digest}"
        if _retrying(lambda: reg.has_blob(repo, digest), what):
            outcome = "present"
        else:
            location = None
            same = [s.split("/", 1)[1] for s in sources
                    if s.split("/", 1)[0] == ref.registry and s != ref.repo_path()]
            if same:
                location = reg.mount_blob(repo, digest, same[-1])
            outcome = "mounted"
            if location is not None or not same:
                advance = bars(digest[7:19], size)
                _retrying(lambda: reg.upload_blob(repo, digest, path, size, chunk_size, location, advance),
                          what)
                outcome = "uploaded"
        with lock:
            counts[outcome] += 1

    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for future in [pool.submit(one, *b) for b in blobs]:
                future.result()
        digest = _retrying(lambda: reg.put_manifest(repo, ref.reference, manifest, MANIFEST_TYPE), str(ref))
    finally:
        reg.close()
    for diff_id in img.diff_ids:
        store.note_source(diff_id, ref.repo_path())
    return PushResult(digest, counts["uploaded"], counts["present"], counts["mounted"])


def login(registry: str, opts: Options) -> None:
    """Check *opts.creds* against *registry* (the challenge answered, ``GET /v2/`` allowed)."""
    reg = Registry(registry, opts)
    try:
        reg.ping()
        reg.check(reg.request("GET", "/v2/", ()), registry)
    finally:
        reg.close()


__all__ = ["Options", "PullResult", "PushResult", "Registry", "login", "pull", "push", "CONFIG_TYPE"]
