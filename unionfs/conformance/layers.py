"""Random lower layers: a small, shrinkable description and the helpers that build it.

A :class:`LayerSpec` is a list of :class:`LayerEntry` (one object in one lower layer). It is built
from a seeded :class:`random.Random` over a tiny name pool (``a b c d`` up to three levels deep), so
layers collide with each other and with the operations: a file above a directory, a whiteout above a
file, an opaque directory above a populated one, hard links, symlinks, fifos, odd modes, owners and
``user.*`` xattrs.

The builder functions (``lay_*``) are plain functions of a list of layer roots ``L`` (top first) so
that the repro script printed on a failure can call exactly what the oracle ran. Whiteouts and opaque
markers are written in a *dialect*: ``overlay`` (0/0 character device, ``trusted.overlay.opaque=y``)
or ``aufs`` (``.wh.NAME`` file, ``.wh..wh..opq`` file).
"""

from __future__ import annotations

import logging
import os
import random
import stat
import subprocess
import zlib
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

NAMES = ("a", "b", "c", "d")
MAX_DEPTH = 3

#: Every object the builder makes gets a fixed mtime below this; see snapshot.mtime_class.
SYNTHETIC_EPOCH = 1_000_000_000

AUFS_WH = ".wh."
AUFS_OPQ = ".wh..wh..opq"
AUFS_REDIRECT = ".wh..wh..redirect"
OVERLAY_REDIRECT = "trusted.overlay.redirect"
OVERLAY_OPAQUE = "trusted.overlay.opaque"

FILE_MODES = (0o644, 0o644, 0o600, 0o755, 0o444, 0o4755, 0o640)
DIR_MODES = (0o755, 0o755, 0o700, 0o775, 0o1777, 0o555)
OWNERS = ((0, 0), (0, 0), (0, 0), (1000, 1000), (65534, 100))
class Rep(bytes):
    """Bytes made of a repeated unit, printed compactly (``b'0123456789' * 500``)."""

    unit: bytes
    times: int

    def __new__(cls, unit: bytes, count: int) -> Rep:
        self = super().__new__(cls, unit * count)
        self.unit = unit
        self.times = count
        return self

    def __repr__(self) -> str:
        return f"{self.unit!r} * {self.times}" if self.times != 1 else repr(self.unit)

    def __reduce__(self) -> tuple[object, ...]:
        return (Rep, (self.unit, self.times))


DATAS = (b"", b"x", b"lower", Rep(b"0123456789", 50))


class Oct(int):
    """An int that prints in octal, for modes in generated scripts."""

    def __repr__(self) -> str:
        return oct(self)


@dataclass(frozen=True)
class LayerEntry:
    """One object in one lower layer (0 = top lower layer)."""

    layer: int
    path: str
    kind: str  # file dir symlink hardlink whiteout opaque fifo redirect (a directory; target: the redirect)
    mode: int = 0o644
    owner: tuple[int, int] = (0, 0)
    data: bytes = b""
    target: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def code(self) -> str:
        """The builder call that creates this entry, as Python source."""
        p = (self.layer, self.path)
        if self.kind == "file":
            return (f"lay_file(L, {p[0]}, {p[1]!r}, {Oct(self.mode)!r}, {self.owner!r}, "
                    f"{self.data!r}, {dict(self.xattrs)!r})")
        if self.kind in ("dir", "opaque"):
            fn = "lay_dir" if self.kind == "dir" else "lay_opaque_dir"
            return f"{fn}(L, {p[0]}, {p[1]!r}, {Oct(self.mode)!r}, {self.owner!r}, {dict(self.xattrs)!r})"
        if self.kind == "redirect":
            return (f"lay_redirect_dir(L, {p[0]}, {p[1]!r}, {Oct(self.mode)!r}, {self.owner!r}, "
                    f"{dict(self.xattrs)!r}, {self.target!r})")
        if self.kind == "symlink":
            return f"lay_symlink(L, {p[0]}, {p[1]!r}, {self.target!r}, {self.owner!r})"
        if self.kind == "hardlink":
            return f"lay_hardlink(L, {p[0]}, {p[1]!r}, {self.target!r})"
        if self.kind == "whiteout":
            return f"lay_whiteout(L, {p[0]}, {p[1]!r})"
        if self.kind == "fifo":
            return f"lay_fifo(L, {p[0]}, {p[1]!r}, {Oct(self.mode)!r}, {self.owner!r})"
        raise ValueError(self.kind)


