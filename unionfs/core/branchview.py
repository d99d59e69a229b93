"""Read-only branches seen as one tree, looked up without following a symlink, without a mount.

The launcher needs a few answers about the image before the union is mounted: is
``/tmp`` a directory, and with which mode, owner and times; is ``/var/run`` a
symlink; what do ``/etc/passwd`` and ``/etc/group`` say.  ``unionfs diff`` asks what
the image layers show at each path the container layer holds.  ``BranchView`` answers
them from the branches directly, top first, with the union's rules: the topmost
branch that has a name decides what it is, a whiteout hides the name below, an
opaque directory hides the directories below it.  Every lookup is relative to a
directory fd with ``O_NOFOLLOW``: a symlink in the image is reported, never
followed, so nothing here can reach outside the branches.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

from unionfs.core.branches import DirFd, open_root
from unionfs.core.whiteout import dir_is_opaque, is_whiteout_stat, whiteouts_at

log = logging.getLogger(__name__)

MAX_FILE = 1 << 20  # /etc/passwd and /etc/group of any real image are far smaller


def components(path: str) -> list[str]:
    """The names of an absolute container path, without ``.``; ValueError for ``..``."""
    names = [c for c in path.split("/") if c and c != "."]
    if ".." in names:
        raise ValueError(f"'..' in container path {path!r}")
    return names


class BranchView:
    """Read-only lookups in the union of *branches* (top first).  Close it, or use it as a context.

    A branch's own path is the user's to resolve (as the union's branches are: see
    ``layers.open_root``); below it nothing is followed."""

    def __init__(self, branches: Sequence[str | os.PathLike[str]]) -> None:
        self._roots: list[DirFd] = []
        try:
            for path in branches:
                self._roots.append(open_root(os.fspath(path)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._roots:
            os.close(fd)
        self._roots = []

    def __enter__(self) -> BranchView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def walk(self, path: str) -> list[os.stat_result]:
        """The stat of each prefix of *path* (``/a``, ``/a/b``, ...) as the union shows it.

        The list stops early at the first name that is missing (or whited out), and
        after the first that is not a directory (a symlink included, which is never
        followed).  So ``len(walk(p)) == len(components(p))`` when *p* exists.
        """
        return self.walk_names([os.fsencode(name) for name in components(path)])

    def lstat_names(self, names: Sequence[bytes]) -> os.stat_result | None:
        """The stat of the path made of *names* (bytes, one per component), None when it is
        missing or a parent is not a directory."""
        found = self.walk_names(names)
        return found[-1] if names and len(found) == len(names) else None

    def walk_names(self, names: Sequence[bytes]) -> list[os.stat_result]:
        """`walk` of the path made of *names* (bytes, one per component)."""
        found: list[os.stat_result] = []
        dirs = list(self._roots)
        opened: list[DirFd] = []
        try:
            for name in names:
                st, dirs = self._step(dirs, name, opened)
                if st is None:
                    break
                found.append(st)
                if not stat.S_ISDIR(st.st_mode):
                    break
        finally:
            for fd in opened:
                os.close(fd)
        return found

    def lstat(self, path: str) -> os.stat_result | None:
        """The stat of *path* itself, None when it is missing or a parent is not a directory."""
        names = components(path)
        if not names:
            return os.fstat(self._roots[0]) if self._roots else None
        found = self.walk(path)
        return found[-1] if len(found) == len(names) else None

    def read_file(self, path: str) -> bytes | None:
        """The contents of the regular file *path*; None when missing, not a regular file or unreadable."""
        names = components(path)
        if not names:
            return None
        dirs = list(self._roots)
        opened: list[DirFd] = []
        try:
            for name in names[:-1]:
                st, dirs = self._step(dirs, os.fsencode(name), opened)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    return None
            last = os.fsencode(names[-1])
            for fd in dirs:
                device, aufs = whiteouts_at(fd, last)
                if device or aufs:
                    return None
                try:
                    f = fd.open_file(last, os.O_RDONLY)     # ESTALE when not a regular file
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.debug("image file %s: %s", path, os.strerror(exc.errno or 0))
                    return None
                try:
                    return os.read(f, MAX_FILE)
                finally:
                    os.close(f)
            return None
        finally:
            for fd in opened:
                os.close(fd)

    @staticmethod
    def _step(dirs: list[DirFd], name: bytes, opened: list[DirFd]
              ) -> tuple[os.stat_result | None, list[DirFd]]:
        """Look *name* up in the directories *dirs* (one per branch that has the parent, top first).

        Returns the topmost stat and the directories to look in for the next name: every
        branch's directory of that name down to the first opaque one or a whiteout.
        """
        top: os.stat_result | None = None
        below: list[DirFd] = []
        for fd in dirs:
            device, aufs = whiteouts_at(fd, name)
            if aufs:
                break
            try:
                st = fd.lstat(name)
            except FileNotFoundError:
                continue
            if device or is_whiteout_stat(st):
                break
            if top is None:
                top = st
            if not (stat.S_ISDIR(top.st_mode) and stat.S_ISDIR(st.st_mode)):
                break
            try:
                sub = fd.open_dir(name)
            except OSError:
                break
            opened.append(sub)
            below.append(sub)
            if dir_is_opaque(sub):
                break
        return top, below
