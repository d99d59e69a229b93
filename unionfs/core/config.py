"""What to mount: branch specs and -o options parsed and checked before anything is mounted.

Two styles reach one `MountConfig`:
- AUFS: ``A:B:C`` top first, each optionally ``=rw``/``=ro``/``=rr``; without modes the first branch
  is writable and the rest read-only.  Default whiteout dialect: aufs.
- overlay: ``-o lowerdir=L1:L2,upperdir=U,workdir=W`` (lowerdir top first; no upperdir: read-only).
  Default whiteout dialect: overlay.

Every problem is a `QuietError` naming the culprit in one line.
"""
from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from typing import Any, NamedTuple

from .errors import QuietError

# This module is imported by `unionfs mount`'s fast path (`unionfs.server.fastmount`) before
# anything else: it keeps to the modules every start-up loads anyway (no logging, no dataclasses).


class Dialect(enum.Enum):
    """How whiteouts and opaque directories are written (see `unionfs.core.whiteout`)."""

    AUFS = "aufs"
    OVERLAY = "overlay"


#: Default ceiling on the entries of all kept listings and snapshots (about 200 bytes each).
DEFAULT_MAX_ENTRIES = 1_000_000

# mount(8) and FUSE options that make no difference to the union; accepted and ignored.
GENERIC_OPTIONS = frozenset({
    "rw", "atime", "noatime", "relatime",
    "strictatime", "diratime", "nodiratime", "sync", "async", "auto", "noauto", "user", "nouser",
    "users", "defaults", "_netdev", "nofail", "default_permissions", "lazytime", "nolazytime",
    "silent", "loud",
})
# Mount flags handed to the kernel with the FUSE mount (libfuse's default is nosuid,nodev; as
# non-root, fusermount3 forces nosuid,nodev whatever we ask).
MOUNT_FLAGS = {"suid": "nosuid", "dev": "nodev", "exec": "noexec"}
FLAG_OPTIONS = frozenset({*MOUNT_FLAGS, *MOUNT_FLAGS.values()})
KNOWN_OPTIONS = frozenset({
    "lowerdir", "upperdir", "workdir", "whiteout", "ro", "allow_other", "allow_root", "timeout",
    "fsname", "subtype", "debug", "max_cached_entries", "udba", "udba_max_watches", "metacopy",
    "redirect_dir", "passthrough", "writeback",
})
# fuse-overlayfs options that unionfs-overlay accepts without acting on them.
OVERLAY_IGNORED = frozenset({
    "squash_to_root", "squash_to_uid", "squash_to_gid", "static_nlink", "noxattrs", "xattr_permissions",
    "fast_ino", "plugins", "noacl", "uidmapping", "gidmapping", "volatile", "index",
    "userxattr", "context", "fscontext", "defcontext", "rootcontext", "max_read",
    "threaded", "auto_unmount",
})
# Options that mean nothing without a value (``upperdir`` alone would silently mount read-only).
VALUE_OPTIONS = frozenset({"lowerdir", "upperdir", "workdir", "whiteout", "timeout", "fsname", "subtype",
                           "max_cached_entries", "udba", "udba_max_watches", "metacopy", "redirect_dir",
                           "passthrough"})
UDBA_MODES = ("none", "reval", "notify")
#: Branch directories -o udba=notify watches at most, unless told (each costs the kernel about 1 KiB).
DEFAULT_MAX_WATCHES = 16384
ON_OFF = {"on": True, "off": False}
#: ``-o redirect_dir=``, as overlayfs spells it: on (renamed merged directories get a redirect, and
#: redirects are followed), follow (followed, never made), nofollow (a redirect met in a lookup is
#: refused with EPERM, as overlayfs does), off (the default: none made, none followed).
REDIRECT_DIR_VALUES = ("on", "follow", "nofollow", "off")
#: writeback alone, or fuse-overlayfs' writeback=1 and writeback=0
WRITEBACK = {None: True, "1": True, "on": True, "0": False, "off": False}
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 1e9  # about 31 years: longer is no different, and the kernel takes seconds as integers
MAX_CACHED_ENTRIES = 1 << 40   # more than any memory holds: no ceiling in practice
BRANCH_MODES = {"rw": True, "ro": False, "rr": False, "ro+wh": False, "rr+wh": False}


