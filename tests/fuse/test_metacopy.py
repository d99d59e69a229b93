"""``-o metacopy=on`` through real mounts, beside kernel overlayfs mounted with metacopy=on.

A chmod, chown, utimes or xattr change of a lower file copies its metadata only (the upper file is
sparse and marked ``trusted.overlay.metacopy``); the data follows at the first write, truncate,
O_TRUNC open or shared writable mmap; renames and links write overlayfs's ``redirect``; an upper
written by either mounts on the other and shows the same data.
"""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from util import Mounted, mount_impl, mount_kernel, unmount

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("need_overlay")]

MIB = 1 << 20
KERNEL_MC = ["redirect_dir=on", "metacopy=on"]
MC = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"


def _lower(root: Path, files: int = 12, size: int = MIB) -> dict[str, bytes]:
    """A lower tree of *files* files of random data in a few directories; their contents."""
    data = {}
    for i in range(files):
        rel = f"d{i % 3}/sub{i % 2}/f{i}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data[rel] = os.urandom(size)
        path.write_bytes(data[rel])
    return data


class Side:
    """One union (kernel or unionfs) over its own copy of the lower tree."""

    def __init__(self, base: Path, kernel: bool, lower_src: Path, options: list[str]) -> None:
        self.kernel = kernel
        self.base = base
        self.lower = base / "lower"
        base.mkdir()
        subprocess.run(["cp", "-a", str(lower_src), str(self.lower)], check=True)
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        self.options = options
        self.m: Mounted | None = None

    def mount(self, kernel: bool | None = None) -> Path:
        kernel = self.kernel if kernel is None else kernel
        if kernel:
            self.m = mount_kernel([self.lower], self.upper, self.work, self.mnt, KERNEL_MC)
        else:
            self.m = mount_impl("overlay", [self.lower], self.upper, self.work, self.mnt, self.options)
        return self.mnt

    def umount(self) -> None:
        if self.m is not None:
            unmount(self.m)
            self.m = None


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[Callable[..., tuple[Side, Side]]]:
    made: list[Side] = []

    def make(files: int = 12, size: int = MIB, options: tuple[str, ...] = ("metacopy=on",)
             ) -> tuple[Side, Side]:
        src = tmp_path / "src"
        _lower(src, files, size)
        k = Side(tmp_path / "k", True, src, ["metacopy=on"])   # options: when unionfs mounts its upper
        u = Side(tmp_path / "u", False, src, list(options))
        made.extend((k, u))
        k.mount()
        u.mount()
        return k, u

    yield make
    for s in made:
        s.umount()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def test_chown_and_chmod_recursive_copy_no_data(sides: Callable[..., tuple[Side, Side]]) -> None:
    k, u = sides()
    for s in (k, u):
        subprocess.run(["chown", "-R", "1:2", str(s.mnt)], check=True)
        subprocess.run(["chmod", "-R", "g+w", str(s.mnt)], check=True)
    names = _files(k.lower)
    assert _files(u.upper) == names == _files(k.upper)
    for rel in names:
        for s in (k, u):
            up = os.lstat(s.upper / rel)
            assert up.st_size == MIB
            assert up.st_blocks * 512 <= 4096, (s.kernel, rel, up.st_blocks)   # no data: an xattr block at most
            assert _xattr(s.upper / rel, MC) == b""
        shown_k, shown_u = os.lstat(k.mnt / rel), os.lstat(u.mnt / rel)
        assert (shown_u.st_uid, shown_u.st_gid, shown_u.st_mode) == (1, 2, shown_k.st_mode)
        assert shown_u.st_size == shown_k.st_size == MIB
        assert shown_u.st_blocks == shown_k.st_blocks == os.lstat(u.lower / rel).st_blocks
        assert (u.mnt / rel).read_bytes() == (u.lower / rel).read_bytes()
    # The upper unionfs wrote, mounted on the kernel with metacopy=on: the same data and owners.
    u.umount()
    u.mount(kernel=True)
    for rel in names:
        assert (u.mnt / rel).read_bytes() == (u.lower / rel).read_bytes()
        assert os.lstat(u.mnt / rel).st_uid == 1


def _pwrite(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"written", 4096)
    finally:
        os.close(fd)


def _truncate(path: Path) -> None:
    os.truncate(path, 5000)


def _o_trunc(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"new")


def _mmap_write(path: Path) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[100:104] = b"mmap"
        mm.flush()


def _open_rw_only(path: Path) -> None:
    os.close(os.open(path, os.O_RDWR))


