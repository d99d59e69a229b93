"""Deep trees and a few xattr and mode details, each beside kernel overlayfs on the same layers.

Depth: a lower tree thousands of levels deep (its paths exceed PATH_MAX, so it is built, walked and
compared one name at a time relative to directory fds); a file at the bottom is appended to (copy-up of
every parent), another removed, a directory made, the bottom listed, and the writable branches compared
after unmount.  Also with the daemon allowed far fewer fds than levels: copying every parent up in
one request must not hold them all open.

Then: a file or fifo created by an unprivileged user keeps the set-id bits it asked for; xattr calls
on an open file whose name is gone work on the open file; overlay xattr names near the 255-byte limit,
bare namespaces (``trusted.overlay.`` too) and names in no namespace get the kernel's answers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import util
from util import D, F, Pair, Side, call

from unionfs.core.branches import clear_dir
from unionfs.core.whiteout import escape_xattr, unescape_xattr

pytestmark = pytest.mark.fuse

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHAINS = (b"append", b"remove", b"mkdir")
DEPTH = 2000          # the old code fails from ~975 levels on
DEEP_DEPTH = 10_000


# ------------------------------------------------------------------------------------------------ helpers


def build_chain(root: Path, top: bytes, depth: int) -> None:
    """root/top/d/d/.../d (depth levels below top) with files f and g at the bottom."""
    fd = os.open(root, DIR)
    try:
        os.mkdir(top, 0o755, dir_fd=fd)
        fd = _descend(fd, top)
        for _ in range(depth):
            os.mkdir(b"d", 0o755, dir_fd=fd)
            fd = _descend(fd, b"d")
        for name in (b"f", b"g"):
            w = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            try:
                os.write(w, b"bottom " + name + b"\n")
            finally:
                os.close(w)
    finally:
        os.close(fd)


def _descend(fd: int, name: bytes) -> int:
    """Open *name* under *fd* and close *fd*: one step down."""
    try:
        return os.open(name, DIR, dir_fd=fd)
    finally:
        os.close(fd)


@contextmanager
def bottom(root: Path | bytes, top: bytes, depth: int) -> Iterator[int]:
    """The directory at the bottom of a chain, reached one openat at a time."""
    fd = _descend(os.open(root, DIR), top)
    for _ in range(depth):
        fd = _descend(fd, b"d")
    try:
        yield fd
    finally:
        os.close(fd)


PRIVATE = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.", b"user.unionfs.")
OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque")


def tree(root: Path | bytes, *, branch: bool) -> list[tuple[Any, ...]]:
    """Everything below *root* as (depth, name, what the user sees), in a fixed order.

    With *branch*, *root* is a writable branch: whiteouts (0/0 devices) and opaque markers are
    normalised and bookkeeping xattrs dropped.  Works on fds, so any depth will do.
    """
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[int, bytes, int]] = [(0, b".", os.open(root, DIR))]
    while stack:
        depth, name, fd = stack.pop()
        try:
            xa = _xattrs(fd)
            opaque = any(xa.get(x) == b"y" for x in OPAQUE)
            if branch:
                xa = {k: v for k, v in xa.items() if not k.startswith(PRIVATE)}
            out.append((depth, name, "dir", oct(stat.S_IMODE(os.fstat(fd).st_mode)), xa,
                        opaque and branch))
            dirs = []
            for kid in sorted(os.fsencode(n) for n in os.listdir(fd)):
                st = os.stat(kid, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(kid)
                else:
                    out.append((depth + 1, kid, _describe(fd, kid)))
            for kid in reversed(dirs):
                stack.append((depth + 1, kid, os.open(kid, DIR, dir_fd=fd)))
        finally:
            os.close(fd)
    return out


def _describe(dirfd: int, name: bytes) -> tuple[Any, ...]:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return ("whiteout",)
    if stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        return ("file", oct(stat.S_IMODE(st.st_mode)), hashlib.sha256(data).hexdigest())
    return (stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)))


def _xattrs(fd: int) -> dict[bytes, bytes]:
    return {os.fsencode(n): os.getxattr(fd, n) for n in os.listxattr(fd)}


def assert_same_list(kernel: list[tuple[Any, ...]], impl: list[tuple[Any, ...]], what: str) -> None:
    if kernel == impl:
        return
    for i, (k, u) in enumerate(zip(kernel, impl, strict=False)):
        if k != u:
            raise AssertionError(f"{what}: entry {i} differs:\n  kernel:  {k}\n  unionfs: {u}")
    raise AssertionError(f"{what}: kernel has {len(kernel)} entries, unionfs {len(impl)}")


def run_deep(pair: Pair, depth: int) -> None:
    pair.build([[]], upper=[], mount=False)
    try:
        _run_deep(pair, depth)
    finally:
        try:
            pair.unmount()
        finally:
            remove_branches(pair)


def remove_branches(pair: Pair) -> None:
    """Remove the deep branches now: pytest's own clean-up of old temporary directories recurses
    per level and would fail on them."""
    for side in pair.sides:
        remove_deep(*side.lowers, *(p for p in (side.upper, side.work) if p is not None))
        side.lowers = []
    pair.lower_digests.clear()


def remove_deep(*paths: Path) -> None:
    """rm -rf, which goes to any depth (never crossing into a mount point)."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", *map(str, paths)], check=True, timeout=300)