class MountConfig:
    """Everything `serve` needs.  *branches* are (absolute path, writable), top first.

    *max_cached_entries* is the ceiling on the entries of the directory listings the daemon keeps
    (see `listings`); *flags* are suid/nosuid, dev/nodev, exec/noexec as asked, the last of each pair
    only (default nosuid,nodev); *metacopy*: ``-o metacopy=on`` (see `unionfs.core.metacopy`).
    """

    def __init__(self, branches: list[tuple[str, bool]], mountpoint: str, workdir: str | None = None,
                 style: str = "aufs", dialect: Dialect = Dialect.AUFS, readonly: bool = False,
                 allow_other: bool = False, timeout: float = 60.0, fsname: str = "unionfs",
                 max_cached_entries: int = DEFAULT_MAX_ENTRIES, ignored: list[str] | None = None,
                 flags: list[str] | None = None, udba: str = "none",
                 udba_max_watches: int = DEFAULT_MAX_WATCHES, metacopy: bool = False,
                 redirect_dir: str = "off", passthrough: bool = True, writeback: bool = False) -> None:
        self.branches = branches
        self.mountpoint = mountpoint
        self.workdir = workdir
        self.style = style
        self.dialect = dialect
        self.readonly = readonly
        self.allow_other = allow_other
        self.timeout = timeout
        self.fsname = fsname
        self.max_cached_entries = max_cached_entries
        self.ignored = [] if ignored is None else ignored
        self.flags = [] if flags is None else flags
        self.udba = udba
        self.udba_max_watches = udba_max_watches
        self.metacopy = metacopy
        self.redirect_dir = redirect_dir
        self.passthrough = passthrough
        self.writeback = writeback

    def __repr__(self) -> str:
        return f"MountConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def fields(self) -> dict[str, Any]:
        """Every attribute as plain data (JSON or a Python literal), as `from_fields` takes it back:
        the one encoding of a config sent to a server, so a new option needs nothing here."""
        fields = dict(vars(self))
        fields["dialect"] = self.dialect.value
        fields["branches"] = [[path, writable] for path, writable in self.branches]
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> MountConfig:
        """The config `fields` made (a field a sender of an older build did not know keeps its default)."""
        fields = dict(fields)
        fields["dialect"] = Dialect(fields["dialect"])
        fields["branches"] = [(str(path), bool(writable)) for path, writable in fields["branches"]]
        return cls(**fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MountConfig) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def writable(self) -> bool:
        return bool(self.branches) and self.branches[0][1] and not self.readonly


def flag_notes(cfg: MountConfig) -> list[str]:
    """What the user asked for that this mount cannot give, one line each (said by the CLI)."""
    wanted = [f for f in cfg.flags if f in ("suid", "dev")]
    if os.geteuid() != 0 and wanted:
        return [f"-o {','.join(wanted)} ignored: fusermount3 mounts nosuid,nodev for users other than root"]
    return []


def split_escaped(text: str, sep: str, keep_escapes: bool = False) -> list[str]:
    """Split on *sep*, where a backslash escapes the next character (as overlayfs' options do).

    With *keep_escapes* the backslashes stay in the pieces, for a later split on another separator.
    """
    out: list[str] = []
    cur: list[str] = []
    it = iter(text)
    for ch in it:
        if ch == "\\":
            if keep_escapes:
                cur.append(ch)
            cur.append(next(it, ""))
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_options(opts: list[str] | tuple[str, ...]) -> list[tuple[str, str | None]]:
    """``-o a=b,c`` (possibly several -o) -> [(a, b), (c, None)], keeping escaped commas."""
    out: list[tuple[str, str | None]] = []
    for group in opts:
        # Escapes stay in place for path values, which split_escaped() decodes later.
        for item in split_escaped(group, ",", keep_escapes=True):
            if not item:
                continue
            key, eq, value = item.partition("=")
            out.append((key, value if eq else None))
    return out


