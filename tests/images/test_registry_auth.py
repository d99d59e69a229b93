"""Registry auth and TLS for `unionfs pull`/`push`/`login`: htpasswd (Basic) and token (Bearer, a token
server run here) auth on a real docker-registry, credentials from --creds, `unionfs login`'s
auth.json and docker's config.json, and TLS with a CA made here."""
from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from images_util import cli, docker_archive, layer_tar, store_state
from registry_util import PASSWORD, USER, Registry, running_registry
from test_registry_pull import BASE, TOP, one_line_error

CREDS = f"{USER}:{PASSWORD}"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding image `seed`."""
    d = tmp_path_factory.mktemp("authseed")
    docker_archive(d / "seed.tar", [([layer_tar(BASE), layer_tar(TOP)], ["localhost/seed:latest"])], "gzip")
    cli("image", "import", str(d / "seed.tar"), store=d / "store")
    return d / "store"


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("reg-htpasswd"), auth="htpasswd") as r:
        yield r


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("reg-token"), auth="token") as r:
        yield r


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("reg-tls"), tls=True) as r:
        yield r


def login(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([util.program("unionfs"), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


def test_htpasswd_401_without_credentials_then_creds_login_and_logout(basic: Registry, source: Path,
                                                                       tmp_path: Path) -> None:
    ref = f"{basic.host}/auth/seed:1"
    r = cli("push", "--tls-verify=false", "seed", ref, store=source, check=False)
    one_line_error(r, "401", f"unionfs login {basic.host}")
    cli("push", "--tls-verify=false", "--creds", CREDS, "seed", ref, store=source)
    store = tmp_path / "s"
    r = cli("pull", "--tls-verify=false", ref, store=store, check=False)
    one_line_error(r, "authentication required (401")
    assert not store.exists() or not os.listdir(store / "images")
    r = cli("pull", "--tls-verify=false", "--creds", f"{USER}:wrong", ref, store=store, check=False)
    one_line_error(r, "401", "refused")
    # login checks the password, then writes podman's auth.json format where it is told
    authfile = tmp_path / "auth.json"
    r = login("login", "--tls-verify=false", "--authfile", str(authfile), "-u", USER, "--password-stdin",
              basic.host, stdin="wrong\n")
    one_line_error(r, "401")
    assert not authfile.exists()
    r = login("login", "--tls-verify=false", "--authfile", str(authfile), "-u", USER, "--password-stdin",
              basic.host, stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    entry = json.loads(authfile.read_text())["auths"][basic.host]
    assert base64.b64decode(entry["auth"]).decode() == CREDS
    assert oct(authfile.stat().st_mode & 0o777) == "0o600"
    cli("pull", "--tls-verify=false", "--authfile", str(authfile), ref, store=store)
    # $REGISTRY_AUTH_FILE is read too, and so is a docker config.json
    env = dict(os.environ, REGISTRY_AUTH_FILE=str(authfile))
    r = login("pull", "--store", str(tmp_path / "s2"), "--tls-verify=false", ref, env=env)
    assert r.returncode == 0 and "2 layers fetched" in r.stdout, r.stderr
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker/config.json").write_text(json.dumps({"auths": {f"https://{basic.host}": entry}}))
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE",)}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    r = login("pull", "--store", str(tmp_path / "s3"), "--tls-verify=false", ref, env=env)
    assert r.returncode == 0, r.stderr
    r = login("logout", "--authfile", str(authfile), basic.host)
    assert r.returncode == 0 and basic.host not in json.loads(authfile.read_text())["auths"]
    one_line_error(login("logout", "--authfile", str(authfile), basic.host), "not logged in")


def test_bearer_tokens_anonymous_pull_and_authenticated_push(token: Registry, source: Path,
                                                             tmp_path: Path) -> None:
    assert token.token_server is not None
    ref = f"{token.host}/bearer/seed:1"
    r = cli("push", "--tls-verify=false", "seed", ref, store=source, check=False)
    one_line_error(r, "401")
    cli("push", "--tls-verify=false", "--creds", CREDS, "seed", ref, store=source)
    assert (USER, ["repository:bearer/seed:pull,push"]) in token.token_server.requests
    r = cli("pull", "--tls-verify=false", ref, store=tmp_path / "s")
    assert "2 layers fetched" in r.stdout
    assert (None, ["repository:bearer/seed:pull"]) in token.token_server.requests
    r = cli("pull", "--tls-verify=false", "--creds", f"{USER}:wrong", ref, store=tmp_path / "s", check=False)
    one_line_error(r, "token server refused", USER)


def test_tls_with_a_ca_of_its_own(tls: Registry, source: Path, tmp_path: Path) -> None:
    ref = f"{tls.host}/tls/seed:1"
    store = tmp_path / "s"
    r = cli("push", "seed", ref, store=source, check=False)
    one_line_error(r, "certificate not trusted", "--cert-dir")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes((tls.certs / "ca.crt").read_bytes())
    cli("push", "--cert-dir", str(certs), "seed", ref, store=source)
    cli("pull", "--cert-dir", str(certs), ref, store=store)
    before = store_state(store)
    r = cli("pull", f"{tls.host}/tls/seed:1", store=store, check=False)
    one_line_error(r, "certificate not trusted")
    assert store_state(store) == before
    # --tls-verify=false: HTTPS without the check (no fall back to HTTP needed)
    r = cli("pull", "--tls-verify=false", ref, store=tmp_path / "s2")
    assert "2 layers fetched" in r.stdout