@pytest.mark.parametrize("change", [_pwrite, _truncate, _o_trunc, _mmap_write, _open_rw_only],
                         ids=lambda f: f.__name__.strip("_"))
def test_first_write_copies_the_data_once(sides: Callable[..., tuple[Side, Side]],
                                          change: Callable[[Path], None]) -> None:
    k, u = sides(files=3, size=3 * MIB)
    rel = "d0/sub0/f0"
    seen: dict[bool, tuple[object, ...]] = {}
    for s in (k, u):
        os.chmod(s.mnt / rel, 0o640)
        reader = os.open(s.mnt / rel, os.O_RDONLY)   # opened on the lower data
        try:
            change(s.mnt / rel)
            again = os.pread(reader, 64 * 1024, 0)  # an fd opened before reads the copy after
        finally:
            os.close(reader)
        change_twice = os.lstat(s.upper / rel).st_ino
        os.chmod(s.mnt / rel, 0o600)                # no second copy: the same upper inode
        assert os.lstat(s.upper / rel).st_ino == change_twice
        assert _xattr(s.upper / rel, MC) is None
        st = os.lstat(s.mnt / rel)
        content = (s.mnt / rel).read_bytes()
        assert content == (s.upper / rel).read_bytes()
        seen[s.kernel] = (again, st.st_size, st.st_blocks, oct(st.st_mode), content)
    assert seen[False] == seen[True]


def test_rename_and_link_write_redirects_as_the_kernel(sides: Callable[..., tuple[Side, Side]]) -> None:
    k, u = sides(files=6, size=64 * 1024)
    for s in (k, u):
        os.rename(s.mnt / "d0/sub0/f0", s.mnt / "d0/sub0/same-dir")      # lower file: relative
        os.chmod(s.mnt / "d1/sub1/f1", 0o600)
        os.rename(s.mnt / "d1/sub1/f1", s.mnt / "d2/moved")               # metacopy file: absolute
        os.rename(s.mnt / "d2/moved", s.mnt / "d2/moved-again")           # kept
        os.link(s.mnt / "d2/sub0/f2", s.mnt / "d0/linked")                # link: absolute
        (s.mnt / "newdir").mkdir()
        os.rename(s.mnt / "d0/sub0/same-dir", s.mnt / "newdir/deeper")  # relative made absolute
    expect = {"d0/sub0/same-dir": None, "newdir/deeper": b"/d0/sub0/f0", "d2/moved-again": b"/d1/sub1/f1",
              "d0/linked": b"/d2/sub0/f2", "d2/sub0/f2": b"/d2/sub0/f2"}
    for rel, redirect in expect.items():
        for s in (k, u):
            if redirect is None:
                assert not (s.upper / rel).exists()
                continue
            assert _xattr(s.upper / rel, REDIRECT) == redirect, (s.kernel, rel)
            assert _xattr(s.upper / rel, MC) == b""
    sources = {"newdir/deeper": "d0/sub0/f0", "d2/moved-again": "d1/sub1/f1", "d0/linked": "d2/sub0/f2"}
    # Each upper mounted by the other implementation: the same data through the redirects.
    for s in (k, u):
        s.umount()
        s.mount(kernel=not s.kernel)
        for rel, src in sources.items():
            assert (s.mnt / rel).read_bytes() == (s.lower / src).read_bytes(), (s.kernel, rel)
        _pwrite(s.mnt / "newdir/deeper")       # the data copy-up follows the redirect
        data = (s.lower / "d0/sub0/f0").read_bytes()
        assert (s.mnt / "newdir/deeper").read_bytes() == data[:4096] + b"written" + data[4103:]


def test_directory_made_in_a_merged_one_is_opaque(sides: Callable[..., tuple[Side, Side]]) -> None:
    k, u = sides(files=2, size=10)
    for s in (k, u):
        (s.mnt / "d0/new").mkdir()
        (s.mnt / "fresh").mkdir()
        (s.mnt / "fresh/inner").mkdir()   # in an upper-only directory: not merged, not opaque
        assert _xattr(s.upper / "d0/new", "trusted.overlay.opaque") == b"y", s.kernel
        assert _xattr(s.upper / "fresh/inner", "trusted.overlay.opaque") is None, s.kernel


def test_without_the_option_chmod_copies_the_data(sides: Callable[..., tuple[Side, Side]]) -> None:
    _k, u = sides(files=1, size=MIB, options=())
    os.chmod(u.mnt / "d0/sub0/f0", 0o600)
    assert _xattr(u.upper / "d0/sub0/f0", MC) is None
    assert (u.upper / "d0/sub0/f0").read_bytes() == (u.lower / "d0/sub0/f0").read_bytes()