class BranchSpec(NamedTuple):
    """One branch of a branch list as written: its path and its mode (None: by its place)."""

    path: str
    mode: str | None = None


def parse_branch_spec(spec: str) -> list[BranchSpec]:
    """``A=rw:B:C=ro`` -> [(A, 'rw'), (B, None), (C, 'ro')].

    ``\\:`` escapes a colon in a path; ``=MODE`` is a mode only when MODE has no ``/`` (``/a=b/c``
    is a path).
    """
    out: list[BranchSpec] = []
    for part in split_escaped(spec, ":"):
        if not part:
            raise QuietError(f"empty branch in {spec!r}")
        path, eq, mode = part.rpartition("=")
        if eq and mode in BRANCH_MODES:
            out.append(BranchSpec(path, mode))
        elif eq and "/" not in mode and mode:
            raise QuietError(f"unknown branch mode {mode!r} in {part!r} (use rw, ro or rr)")
        else:
            out.append(BranchSpec(part))
    return out


def format_branch_spec(specs: Sequence[BranchSpec]) -> str:
    """The branch list `parse_branch_spec` reads back as *specs* (``\\`` and ``:`` escaped)."""
    def one(b: BranchSpec) -> str:
        path = b.path.replace("\\", "\\\\").replace(":", "\\:")
        return f"{path}={b.mode}" if b.mode else path
    return ":".join(one(b) for b in specs)


def writable_branches(specs: Sequence[BranchSpec], top: bool = True,
                      readonly: bool = False) -> list[tuple[str, bool]]:
    """(absolute path, writable) for each of *specs*: without a mode, the first is writable and the
    rest read-only.  *top*: whether the first of *specs* is the union's top branch (only that one
    can be writable).  *readonly* (``-o ro``): the top is writable only when asked for (``A=rw``),
    and is then opened for writing, for a later remount read-write; a branch merely left at the
    default is not."""
    branches = []
    for i, (path, mode) in enumerate(specs):
        first = top and i == 0
        writable = (first and not readonly) if mode is None else BRANCH_MODES[mode]
        if writable and not first:
            raise QuietError(f"branch {path!r}: only the top branch can be writable")
        branches.append((_abs(path), writable))
    return branches


def parse_branches(spec: str, top: bool = True) -> list[BranchSpec]:
    """Parse and check a branch list before anything is mounted (``unionfs run``'s own): each an
    existing directory, none given twice or inside another, only the top one writable (*top*: as in
    `writable_branches`).  Paths come back absolute."""
    specs = parse_branch_spec(spec)
    branches = writable_branches(specs, top)
    _check_branches(branches, "aufs")
    return [BranchSpec(path, mode) for (path, _), (_, mode) in zip(branches, specs, strict=True)]


