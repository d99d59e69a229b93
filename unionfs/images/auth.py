"""Registry credentials where podman and docker keep them, and image references.

Read (as podman does): ``--authfile`` or ``$REGISTRY_AUTH_FILE`` alone when given; otherwise
``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/<uid>/auth.json`` without it),
``~/.config/containers/auth.json``, ``~/.docker/config.json``.  Written by ``unionfs login``: the
first of those (podman's own file), mode 0600, replaced atomically.  Entries are
``{"auths": {"host[:port]": {"auth": base64("user:password")}}}``; credential helpers are not used.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .unpack import ImageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    """``registry/repository:tag`` or ``registry/repository@sha256:...``, as docker spells them:
    a first component with a dot, a colon or ``localhost`` is the registry, otherwise docker.io (and
    a one-component name there is ``library/NAME``)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def host(self) -> str:
        """Where the registry answers (docker.io's API lives on another host)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """The tag or digest, as the manifest URL wants it."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.registry}/{self.repository}{tail}"

    def repo_path(self) -> str:
        return f"{self.registry}/{self.repository}"


def parse_reference(text: str) -> Reference:
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise ImageError(f"{text}: bad digest (want sha256: and 64 hex digits)")
    tag = None
    head, _, last = rest.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        if not TAG_RE.match(tag):
            raise ImageError(f"{text}: bad tag {tag!r}")
    rest = f"{head}/{last}" if head else last
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, remainder
    else:
        registry, repo = DOCKER_HUB, rest
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if not REPO_RE.match(repo):
        raise ImageError(f"{text}: bad repository name {repo!r} (lower case letters, digits, . _ - and /)")
    return Reference(registry, repo, tag if tag or digest else "latest", digest)


def auth_files(authfile: str | None) -> list[Path]:
    """The files to read credentials from, first found wins; the first is also where login writes."""
    given = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if given:
        return [Path(given)]
    run = os.environ.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
    home = Path(os.path.expanduser("~"))
    return [Path(run) / "containers" / "auth.json", home / ".config/containers/auth.json",
            home / ".docker/config.json"]


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: unreadable credentials file: {e}") from None
    if not isinstance(data, dict):
        raise ImageError(f"{path}: not a credentials file (want {{\"auths\": ...}})")
    return data


def _keys(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
            f"https://{registry}/v2/"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io"]
    return keys


def find_credentials(registry: str, authfile: str | None = None) -> tuple[str, str] | None:
    """(user, password) for *registry* from the first credentials file that has them."""
    for path in auth_files(authfile):
        auths = _read(path).get("auths")
        if not isinstance(auths, dict):
            continue
        for key in _keys(registry):
            entry = auths.get(key)
            if isinstance(entry, dict) and entry.get("auth"):
                return decode_auth(str(entry["auth"]), path)
    return None


def decode_auth(value: str, where: object) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(value).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        sep = ""
    if not sep:
        raise ImageError(f"{where}: malformed credentials (want base64 of user:password)")
    return user, password


def parse_creds(text: str) -> tuple[str, str]:
    """``--creds USER[:PASSWORD]`` (the password may contain colons)."""
    user, _, password = text.partition(":")
    if not user:
        raise ImageError("--creds: want USER:PASSWORD")
    return user, password


def store_credentials(registry: str, user: str, password: str, authfile: str | None = None) -> Path:
    """Write the credentials where podman keeps them; the file written."""
    path = auth_files(authfile)[0]
    data = _read(path)
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ImageError(f"{path}: \"auths\" is not an object")
    auths[registry] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    _write(path, data)
    return path


def remove_credentials(registry: str, authfile: str | None = None) -> Path | None:
    """Drop *registry*'s entry from the file login writes; that file, or None when it had none."""
    path = auth_files(authfile)[0]
    data = _read(path)
    auths = data.get("auths")
    if not isinstance(auths, dict) or not any(k in auths for k in _keys(registry)):
        return None
    for key in _keys(registry):
        auths.pop(key, None)
    _write(path, data)
    return path


def _write(path: Path, data: dict[str, object]) -> None:
    from .store import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)
    try:
        write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())
    finally:
        os.umask(old)