@dataclass
class LayerSpec:
    """The lower layers of one sequence: how many, and what is in them."""

    n_layers: int
    entries: list[LayerEntry] = field(default_factory=list)

    def fill(self, L: Layers) -> None:
        """Create the entries in ``L``: the same builder calls the repro script makes."""
        scope = globals()
        for entry in ordered_entries(self):
            eval(entry.code(), scope, {"L": L})

    def code(self) -> str:
        """The body of the repro script's ``layers(L)`` function."""
        return "\n".join(e.code() for e in ordered_entries(self)) or "pass"


class Fill(Protocol):
    """Anything that can fill a set of lower layers: a LayerSpec, or a repro script's layers."""

    @property
    def n_layers(self) -> int: ...

    def fill(self, L: Layers) -> None: ...


def random_path(rng: random.Random) -> str:
    depth = rng.choice((1, 1, 2, 2, 3))
    return "/".join(rng.choice(NAMES) for _ in range(depth))


ENTRY_KINDS = ("file", "dir", "symlink", "hardlink", "whiteout", "opaque", "fifo", "redirect")


def random_layers(rng: random.Random, n_layers: int, allow: set[str] | None = None,
                  redirects: bool = False) -> LayerSpec:
    """Draw a layer spec; deterministic for a given ``rng`` state. ``allow`` limits the entry kinds
    (the draws are the same; entries of other kinds are dropped, so sequences stay comparable).
    With *redirects* (``--redirect-dir``), some directories get a redirect (relative or absolute),
    as an upper written with redirect_dir=on and made a lower layer has."""
    spec = LayerSpec(n_layers)
    kinds = ["file"] * 10 + ["dir"] * 5 + ["symlink"] * 2 + ["hardlink"] * 2 + ["whiteout"] * 2 + [
        "opaque"] * 2 + ["fifo"]
    sources: set[str] = set()     # where redirects point
    for layer in range(n_layers):
        files: list[str] = []
        for _ in range(rng.randint(2, 8)):
            path = random_path(rng)
            kind = rng.choice(kinds)
            owner = rng.choice(OWNERS)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if rng.random() < 0.25:
                xattrs = (("user." + rng.choice("xy"), rng.choice((b"1", b"lower-value"))),)
            if kind == "file":
                files.append(path)
                spec.entries.append(LayerEntry(layer, path, kind, rng.choice(FILE_MODES), owner,
                                               rng.choice(DATAS), xattrs=xattrs))
            elif kind == "dir" and redirects and rng.random() < 0.4:
                target = rng.choice(NAMES) if rng.random() < 0.5 else "/" + random_path(rng)
                source = _redirect_source(path, target)
                kind = "dir" if source in sources else "redirect"     # one name per lower object
                sources.add(source)
                spec.entries.append(LayerEntry(layer, path, kind, rng.choice(DIR_MODES), owner,
                                               target=target if kind == "redirect" else "", xattrs=xattrs))
            elif kind in ("dir", "opaque"):
                spec.entries.append(LayerEntry(layer, path, kind, rng.choice(DIR_MODES), owner,
                                               xattrs=xattrs))
            elif kind == "symlink":
                target = rng.choice(NAMES) if rng.random() < 0.7 else "/".join(rng.sample(NAMES, 2))
                spec.entries.append(LayerEntry(layer, path, kind, 0o777, owner, target=target))
            elif kind == "hardlink":
                if files:
                    spec.entries.append(LayerEntry(layer, path, kind, target=rng.choice(files)))
            elif kind == "whiteout":
                spec.entries.append(LayerEntry(layer, path, kind))
            elif kind == "fifo":
                spec.entries.append(LayerEntry(layer, path, kind, rng.choice((0o644, 0o600)), owner))
    if allow is not None:
        spec.entries = [e for e in spec.entries if e.kind in allow]
    return spec


