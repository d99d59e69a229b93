"""Branch safety by type: outside `unionfs.core.branches`, no code of the core resolves a name under a
directory fd itself.

Every system call on a name inside a branch (or the work directory) is a method of `DirFd`, which
never follows a symlink.  These tests read the core's source: a raw ``os.*`` call given a
``dir_fd``, ``src_dir_fd`` or ``dst_dir_fd``, an O_PATH open, or a renameat2 anywhere but in
branches.py (and sysx.py, which binds renameat2) fails them.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from unionfs.core.branches import DirFd

CORE = Path(__file__).resolve().parent.parent.parent / "unionfs" / "core"
#: The modules allowed to make these calls: the branch type itself, and the ctypes binding it uses.
OWNERS = {"branches.py", "sysx.py"}


def raw_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) of each call in *source* that resolves a name relative to a directory fd."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        kws = {k.arg for k in node.keywords}
        if kws & {"dir_fd", "src_dir_fd", "dst_dir_fd"}:
            found.append((node.lineno, f"{name}(..., dir_fd=...)"))
        elif name in ("renameat2", "listxattrat"):
            found.append((node.lineno, f"{name}(...)"))
        elif name == "open" and "O_PATH" in ast.unparse(node):
            found.append((node.lineno, "open(..., O_PATH)"))
    return found


def test_the_check_finds_raw_calls() -> None:
    sample = ("import os\n"
              "os.stat(b'x', dir_fd=3, follow_symlinks=False)\n"
              "os.rename(b'a', b'b', src_dir_fd=3, dst_dir_fd=4)\n"
              "renameat2(3, b'a', 4, b'b', 2)\n"
              "sysx.listxattrat(3, b'a', 0x100)\n"
              "os.open(b'x', os.O_PATH | os.O_NOFOLLOW, dir_fd=3)\n"
              "os.open(name, os.O_PATH)\n"
              "os.fstat(3)\n"
              "DirFd(3).lstat(b'x')\n")
    assert [line for line, _ in raw_calls(sample)] == [2, 3, 4, 5, 6, 7]


def test_no_raw_dir_fd_call_in_the_core_outside_branches() -> None:
    offenders = [f"{path.name}:{line}: {what}"
                 for path in sorted(CORE.glob("*.py")) if path.name not in OWNERS
                 for line, what in raw_calls(path.read_text())]
    assert offenders == [], "use a DirFd method (unionfs/core/branches.py) for: " + ", ".join(offenders)


def test_dirfd_never_follows_a_symlink(tmp_path: Path) -> None:
    """What each DirFd call does with a symlink planted where a name is expected: acts on the link
    itself, or refuses; the target outside is never touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"secret")
    os.chmod(outside / "f", 0o600)
    branch = tmp_path / "branch"
    branch.mkdir()
    (branch / "link").symlink_to(outside / "f")
    (branch / "dlink").symlink_to(outside)
    fd = DirFd(os.open(branch, os.O_RDONLY | os.O_DIRECTORY))
    try:
        assert fd.readlink(b"link") == os.fsencode(outside / "f")
        assert fd.lstat(b"link").st_mode & 0o170000 == 0o120000
        for call in (lambda: fd.open_dir(b"dlink"), lambda: fd.open_file(b"link", os.O_RDONLY)):
            with pytest.raises(OSError):
                call()
        os.setxattr(outside / "f", "user.target", b"1")
        assert fd.listxattr(b"link") == []            # the link's own xattrs: none
        fd.chmod(b"link", 0o777)                     # a symlink is left alone
        fd.utime(b"link", (0, 0))                     # the link's times, not the target's
        assert os.stat(outside / "f").st_mode & 0o777 == 0o600
        assert os.stat(outside / "f").st_mtime_ns != 0
        fd.link(b"link", fd, b"hard")                 # a hard link to the symlink itself
        assert os.path.islink(branch / "hard")
        fd.unlink(b"link")
        assert (outside / "f").read_bytes() == b"secret"
    finally:
        os.close(fd)


@pytest.mark.parametrize("listxattrat", [True, False], ids=["listxattrat", "through-proc"])
def test_dirfd_lists_the_xattrs_of_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listxattrat: bool) -> None:
    """listxattr of a name in a branch: by listxattrat(2) where the kernel has it (6.13+), else
    through an O_PATH fd; the same answer either way, and the real errno for a missing name."""
    from unionfs.core import sysx

    if not listxattrat:
        monkeypatch.setattr(sysx, "_has_listxattrat", False)
    (tmp_path / "f").write_bytes(b"")
    os.setxattr(tmp_path / "f", "user.a", b"1")
    os.setxattr(tmp_path / "f", "user." + "n" * 200, b"2")
    for i in range(20):                           # past the first buffer's 1 KiB of names
        os.setxattr(tmp_path / "f", f"user.{i:02d}" + "x" * 60, b"")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    fd = DirFd(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        want = sorted(os.fsencode(n) for n in os.listxattr(tmp_path / "f"))
        assert len(want) == 22 and sorted(fd.listxattr(b"f")) == want
        assert fd.listxattr(b"link") == []            # the link's own, not its target's
        with pytest.raises(FileNotFoundError):
            fd.listxattr(b"missing")
    finally:
        os.close(fd)
