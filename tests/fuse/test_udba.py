"""-o udba=none|reval|notify: files added, removed, changed and renamed directly in a branch (lower
or upper), as seen through the mount.

none: the caches may keep what was there (until the kernel's timeout and the daemon drops them):
only what is defined is asserted, a directory or file not yet looked at shows what is there.
reval: seen at the next access.  notify: seen within 100 ms, with a kernel timeout of 10 minutes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util

LONG = "timeout=600"
#: How soon udba=notify shows a change made directly in a branch.
NOTIFY_WITHIN = 0.1


class Union:
    """An overlay-style union of upper over lower, each with a file and a directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.lower, self.upper, self.work, self.mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
        for d in (self.lower, self.upper, self.work, self.mnt):
            d.mkdir()
        for top in (self.lower, self.upper):
            (top / f"{top.name}.txt").write_text(f"{top.name} 1\n")
            (top / "dir").mkdir()
            (top / "dir" / f"in-{top.name}").write_text("x\n")
        self.mounted: util.Mounted | None = None

    def mount(self, *options: str) -> Path:
        self.mounted = util.mount_impl("overlay", [self.lower], self.upper, self.work, self.mnt, list(options))
        return self.mnt

    def warm(self) -> None:
        """Look at everything, so that the kernel and the daemon have it all cached."""
        for p in self.mnt.rglob("*"):
            p.stat()
            if p.is_file():
                p.read_bytes()
        assert not _exists(self.mnt / "added")     # a negative entry cached

    def branch(self, which: str) -> Path:
        return self.lower if which == "lower" else self.upper


@pytest.fixture
def union(tmp_path: Path, need_fuse: None) -> Iterator[Union]:
    u = Union(tmp_path)
    try:
        yield u
    finally:
        if u.mounted is not None:
            util.unmount(u.mounted)


def _names(d: Path) -> set[str]:
    return set(os.listdir(d))


def _exists(p: Path) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    return True