# --------------------------------------------------------------------------- builders
# Each takes L, the list of lower layer roots (top first) with a ``dialect`` attribute.


class Layers(list[str]):
    """Lower layer roots, top first, plus the whiteout dialect to write them in."""

    def __init__(self, roots: list[str], dialect: str = "overlay") -> None:
        super().__init__(roots)
        self.dialect = dialect


def _prepare(L: Layers, layer: int, path: str) -> str | None:
    """Make the parents of ``path`` in ``layer``; return its full path, or None if it cannot exist.

    A path is impossible when a parent is a non-directory, or the name is already taken.
    """
    root = L[layer]
    parts = path.split("/")
    cur = root
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            return None
    full = os.path.join(root, path)
    if os.path.lexists(full):
        return None
    if L.dialect == "aufs" and os.path.lexists(os.path.join(os.path.dirname(full), AUFS_WH + parts[-1])):
        return None
    return full


def _meta(full: str, mode: int, owner: tuple[int, int], xattrs: dict[str, bytes]) -> None:
    for name, value in xattrs.items():
        os.setxattr(full, name, value, follow_symlinks=False)
    os.chown(full, *owner, follow_symlinks=False)
    if not os.path.islink(full):
        os.chmod(full, mode)


def lay_file(L: Layers, layer: int, path: str, mode: int, owner: tuple[int, int], data: bytes,
             xattrs: dict[str, bytes]) -> None:
    full = _prepare(L, layer, path)
    if full is None:
        return
    with open(full, "xb") as f:
        f.write(data)
    _meta(full, mode, owner, xattrs)


def lay_dir(L: Layers, layer: int, path: str, mode: int, owner: tuple[int, int],
            xattrs: dict[str, bytes]) -> None:
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.mkdir(full)
    _meta(full, mode, owner, xattrs)


def lay_opaque_dir(L: Layers, layer: int, path: str, mode: int, owner: tuple[int, int],
                   xattrs: dict[str, bytes]) -> None:
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.mkdir(full)
    _make_opaque(L, full)
    _meta(full, mode, owner, xattrs)


def _make_opaque(L: Layers, full: str) -> None:
    if L.dialect == "aufs":
        if not os.path.lexists(os.path.join(full, AUFS_OPQ)):
            open(os.path.join(full, AUFS_OPQ), "xb").close()
    else:
        os.setxattr(full, OVERLAY_OPAQUE, b"y")


def lay_redirect_dir(L: Layers, layer: int, path: str, mode: int, owner: tuple[int, int],
                     xattrs: dict[str, bytes], redirect: str) -> None:
    """A directory with a redirect (-o redirect_dir): the overlay xattr, or the AUFS dialect's
    ``.wh..wh..redirect`` symlink."""
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.mkdir(full)
    if L.dialect == "aufs":
        os.symlink(redirect, os.path.join(full, AUFS_REDIRECT))
    else:
        os.setxattr(full, OVERLAY_REDIRECT, redirect.encode())
    _meta(full, mode, owner, xattrs)
    # Where the content came from is hidden in the same layer, as the rename that made the
    # redirect left it: a whiteout, or an opaque directory made there since (else two names would
    # reach one lower object, which overlayfs never makes).
    source = _redirect_source(path, redirect)
    there = os.path.join(L[layer], source)
    if os.path.isdir(there) and not os.path.islink(there):
        _make_opaque(L, there)
    else:
        lay_whiteout(L, layer, source)


def _redirect_source(path: str, redirect: str) -> str:
    """The path a directory at *path* with *redirect* came from."""
    if redirect.startswith("/"):
        return redirect[1:]
    return "/".join(filter(None, (os.path.dirname(path), redirect)))