def build_config(branch_spec: str | Sequence[BranchSpec] | None, mountpoint: str,
                 options: list[str] | tuple[str, ...], strict: bool = True) -> MountConfig:
    """Parse and check.  *branch_spec*: ``A:B`` as `parse_branch_spec` reads it, or its result.
    With *strict* false (unionfs-overlay), unknown options are only listed."""
    parsed = parse_options(options)
    values: dict[str, str | None] = {}
    ignored: list[str] = []
    flags: dict[str, str] = {}
    for key, value in parsed:
        if key in VALUE_OPTIONS and value is None:
            raise QuietError(f"option {key} needs a value ({key}=...)")
        if key in KNOWN_OPTIONS:
            values[key] = value
        elif key in FLAG_OPTIONS and value is None:
            flags[key.removeprefix("no")] = key
        elif key in GENERIC_OPTIONS or key.startswith("x-"):
            continue
        elif not strict:
            ignored.append(key if value is None else f"{key}={value}")
        else:
            raise QuietError(f"unknown option {key!r}")

    overlay = "lowerdir" in values
    if overlay and branch_spec is not None:
        raise QuietError("give either BRANCHES or -o lowerdir=..., not both")
    if not overlay and branch_spec is None:
        raise QuietError("no branches: give BRANCHES (A:B) or -o lowerdir=...")
    for key in ("upperdir", "workdir"):
        if key in values and not overlay:
            raise QuietError(f"option {key} needs lowerdir (overlay style)")

    workdir: str | None = None
    if overlay:
        lowers = [p for p in split_escaped(values.get("lowerdir") or "", ":")]
        if not lowers or any(not p for p in lowers):
            raise QuietError("lowerdir is empty or has an empty entry")
        upper = values.get("upperdir")
        work = values.get("workdir")
        if upper is not None and not work:
            raise QuietError("upperdir needs workdir")
        if work is not None and upper is None:
            raise QuietError("workdir needs upperdir")
        branches = ([(_abs(upper), True)] if upper else []) + [(_abs(p), False) for p in lowers]
        workdir = _abs(work) if work else None
        style, dialect = "overlay", Dialect.OVERLAY
    else:
        assert branch_spec is not None
        specs = parse_branch_spec(branch_spec) if isinstance(branch_spec, str) else branch_spec
        branches = writable_branches(specs, readonly="ro" in values)
        style, dialect = "aufs", Dialect.AUFS

    if "whiteout" in values:
        try:
            dialect = Dialect(values["whiteout"])
        except ValueError:
            msg = f"whiteout={values['whiteout']}: use whiteout=aufs or whiteout=overlay"
            raise QuietError(msg) from None
    # Branches change only through the mount (the kernel is told of everything else we do), so the
    # kernel may keep names and attributes long: warm metadata then costs no request at all.
    timeout = DEFAULT_TIMEOUT
    if values.get("timeout") is not None:
        try:
            timeout = float(values["timeout"])  # type: ignore[arg-type]
            if not 0 <= timeout <= MAX_TIMEOUT:  # also false for nan
                raise ValueError
        except ValueError:
            raise QuietError(f"timeout={values['timeout']}: give a number of seconds from 0 to "
                             f"{MAX_TIMEOUT:.0f}") from None
    max_entries = DEFAULT_MAX_ENTRIES
    if values.get("max_cached_entries") is not None:
        text = values["max_cached_entries"] or ""
        if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_CACHED_ENTRIES:
            raise QuietError(f"max_cached_entries={text}: give a whole number of entries from 1 to "
                             f"{MAX_CACHED_ENTRIES}")
        max_entries = int(text)
    udba = values.get("udba") or "none"
    if udba not in UDBA_MODES:
        raise QuietError(f"udba={udba}: use udba=none, udba=reval or udba=notify")
    max_watches = DEFAULT_MAX_WATCHES
    if values.get("udba_max_watches") is not None:
        text = values["udba_max_watches"] or ""
        if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 1 << 31:
            raise QuietError(f"udba_max_watches={text}: give a whole number of branch directories "
                             f"from 0 to {1 << 31}")
        max_watches = int(text)
    metacopy = _metacopy(values.get("metacopy"), parsed)
    passthrough = values.get("passthrough", "on")
    if passthrough not in ON_OFF:
        raise QuietError(f"passthrough={passthrough}: use passthrough=on or passthrough=off")
    if values.get("writeback", "0") not in WRITEBACK:
        raise QuietError(f"writeback={values['writeback']}: use writeback, writeback=1 or writeback=0")
    fsname = values.get("fsname") or "unionfs"
    if not fsname.isascii() or not fsname.isprintable() or any(c in fsname for c in " ,\\"):
        raise QuietError(f"fsname={fsname!r}: use printable ASCII without spaces, commas or backslashes")
    redirect_dir = values.get("redirect_dir") or "off"
    if redirect_dir not in REDIRECT_DIR_VALUES:
        raise QuietError(f"redirect_dir={redirect_dir}: use one of {', '.join(REDIRECT_DIR_VALUES)}")
    if metacopy:
        redirect_dir = "on"     # as overlayfs: metacopy needs redirects (other values refused above)
    cfg = MountConfig(
        branches=branches, mountpoint=_abs(mountpoint), workdir=workdir, style=style, dialect=dialect,
        readonly="ro" in values, allow_other="allow_other" in values or "allow_root" in values,
        timeout=timeout, fsname=fsname, max_cached_entries=max_entries, ignored=ignored,
        flags=list(flags.values()), udba=udba, udba_max_watches=max_watches, metacopy=metacopy,
        redirect_dir=redirect_dir, passthrough=ON_OFF[passthrough],
        writeback=WRITEBACK[values.get("writeback", "0")],
    )
    check(cfg)
    return cfg