def _run_deep(pair: Pair, depth: int) -> None:
    for side in pair.sides:
        for top in CHAINS:
            build_chain(side.lowers[0], top, depth)
    # The lower is too deep for the pair's path-based digest: compare it by fds instead.
    before = {side.lowers[0]: tree(side.lowers[0], branch=False) for side in pair.sides}
    for lp in before:
        pair.lower_digests.pop(lp, None)
    pair.mount()

    def append(s: Side) -> Any:
        with bottom(s.mnt, b"append", depth) as fd:
            w = os.open(b"f", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
            try:
                os.write(w, b"appended\n")
            finally:
                os.close(w)
            r = os.open(b"f", os.O_RDONLY, dir_fd=fd)
            try:
                return os.read(r, 100)
            finally:
                os.close(r)

    def remove(s: Side) -> Any:
        with bottom(s.mnt, b"remove", depth) as fd:
            os.unlink(b"f", dir_fd=fd)
            return sorted(os.listdir(fd))

    def mkdir(s: Side) -> Any:
        with bottom(s.mnt, b"mkdir", depth) as fd:
            os.mkdir(b"new", 0o750, dir_fd=fd)
            sub = os.open(b"new", DIR, dir_fd=fd)
            try:
                os.close(os.open(b"inside", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=sub))
                return sorted(os.listdir(fd)), os.listdir(sub)
            finally:
                os.close(sub)

    assert pair.same(append, "append at the bottom") == b"bottom f\nappended\n"
    assert pair.same(remove, "unlink at the bottom") == ["g"]
    assert pair.same(mkdir, "mkdir at the bottom") == (["f", "g", "new"], ["inside"])
    for top in CHAINS:
        pair.same(lambda s, top=top: call(_listing, s, top, depth), f"listing of {top!r}")
    assert_same_list(tree(pair.k.mnt, branch=False), tree(pair.u.mnt, branch=False), "visible tree")
    pair.unmount()
    assert pair.k.upper is not None and pair.u.upper is not None
    assert_same_list(tree(pair.k.upper, branch=True), tree(pair.u.upper, branch=True), "upper branch")
    for lp, was in before.items():
        assert tree(lp, branch=False) == was, f"lower branch {lp} changed"


def _listing(s: Side, top: bytes, depth: int) -> list[str]:
    with bottom(s.mnt, top, depth) as fd:
        return sorted(os.listdir(fd))


# ------------------------------------------------------------------------------------------------ depth


def test_copy_up_below_a_deep_tree(pair: Pair) -> None:
    """2,000 levels: append (copy-up of every parent), unlink, mkdir and listings at the bottom."""
    run_deep(pair, DEPTH)


def test_clearing_a_deep_directory(tmp_path: Path) -> None:
    """Emptying a branch directory (rmdir over whiteouts, a stale work dir) goes to any depth."""
    build_chain(tmp_path, b"top", DEPTH)
    try:
        fd = os.open(tmp_path / "top", DIR)
        try:
            clear_dir(fd)
            assert os.listdir(fd) == []
        finally:
            os.close(fd)
    finally:
        remove_deep(tmp_path / "top")


@pytest.fixture
def fd_limit(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``fd_limit(n)``: daemons mounted from now on start with RLIMIT_NOFILE n (soft and hard), so
    they cannot raise it and size their cache of branch directories for n."""
    def limit(n: int) -> None:
        real = util.unionfs_cmd

        def limited(*args: Any, **kwargs: Any) -> list[str]:
            return ["prlimit", f"--nofile={n}:{n}", "--", *real(*args, **kwargs)]

        monkeypatch.setattr(util, "unionfs_cmd", limited)
    return limit


def test_copy_up_below_a_deep_tree_with_few_fds(pair: Pair, fd_limit: Callable[[int], None]) -> None:
    """2,000 levels with the daemon allowed 1,024 fds: copying the parents up in one request holds
    a few fds, not two per level."""
    fd_limit(1024)
    run_deep(pair, DEPTH)


def test_rename_deeper_down_with_few_fds(pair: Pair, fd_limit: Callable[[int], None]) -> None:
    """A lower file renamed 200 levels further down its tree, the daemon allowed 64 fds: the
    rename copies the source directory up, then the levels below it, level by level, releasing
    fds as it goes; the source directory's fd, obtained first, must still be the one the rename
    acts on, though the copy-up began from it."""
    fd_limit(64)
    pair.build([[]], upper=[], mount=False)
    try:
        for side in pair.sides:
            build_chain(side.lowers[0], b"top", 300)
            with bottom(side.lowers[0], b"top", 100) as fd:
                os.close(os.open(b"h", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd))
        before = {side.lowers[0]: tree(side.lowers[0], branch=False) for side in pair.sides}
        pair.mount()

        def rename(s: Side) -> Any:
            with bottom(s.mnt, b"top", 100) as src, bottom(s.mnt, b"top", 300) as dst:
                os.rename(b"h", b"moved", src_dir_fd=src, dst_dir_fd=dst)
                return sorted(os.listdir(src)), sorted(os.listdir(dst))

        assert pair.same(rename, "rename deeper down") == (["d"], ["f", "g", "moved"])
        assert_same_list(tree(pair.k.mnt, branch=False), tree(pair.u.mnt, branch=False), "visible tree")
        pair.unmount()
        assert pair.k.upper is not None and pair.u.upper is not None
        assert_same_list(tree(pair.k.upper, branch=True), tree(pair.u.upper, branch=True), "upper branch")
        for lp, was in before.items():
            assert tree(lp, branch=False) == was, f"lower branch {lp} changed"
    finally:
        try:
            pair.unmount()
        finally:
            remove_branches(pair)


@pytest.mark.slow
def test_copy_up_below_a_very_deep_tree(pair: Pair) -> None:
    """The same 10,000 levels down (paths five times PATH_MAX), with the daemon's open file limit
    as it is (here: 20,000, fewer than two per level of the three chains)."""
    run_deep(pair, DEEP_DEPTH)


@pytest.mark.slow
def test_copy_up_below_a_very_deep_tree_with_few_fds(pair: Pair, fd_limit: Callable[[int], None]) -> None:
    """10,000 levels with the daemon allowed 4,096 fds."""
    fd_limit(4096)
    run_deep(pair, DEEP_DEPTH)


# ------------------------------------------------------------------------------------------------ setuid


USER = 1000


def create_as_user(dirfd: int, name: str, mode: int) -> Any:
    """open(O_CREAT) and mkfifo with *mode* as an unprivileged user, relative to *dirfd*: what they made."""
    code = (
        "import os\n"
        "os.umask(0o022)\n"
        f"fd = os.open({name!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, {mode}, dir_fd={dirfd})\n"
        f"os.mkfifo({name!r} + '.fifo', {mode}, dir_fd={dirfd})\n"
        f"st = os.stat({name!r} + '.fifo', dir_fd={dirfd})\n"
        "print(oct(os.fstat(fd).st_mode), os.fstat(fd).st_uid, oct(st.st_mode), st.st_uid)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], pass_fds=[dirfd], capture_output=True, text=True,
                       user=USER, group=USER, extra_groups=[], timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.parametrize("mode", [0o4755, 0o6755, 0o2750], ids=oct)
def test_unprivileged_create_keeps_setuid(pair: Pair, mode: int) -> None:
    """The creator owns the new file, so the set-id bits it asked for stay, as on overlayfs."""
    pair.build([[D("home", uid=USER, gid=USER), D("tmp", mode=0o1777)]], upper=[])
    for where in ("home", "tmp"):
        def create(s: Side, where: str = where) -> Any:
            fd = os.open(s.p(where), DIR)
            try:
                made = create_as_user(fd, "prog", mode)
                return made, oct(os.stat(b"prog", dir_fd=fd).st_mode)
            finally:
                os.close(fd)

        got = pair.same(create, f"create {oct(mode)} in {where}")
        assert int(got[1], 8) & 0o7777 == mode
    pair.assert_same_tree()
    pair.assert_same_upper()


# ------------------------------------------------------------------------------------------------ xattrs


def test_xattrs_of_an_open_file_whose_name_is_gone(pair: Pair) -> None:
    """fgetxattr, flistxattr, fsetxattr and fremovexattr on an open, unlinked file work on the file."""
    pair.build([[F("lower", b"l", xattrs={"user.a": b"1"}), F("ro", b"r", xattrs={"user.a": b"4"})]],
               upper=[F("upper", b"u", xattrs={"user.a": b"2", "user.b": b"3"})])
    reads: list[tuple[str, Callable[[int], Any]]] = [
        ("fgetxattr", lambda f: os.getxattr(f, "user.a")),
        ("flistxattr", lambda f: sorted(os.listxattr(f))),
        ("fgetxattr missing", lambda f: os.getxattr(f, "user.zz")),
    ]
    writes: list[tuple[str, Callable[[int], Any]]] = [
        ("fsetxattr", lambda f: os.setxattr(f, "user.c", b"new")),
        ("fgetxattr new", lambda f: os.getxattr(f, "user.c")),
        ("fremovexattr", lambda f: os.removexattr(f, "user.a")),
        ("flistxattr after", lambda f: sorted(os.listxattr(f))),
        ("fremovexattr missing", lambda f: os.removexattr(f, "user.zz")),
    ]
    # upper: in the writable branch; lower: copied up by the open for writing; ro: still below
    for name, flags, ops in (("upper", os.O_RDWR, reads + writes), ("lower", os.O_RDWR, reads + writes),
                             ("ro", os.O_RDONLY, reads)):
        with pair.opened(name, flags=flags) as fd:
            pair.same(lambda s, n=name: os.unlink(s.p(n)), f"unlink {name}")
            for what, op in ops:
                pair.same(lambda s, op=op, n=name: op(fd(s, n)), f"{what} on unlinked {name}")
    pair.assert_same_tree()
    pair.assert_same_upper()


LONG_NAMES = {
    # not the kernel's own namespace (it runs with trusted.* xattrs): plain data up to 255 bytes
    "user.overlay. + 242": "user.overlay." + "a" * 242,
    "user.fuseoverlayfs. + 236": "user.fuseoverlayfs." + "b" * 236,
    "user.unionfs. + 242": "user.unionfs." + "c" * 242,
    "user.overlay. + 243": "user.overlay." + "a" * 243,
    # the kernel's own namespace is escaped: its name must fit in 255 bytes escaped (else EOPNOTSUPP)
    "trusted.overlay. + 231": "trusted.overlay." + "d" * 231,
    "trusted.overlay. + 232": "trusted.overlay." + "d" * 232,
    "trusted.overlay. + 239": "trusted.overlay." + "d" * 239,
    "trusted.overlay. + 240": "trusted.overlay." + "d" * 240,
}


def test_overlay_xattr_names_near_the_length_limit(pair: Pair) -> None:
    pair.build([[F("f", b"f"), D("d")]], upper=[])
    for what, name in LONG_NAMES.items():
        for rel in ("f", "d"):
            pair.same(lambda s, n=name, r=rel: os.setxattr(s.p(r), n, b"v"), f"setxattr {what} on {rel}")
            pair.same(lambda s, n=name, r=rel: os.getxattr(s.p(r), n), f"getxattr {what} on {rel}")
    pair.same(lambda s: sorted(os.listxattr(s.p("f"))), "listxattr")
    pair.assert_same_tree()
    for what, name in LONG_NAMES.items():
        pair.same(lambda s, n=name: os.removexattr(s.p("f"), n), f"removexattr {what}")
    pair.same(lambda s: sorted(os.listxattr(s.p("f"))), "listxattr after removal")
    pair.unmount()
    pair.mount()
    pair.same(lambda s: sorted(os.listxattr(s.p("d"))), "listxattr after a remount")
    pair.assert_same_tree()


def test_long_xattr_names_read_back_as_set() -> None:
    """Every name the union stores reads back under the name that was set; the one spelling it
    cannot store either way is refused rather than shown under another name."""
    for name in LONG_NAMES.values():
        if len(name) > 255:
            continue        # ERANGE before any filesystem sees it
        try:
            real = escape_xattr(name.encode())
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP and name.startswith("trusted.overlay.")
            continue
        assert len(real) <= 255 and unescape_xattr(real) == name.encode()
    ambiguous = b"user.overlay.overlay." + b"e" * 230
    with pytest.raises(OSError) as exc:
        escape_xattr(ambiguous)
    assert exc.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("name", ["trusted.overlay.", "user.overlay.", "trusted.", "user.", "security.",
                                  "user.unionfs.", "foo", "foo.bar"])
def test_bare_xattr_prefixes(pair: Pair, name: str) -> None:
    """Bare namespaces (``trusted.overlay.`` too) are EINVAL, names in none EOPNOTSUPP, as on overlayfs."""
    pair.build([[F("f", b"f", xattrs={"user.x": b"1"})]], upper=[])
    pair.same(lambda s: os.setxattr(s.p("f"), name, b"v"), "setxattr")
    pair.same(lambda s: os.getxattr(s.p("f"), name), "getxattr")
    pair.same(lambda s: sorted(os.listxattr(s.p("f"))), "listxattr")
    pair.same(lambda s: os.removexattr(s.p("f"), name), "removexattr")
    pair.assert_same_tree()
    pair.assert_same_upper()