def lay_symlink(L: Layers, layer: int, path: str, target: str, owner: tuple[int, int]) -> None:
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.symlink(target, full)
    os.chown(full, *owner, follow_symlinks=False)


def lay_hardlink(L: Layers, layer: int, path: str, target: str) -> None:
    src = os.path.join(L[layer], target)
    if not os.path.isfile(src) or os.path.islink(src):
        return
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.link(src, full)


def _is_opaque(L: Layers, full: str) -> bool:
    if L.dialect == "aufs":
        return os.path.lexists(os.path.join(full, AUFS_OPQ))
    try:
        return os.getxattr(full, OVERLAY_OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _merged(L: Layers, layer: int, dirpath: str) -> bool:
    """Roughly: is directory ``dirpath`` of ``layer`` merged with one below it?

    Only a merged directory hides the whiteouts in it; kernel overlayfs lists the raw entries of a
    directory that comes from one layer alone, whiteouts included (a stale whiteout then shows up in
    readdir but not in lookup). Real images never have such stale whiteouts, so the builder does
    not write them either.
    """
    if not dirpath:
        return True
    if not _merged(L, layer, os.path.dirname(dirpath)):
        return False
    for j in range(layer, len(L)):
        full = os.path.join(L[j], dirpath)
        if not os.path.lexists(full):
            continue
        if not os.path.isdir(full) or os.path.islink(full):
            return False
        if j > layer:
            return True
        if _is_opaque(L, full):
            return False
    return False


def lay_whiteout(L: Layers, layer: int, path: str) -> None:
    if not _merged(L, layer, os.path.dirname(path)):
        return
    full = _prepare(L, layer, path)
    if full is None:
        return
    if L.dialect == "aufs":
        d, name = os.path.split(full)
        open(os.path.join(d, AUFS_WH + name), "xb").close()
    else:
        os.mknod(full, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def lay_fifo(L: Layers, layer: int, path: str, mode: int, owner: tuple[int, int]) -> None:
    full = _prepare(L, layer, path)
    if full is None:
        return
    os.mkfifo(full)
    _meta(full, mode, owner, {})


def synthetic_time(rel: str) -> int:
    """A fixed, path-dependent mtime in nanoseconds (2001), recognisable as 'not now'."""
    return (SYNTHETIC_EPOCH + zlib.crc32(rel.encode()) % 100_000) * 1_000_000_000


def finish_layers(L: Layers, upper: str | None = None) -> None:
    """Give every object in the layers (and the upper root) a fixed mtime, deepest first."""
    roots = list(L) + ([upper] if upper else [])
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + dirnames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                t = synthetic_time(rel)
                os.utime(full, ns=(t, t), follow_symlinks=False)
        t = synthetic_time(".")
        os.utime(root, ns=(t, t))


def ordered_entries(spec: LayerSpec) -> list[LayerEntry]:
    """Entries in build order: shallow paths first, so parents get the entry's metadata; whiteouts
    last, once everything they may hide exists."""
    return sorted(spec.entries, key=lambda e: (e.kind == "whiteout", e.path.count("/"), e.layer))


@dataclass
class CopiedLayers:
    """Lower layers copied from existing directories (top first), with ``cp -a`` (owners, modes,
    xattrs, hard links, devices and whiteouts kept)."""

    sources: list[str]

    @property
    def n_layers(self) -> int:
        return len(self.sources)

    def fill(self, L: Layers) -> None:
        for src, dst in zip(self.sources, L, strict=True):
            res = subprocess.run(["cp", "-a", "--", os.path.join(src, "."), dst],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise OSError(f"cp -a {src}: {res.stderr.strip()}")


def build_layers(spec: Fill, base: str, dialect: str) -> Layers:
    """Create ``base/l0 .. l{n-1}`` and fill them in ``dialect``; return them top first."""
    roots = []
    for i in range(spec.n_layers):
        root = os.path.join(base, f"l{i}")
        os.mkdir(root, 0o755)
        roots.append(root)
    L = Layers(roots, dialect)
    spec.fill(L)
    return L
