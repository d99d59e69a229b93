"""`unionfs images`, `unionfs image import|inspect|rm|prune|export`, `unionfs diff`, `unionfs commit`.

Thin: each command parses, calls the library (store, changes) and prints; an ImageError is one line.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from unionfs.core.errors import QuietError

from .containers import Containers, ago
from .store import Store, default_store, hexof

CONTEXT = {"help_option_names": ["-h", "--help"]}
F = TypeVar("F", bound=Callable[..., Any])


def store_option(fn: F) -> F:
    return click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
                        help="The image store (default /var/lib/unionfs; rootless: "
                             "$XDG_DATA_HOME/unionfs).")(fn)


def quiet(fn: F) -> F:
    """Library errors become one line (click's ClickException)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QuietError as e:
            raise click.ClickException(e.message) from None
        except OSError as e:
            raise click.ClickException(str(e)) from None
    return wrapper  # type: ignore[return-value]


def open_store(store_dir: str | None) -> Store:
    """The store, for a command that writes or reads layers and container layers: rootless with
    subordinate ids, from inside the user namespace that maps them (so that the files keep their
    image owners, shifted into your range, as rootless podman stores them)."""
    root = store_dir if store_dir is not None else str(default_store())   # before we become root
    if os.geteuid() != 0:
        try:
            from launcher.namespaces import enter_subordinate_namespace
        except ModuleNotFoundError:
            pass
        else:
            enter_subordinate_namespace()
    return Store(root)


@contextmanager
def progress_bar(what: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(advance, set_total) for a byte progress bar on a terminal; no output otherwise."""
    if not sys.stderr.isatty():
        yield (lambda n: None), (lambda n: None)
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        def total(n: int) -> None:
            bar.total = n
            bar.refresh()
        yield bar.update, total


@click.command("images", context_settings=CONTEXT)
@store_option
@quiet
def images_command(store_dir: str | None) -> None:
    """List the images in the store.

    \b
    Example:
        unionfs images
    """
    store = Store(store_dir)
    rows = [("NAME", "IMAGE ID", "CREATED", "LAYERS", "SIZE")]
    for img in store.images():
        size = sum(int(store.layer_info(d)["size"]) for d in img.diff_ids)
        for name in img.names or ["<none>"]:
            rows.append((name, hexof(img.id)[:12], str(img.config.get("created", ""))[:19],
                         str(len(img.diff_ids)), _human(size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


@click.group("image", context_settings=CONTEXT)
def image_group() -> None:
    """Import, inspect, remove and export images (see also `unionfs images`)."""


@image_group.command("import", context_settings=CONTEXT)
@store_option
@click.argument("source", type=click.Path(exists=True))
@click.argument("name", required=False)
@quiet
def import_command(store_dir: str | None, source: str, name: str | None) -> None:
    """Import the images of SOURCE: a `docker save`/`podman save` archive (docker-archive or
    oci-archive) or an OCI image-layout directory.  Without NAME every image in it, named as in
    it; with NAME the image it calls NAME (or its only image, then named NAME).

    \b
    Example:
        podman save -o busybox.tar busybox && unionfs image import busybox.tar
    """
    store = open_store(store_dir)
    if not store.keep_owners:
        click.echo("unionfs: rootless import: files will belong to you (owners in the image are not "
                   "kept: no /etc/subuid range, or no newuidmap) and device nodes are refused", err=True)
    with progress_bar("importing") as (advance, total):
        done = store.import_archive(source, name, progress=advance, on_total=total)
    for image_id, names in done:
        click.echo(f"{hexof(image_id)[:12]} {' '.join(names)}".rstrip())


@image_group.command("inspect", context_settings=CONTEXT)
@store_option
@click.argument("name")
@quiet
def inspect_command(store_dir: str | None, name: str) -> None:
    """Print an image as JSON: id, names, config, manifest and layer directories (top first).

    \b
    Example:
        unionfs image inspect busybox
    """
    store = Store(store_dir)
    img = store.image(name)
    doc = {"Id": img.id, "Names": img.names, "Config": img.config, "Manifest": img.manifest,
           "LayerDirs": [str(p) for p in store.layer_dirs(img.id)]}
    click.echo(json.dumps(doc, indent=2))


@image_group.command("rm", context_settings=CONTEXT)
@store_option
@click.argument("names", nargs=-1, required=True)
@quiet
def rm_command(store_dir: str | None, names: tuple[str, ...]) -> None:
    """Remove images (or one name of an image that has several), and the layers no other image uses.

    \b
    Example:
        unionfs image rm busybox
    """
    store = open_store(store_dir)
    for name in names:
        image_id, layers = store.remove(name)
        click.echo(f"{hexof(image_id)[:12]} removed {name} ({len(layers)} layers freed)")


@image_group.command("prune", context_settings=CONTEXT)
@store_option
@quiet
def prune_command(store_dir: str | None) -> None:
    """Remove leftovers of interrupted imports, unnamed images and layers no image uses.

    \b
    Example:
        unionfs image prune
    """
    tmp, images, layers = open_store(store_dir).prune()
    click.echo(f"removed {len(tmp)} temporary, {len(images)} unnamed images, {len(layers)} layers")


@image_group.command("export", context_settings=CONTEXT)
@store_option
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Archive to write.")
@click.option("--format", "fmt", type=click.Choice(["docker-archive", "oci-archive"]),
              default="docker-archive", show_default=True)
@quiet
def export_command(store_dir: str | None, name: str, output: str, fmt: str) -> None:
    """Write image NAME as an archive that `podman load` and `docker load` take.

    \b
    Example:
        unionfs image export mine -o mine.tar && podman load -i mine.tar
    """
    from .changes import export

    export(Store(store_dir), name, output, fmt)


@click.command("diff", context_settings=CONTEXT)
@store_option
@click.option("--image", "base", help="The image under the upper (its layers are the lowers).")
@click.option("--lower", "lowers", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="A lower layer directory (repeat, top first) instead of --image.")
@click.argument("target", metavar="CONTAINER|UPPER_DIR")
@quiet
def diff_command(store_dir: str | None, base: str | None, lowers: tuple[str, ...], target: str) -> None:
    """Print what `docker diff` prints (A added, C changed, D deleted) for a container of the store,
    or for the container layer UPPER_DIR over --image or --lower, reading only the container layer and
    one look-up below per path it holds.

    \b
    Example:
        unionfs diff my_container
        unionfs diff --image busybox ./upper
    """
    from .changes import container_diff

    store = open_store(store_dir)
    if base is None and not lowers:
        c = Containers(store).get(target)
        upper, dirs = str(c.upper), [str(p) for p in store.layer_dirs(c.image)]
    else:
        upper = _existing_dir(target)
        dirs = list(lowers) + ([str(p) for p in store.layer_dirs(base)] if base else [])
    for change in container_diff(upper, dirs):
        click.echo(str(change))


def _existing_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path!r} is not a directory", param_hint="UPPER_DIR")
    return path


@click.command("commit", context_settings=CONTEXT)
@store_option
@click.option("--image", "base", help="With UPPER_DIR: the image the upper was made on.")
@click.argument("target", metavar="CONTAINER|UPPER_DIR")
@click.argument("name")
@quiet
def commit_command(store_dir: str | None, base: str | None, target: str, name: str) -> None:
    """Make image NAME: the layers of the container's image plus its container layer as one new
    layer (the init layer is never in it); or, with --image BASE, BASE's layers plus UPPER_DIR.

    \b
    Example:
        unionfs commit my_container mine
        unionfs commit --image busybox ./upper mine
    """
    from .changes import commit

    store = open_store(store_dir)
    if base is None:
        c = Containers(store).get(target)
        image_id = commit(store, c.image, c.upper, name)
    else:
        image_id = commit(store, base, _existing_dir(target), name)
    click.echo(hexof(image_id)[:12])


@click.command("ps", context_settings=CONTEXT)
@store_option
@click.option("-a", "--all", "show_all", is_flag=True, help="All containers, not only the running ones.")
@click.option("-q", "--quiet", "ids_only", is_flag=True, help="Only the container ids.")
@quiet
def ps_command(store_dir: str | None, show_all: bool, ids_only: bool) -> None:
    """List the containers (-a: also those not running), as `podman ps`.

    \b
    Example:
        unionfs ps -a
    """
    now = time.time()
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for c in Containers(Store(store_dir)).list():
        status = c.status(now)
        if not show_all and not status.startswith("Up"):
            continue
        if ids_only:
            click.echo(c.id[:12])
            continue
        command = " ".join(c.command)
        command = command if len(command) <= 20 else command[:17] + "..."
        rows.append((c.id[:12], c.image_name, command, ago(now - c.created), status, c.name))
    if ids_only:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(col.ljust(w) for col, w in zip(r, widths, strict=True)).rstrip())


@click.command("rm", context_settings=CONTEXT)
@store_option
@click.option("-f", "--force", is_flag=True, help="Remove a running container too (its run is killed).")
@click.argument("containers", nargs=-1, required=True)
@quiet
def container_rm_command(store_dir: str | None, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (by name, id or id prefix) and their container layers.

    \b
    Example:
        unionfs rm my_container
    """
    store = Containers(open_store(store_dir))
    failed = None
    for ref in containers:
        try:
            store.remove(ref, force)
        except QuietError as e:
            click.echo(f"unionfs: {e.message}", err=True)
            failed = e
            continue
        click.echo(ref)
    if failed is not None:
        sys.exit(failed.exitcode)
# ---------------------------------------------------------------------- registries


def registry_options(fn: F) -> F:
    """--tls-verify, --cert-dir, --creds, --authfile: as podman spells them."""
    for opt in reversed([
        click.option("--tls-verify", type=click.BOOL, default=True, show_default=True,
                     help="Verify the registry's TLS certificate; false also allows plain HTTP for "
                          "this registry (as podman)."),
        click.option("--cert-dir", type=click.Path(file_okay=False), default=None,
                     help="CA certificates (*.crt) and client keys (*.cert, *.key) for the registry "
                          "(default /etc/containers/certs.d/HOST:PORT)."),
        click.option("--creds", default=None, metavar="USER:PASSWORD",
                     help="Credentials to use instead of those of `unionfs login`."),
        click.option("--authfile", type=click.Path(dir_okay=False), default=None,
                     help="Credentials file (default: podman's auth.json, then ~/.docker/config.json; "
                          "or $REGISTRY_AUTH_FILE)."),
    ]):
        fn = opt(fn)
    return fn


def _options(tls_verify: bool, cert_dir: str | None, creds: str | None, authfile: str | None) -> Any:
    from .auth import parse_creds
    from .registry import Options

    return Options(tls_verify=tls_verify, cert_dir=cert_dir, creds=parse_creds(creds) if creds else None,
                   authfile=authfile)


@contextmanager
def layer_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """One byte progress bar per layer (bytes, rate) on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda _what, _total: (lambda _n: None)
        return
    from tqdm import tqdm

    bars: list[Any] = []

    def bar(what: str, total: int) -> Callable[[int], None]:
        b = tqdm(desc=what, total=total or None, unit="B", unit_scale=True, unit_divisor=1024,
                 position=len(bars), leave=True)
        bars.append(b)
        return b.update  # type: ignore[no-any-return]

    try:
        yield bar
    finally:
        for b in bars:
            b.close()


@click.command("pull", context_settings=CONTEXT)
@store_option
@registry_options
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="The image to take from a multi-platform index (default: this machine's).")
@click.argument("ref")
@quiet
def pull_command(store_dir: str | None, tls_verify: bool, cert_dir: str | None, creds: str | None,
                 authfile: str | None, platform: str | None, ref: str) -> None:
    """Fetch image REF (registry/repository:tag or @sha256:...) from its registry into the store,
    layers the store has already skipped.  A name without a registry is docker.io's.

    \b
    Example:
        unionfs pull registry.example.com/team/app:1.2
    """
    from .auth import parse_reference
    from .registry import pull

    store = open_store(store_dir)
    with layer_bars() as bars:
        r = pull(store, parse_reference(ref), _options(tls_verify, cert_dir, creds, authfile), platform, bars)
    resumed = f", {r.resumed} resumed" if r.resumed else ""
    click.echo(f"{hexof(r.image_id)[:12]} {r.name} ({r.fetched} layers fetched, "
               f"{r.stored} already stored{resumed})")


@click.command("push", context_settings=CONTEXT)
@store_option
@registry_options
@click.option("--chunk-size", type=int, default=0, show_default=True, metavar="BYTES",
              help="Upload blobs in chunks of this many bytes (0: each blob in one request).")
@click.argument("image")
@click.argument("ref")
@quiet
def push_command(store_dir: str | None, tls_verify: bool, cert_dir: str | None, creds: str | None,
                 authfile: str | None, chunk_size: int, image: str, ref: str) -> None:
    """Upload IMAGE from the store to REF (registry/repository:tag); blobs the registry has are
    skipped, and mounted from another repository of it when the store knows one that holds them.

    \b
    Example:
        unionfs push mine registry.example.com/team/mine:1
    """
    from .auth import parse_reference
    from .registry import push

    with layer_bars() as bars:
        opts = _options(tls_verify, cert_dir, creds, authfile)
        r = push(open_store(store_dir), image, parse_reference(ref), opts, chunk_size, bars)
    click.echo(f"{r.digest} ({r.uploaded} blobs uploaded, {r.present} present, {r.mounted} mounted)")


@click.command("login", context_settings=CONTEXT)
@registry_options
@click.option("-u", "--username", default=None)
@click.option("-p", "--password", default=None, help="Better: --password-stdin or the prompt.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.argument("registry")
@quiet
def login_command(tls_verify: bool, cert_dir: str | None, creds: str | None, authfile: str | None,
                  username: str | None, password: str | None, password_stdin: bool, registry: str) -> None:
    """Check credentials against REGISTRY (host[:port]) and keep them where podman does
    ($XDG_RUNTIME_DIR/containers/auth.json, or --authfile).

    \b
    Example:
        printf %s "$TOKEN" | unionfs login -u me --password-stdin registry.example.com
    """
    from .auth import DOCKER_HUB, DOCKER_HUB_API, parse_creds, store_credentials
    from .registry import login

    if creds:
        username, password = parse_creds(creds)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    registry = registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    opts = _options(tls_verify, cert_dir, None, authfile)
    opts.creds = (username, password)
    login(DOCKER_HUB_API if registry == DOCKER_HUB else registry, opts)
    store_credentials(registry, username, password, authfile)
    click.echo("Login Succeeded!")


@click.command("logout", context_settings=CONTEXT)
@click.option("--authfile", type=click.Path(dir_okay=False), default=None)
@click.argument("registry")
@quiet
def logout_command(authfile: str | None, registry: str) -> None:
    """Forget the credentials of REGISTRY that `unionfs login` kept.

    \b
    Example:
        unionfs logout registry.example.com
    """
    from .auth import remove_credentials

    if remove_credentials(registry, authfile) is None:
        raise click.ClickException(f"not logged in to {registry}")
    click.echo(f"Removed login credentials for {registry}")