def _seen(check: Callable[[], bool], within: float) -> float:
    """Seconds until *check* held (polled); fails if it did not within *within* seconds."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"not seen within {within * 1000:.0f} ms")
        time.sleep(0.002)


# (name, function of (union, branch dir) that changes the branch directly, check through the mount)
def _add(u: Union, b: Path) -> Callable[[], bool]:
    (b / "added").write_text("new\n")
    (b / "dir" / "added-below").write_text("new\n")
    return lambda: ("added" in _names(u.mnt) and _exists(u.mnt / "added")
                    and (u.mnt / "dir" / "added-below").read_text() == "new\n")


def _remove(u: Union, b: Path) -> Callable[[], bool]:
    name = f"{b.name}.txt"
    (b / name).unlink()
    (b / "dir" / f"in-{b.name}").unlink()
    return lambda: (name not in _names(u.mnt) and not _exists(u.mnt / name)
                    and f"in-{b.name}" not in _names(u.mnt / "dir"))


def _modify(u: Union, b: Path) -> Callable[[], bool]:
    name = f"{b.name}.txt"
    (b / name).write_text(f"{b.name} 2, longer\n")
    return lambda: ((u.mnt / name).read_text() == f"{b.name} 2, longer\n"
                    and (u.mnt / name).stat().st_size == len(f"{b.name} 2, longer\n"))


def _rename(u: Union, b: Path) -> Callable[[], bool]:
    os.rename(b / f"{b.name}.txt", b / "renamed.txt")
    return lambda: ({"renamed.txt"} <= _names(u.mnt) and f"{b.name}.txt" not in _names(u.mnt)
                    and (u.mnt / "renamed.txt").read_text() == f"{b.name} 1\n")


def _chmod(u: Union, b: Path) -> Callable[[], bool]:
    (b / f"{b.name}.txt").chmod(0o600)
    return lambda: (u.mnt / f"{b.name}.txt").stat().st_mode & 0o777 == 0o600


CHANGES = {"add": _add, "remove": _remove, "modify": _modify, "rename": _rename, "chmod": _chmod}


@pytest.mark.parametrize("mode", ["reval", "notify"])
@pytest.mark.parametrize("which", ["lower", "upper"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_direct_changes_are_seen(union: Union, mode: str, which: str, change: str) -> None:
    """reval: at the next access; notify: within 100 ms."""
    union.mount(f"udba={mode}", LONG)
    union.warm()
    check = CHANGES[change](union, union.branch(which))
    if mode == "reval":
        assert check()
    else:
        _seen(check, NOTIFY_WITHIN)


def test_notify_drops_the_pages_of_an_open_file(union: Union) -> None:
    """A file open through the mount, its pages cached, rewritten in its branch: the next read
    through the open file sees the new data."""
    union.mount("udba=notify", LONG)
    with open(union.mnt / "lower.txt", "rb") as f:
        assert f.read() == b"lower 1\n"
        with open(union.lower / "lower.txt", "r+b") as direct:
            direct.write(b"LOWER")
        def fresh() -> bool:
            f.seek(0)
            return f.read() == b"LOWER 1\n"
        _seen(fresh, NOTIFY_WITHIN)


def test_notify_sees_a_directory_appear_in_a_lower_branch(union: Union) -> None:
    """A directory of the same name made in the lower branch under a directory that was the upper's
    alone: its names merge in."""
    (union.upper / "only-up").mkdir()
    (union.upper / "only-up" / "u").write_text("u")
    union.mount("udba=notify", LONG)
    union.warm()
    assert _names(union.mnt / "only-up") == {"u"}
    (union.lower / "only-up").mkdir()
    (union.lower / "only-up" / "l").write_text("l")
    _seen(lambda: _names(union.mnt / "only-up") == {"u", "l"}, NOTIFY_WITHIN)
    assert (union.mnt / "only-up" / "l").read_text() == "l"


@pytest.mark.parametrize("mode", ["reval", "notify"])
def test_a_directory_copied_up_is_watched_in_its_new_branch(union: Union, mode: str) -> None:
    """A lower directory copied up by a create through the mount, then changed directly in the
    upper branch."""
    (union.lower / "lonely").mkdir()
    (union.lower / "lonely" / "l").write_text("l")
    union.mount(f"udba={mode}", LONG)
    union.warm()
    (union.mnt / "lonely" / "made").write_text("m")
    assert (union.upper / "lonely" / "made").exists()
    (union.upper / "lonely" / "direct").write_text("d")
    _seen(lambda: _names(union.mnt / "lonely") == {"l", "made", "direct"}, NOTIFY_WITHIN)
    (union.upper / "lonely" / "made").write_text("rewritten")
    _seen(lambda: (union.mnt / "lonely" / "made").read_text() == "rewritten", NOTIFY_WITHIN)


def test_reval_sees_a_directory_appear_in_a_lower_branch(union: Union) -> None:
    (union.upper / "only-up").mkdir()
    (union.upper / "only-up" / "u").write_text("u")
    union.mount("udba=reval")
    union.warm()
    (union.lower / "only-up").mkdir()
    (union.lower / "only-up" / "l").write_text("l")
    assert _names(union.mnt / "only-up") == {"u", "l"}
    assert (union.mnt / "only-up" / "l").read_text() == "l"


@pytest.mark.parametrize("mode", ["none", "reval", "notify"])
def test_changes_through_the_mount_are_unchanged(union: Union, mode: str) -> None:
    """What the union does itself (create, copy-up, whiteouts, rename, rmdir) reads back the same
    in every mode."""
    m = union.mount(f"udba={mode}", LONG)
    union.warm()
    (m / "made").write_text("made\n")
    (m / "lower.txt").write_text("copied up\n")
    os.rename(m / "made", m / "moved")
    (m / "dir" / "in-lower").unlink()
    (m / "sub").mkdir()
    (m / "sub" / "f").write_text("f")
    assert _names(m) == {"lower.txt", "upper.txt", "dir", "moved", "sub"}
    assert _names(m / "dir") == {"in-upper"}
    assert (m / "lower.txt").read_text() == "copied up\n"
    assert (m / "moved").read_text() == "made\n"
    with pytest.raises(FileNotFoundError):
        (m / "dir" / "in-lower").stat()
    (m / "sub" / "f").unlink()
    (m / "sub").rmdir()
    assert _names(m) == {"lower.txt", "upper.txt", "dir", "moved"}


def test_none_shows_what_was_not_looked_at(union: Union) -> None:
    """udba=none defines only this: a directory not listed yet and a file not read yet show what
    their branches hold when they are first looked at."""
    union.mount("udba=none", LONG)
    assert "dir" in _names(union.mnt)
    (union.lower / "dir" / "late").write_text("late\n")
    (union.lower / "lower.txt").write_text("changed\n")
    assert _names(union.mnt / "dir") == {"in-lower", "in-upper", "late"}
    assert (union.mnt / "lower.txt").read_text() == "changed\n"


@pytest.mark.daemon_log_ok("udba_max_watches=2 reached")
def test_notify_past_its_watch_limit_falls_back_to_reval(union: Union) -> None:
    """With room for the root's two branch directories only, "dir" is not watched: a change there
    is still seen at the next access (re-checked, as with reval), and the root stays watched."""
    union.mount("udba=notify", "udba_max_watches=2", LONG)
    union.warm()
    (union.lower / "dir" / "late").write_text("late\n")
    assert "late" in _names(union.mnt / "dir")
    assert (union.mnt / "dir" / "late").read_text() == "late\n"
    (union.lower / "dir" / "late").write_text("later\n")
    assert (union.mnt / "dir" / "late").read_text() == "later\n"
    (union.lower / "at-root").write_text("r")
    _seen(lambda: "at-root" in _names(union.mnt), NOTIFY_WITHIN)
    assert union.mounted is not None
    assert "udba_max_watches=2 reached" in union.mounted.stderr()


def test_udba_options_are_checked(tmp_path: Path) -> None:
    from unionfs.core.config import build_config
    from unionfs.core.errors import QuietError
    for bad in ("udba=always", "udba_max_watches=-1", "udba_max_watches=x"):
        with pytest.raises(QuietError, match=bad.split("=")[0]):
            build_config(f"{tmp_path}=rw", str(tmp_path / "mnt"), [bad])