def _metacopy(value: str | None, parsed: list[tuple[str, str | None]]) -> bool:
    """``metacopy=on|off`` as overlayfs reads it: on needs redirect_dir=on (which overlayfs then turns
    on), so any other ``redirect_dir=`` given with it is a conflict."""
    if value is None:
        return False
    if value not in ON_OFF:
        raise QuietError(f"metacopy={value}: use metacopy=on or metacopy=off")
    redirect = [v for k, v in parsed if k == "redirect_dir"]
    if ON_OFF[value] and redirect and redirect[-1] != "on":
        raise QuietError(f"conflicting options: metacopy=on,redirect_dir={redirect[-1]}")
    return ON_OFF[value]


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _dir_stat(what: str, path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QuietError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise QuietError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"{what} {path!r} is not a directory")
    return st


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_branches(branches: list[tuple[str, bool]], style: str
                    ) -> tuple[dict[tuple[int, int], str], list[tuple[str, str]]]:
    """Check the branches exist, are directories, are distinct and do not nest; their (dev, ino)
    and their (path, real path)."""
    seen: dict[tuple[int, int], str] = {}
    real: list[tuple[str, str]] = []
    for path, writable in branches:
        what = "upperdir" if (style == "overlay" and writable) else \
            ("lowerdir" if style == "overlay" else "branch")
        st = _dir_stat(what, path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise QuietError(f"branch {path!r} is given twice (same directory as {seen[key]!r})")
        seen[key] = path
        real.append((path, os.path.realpath(path)))
    for a, ra in real:
        for b, rb in real:
            if a != b and _inside(ra, rb):
                raise QuietError(f"branch {a!r} is inside branch {b!r}")
    return seen, real


def check(cfg: MountConfig) -> None:
    """Check the branches, work dir and mount point exist, are distinct and do not nest."""
    seen, real = _check_branches(cfg.branches, cfg.style)
    if cfg.workdir is not None:
        wst = _dir_stat("workdir", cfg.workdir)
        upper = cfg.branches[0][0]
        ust = os.stat(upper)
        if wst.st_dev != ust.st_dev:
            raise QuietError(f"workdir {cfg.workdir!r} and upperdir {upper!r} are on different filesystems")
        rw, ru = os.path.realpath(cfg.workdir), os.path.realpath(upper)
        if _inside(rw, ru) or _inside(ru, rw):
            raise QuietError(f"workdir {cfg.workdir!r} and upperdir {upper!r} must not contain each other")
        if cfg.workdir in [p for p, _ in cfg.branches] or (wst.st_dev, wst.st_ino) in seen:
            raise QuietError(f"workdir {cfg.workdir!r} is also a branch")
    mst = _dir_stat("mountpoint", cfg.mountpoint)
    del mst
    rm = os.path.realpath(cfg.mountpoint)
    for path, rp in real:
        if _inside(rm, rp):
            raise QuietError(f"mountpoint {cfg.mountpoint!r} is inside branch {path!r}")
