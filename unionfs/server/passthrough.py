"""FUSE passthrough: open files whose reads and writes the kernel does itself, on the real file.

With passthrough (Linux 6.9+, agreed at INIT by the libfuse shim, see `compat`), an OPEN or CREATE
reply may name a *backing file* registered beforehand; the kernel then reads, writes and maps that
file without sending READ or WRITE requests, and the server's per-request cost leaves the data path.

The kernel's rules decide which opens may pass through (fs/fuse/iomode.c, passthrough.c):

- all open files of one inode use one backing file: a second one is refused (EBUSY), an open
  without passthrough while one with it is open is refused (EINVAL), and an open with passthrough
  while one without it is open is refused (ETXTBSY);
- registering a backing file needs CAP_SYS_ADMIN in the initial user namespace (root mounts, not
  `unionfs run` as a user), and its filesystem must be stacked less deep than the union says.

So a node passes through only when its real file is the one it keeps: a file in the writable branch
(a copy-up never moves it), or any file of a read-only union.  A read-only open of a lower file in a
writable union is served as before: a later open for writing copies the file up, and the kernel
would refuse the upper backing file beside the lower one (and the union's open files follow a
copy-up, which a lower backing file would not).  Each node's opens stay in one mode: while a node
has open files without passthrough (as the server counts them, which includes files the kernel has
closed and not yet released), new ones get none either; while it has files on a backing id, new
ones use the same id.  The id is dropped when the node's last such file is released.

A node with files on a backing file has ``outside`` set: the kernel changes its size and times
without the server seeing a write, so its stat is not cached meanwhile.  The kernel asks for its
security.capability at every write(2) (to drop it, as a write by an unprivileged user must): when
it has none, the libfuse shim answers that itself until the node's last file on it is released or an
xattr of that name is set through the mount.
"""
from __future__ import annotations

import errno
import logging
import os

from unionfs.core.union import Handle, Union

from . import compat

log = logging.getLogger(__name__)

CAPABILITY = b"security.capability"


class Passthrough:
    """The backing ids of a union's open files.

    Attributes:
        enabled: new opens may still pass through (False: not wanted, not agreed, or not allowed).
        backing: node id -> [backing id, open files on it].
        passed: file handle -> node id, for the open files that pass through.
    """

    def __init__(self, union: Union, wanted: bool) -> None:
        self.union = union
        self.enabled = wanted
        self.backing: dict[int, list[int]] = {}
        self.passed: dict[int, int] = {}
        self._refused: set[int] = set()

    def start(self) -> None:
        """The session's INIT has been read: passthrough stays enabled only if it was agreed."""
        self.enabled = self.enabled and compat.passthrough_asked()

    def open(self, h: Handle, new: bool = False) -> None:
        """Just before the OPEN or CREATE reply for *h* goes out: make it pass through if it may.
        *new*: the file was just made (O_EXCL) by this request, so it has no security.capability
        and nothing need be read to know it."""
        if not self.enabled:
            return
        node = h.node
        entry = self.backing.get(node.id)
        if entry is None:
            if node.handles > 1 or not (self.union.readonly or h.layer == 0):
                return
            backing_id = compat.backing_open(h.fd)
            if backing_id < 0:
                self._refused_once(-backing_id)
                return
            entry = self.backing[node.id] = [backing_id, 0]
            node.outside = True
            node.st = None
            if new:
                compat.no_capability(node.id, True)
            else:
                try:
                    os.getxattr(h.fd, CAPABILITY)   # the real file's: not an escaped name
                except OSError as e:
                    if e.errno == errno.ENODATA:
                        compat.no_capability(node.id, True)
        entry[1] += 1
        self.passed[h.fh] = node.id
        compat.pass_through(h.fh, entry[0])

    def release(self, h: Handle) -> None:
        """*h* is being released: drop its node's backing id with its last file on it."""
        node_id = self.passed.pop(h.fh, None)
        if node_id is None:
            return
        entry = self.backing[node_id]
        entry[1] -= 1
        if entry[1] == 0:
            del self.backing[node_id]
            h.node.outside = False
            h.node.st = None
            compat.no_capability(node_id, False)
            err = compat.backing_close(entry[0])
            if err < 0:
                log.debug("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", entry[0], os.strerror(-err))

    @staticmethod
    def xattr_changed(node_id: int, name: bytes) -> None:
        """xattr *name* of node *node_id* is being set or removed through the mount: the shim no
        longer answers for its security.capability (passthrough or the writeback cache)."""
        if name == CAPABILITY:
            compat.no_capability(node_id, False)

    def _refused_once(self, err: int) -> None:
        """A backing file was refused with *err*: EPERM turns passthrough off for the session; each
        reason is logged once."""
        if err == errno.EPERM:
            self.enabled = False
            log.info("FUSE passthrough not allowed (the server lacks CAP_SYS_ADMIN in the initial user "
                     "namespace): the server reads and writes open files itself")
        elif err not in self._refused:
            log.info("FUSE passthrough refused a backing file (%s): such files are served by the "
                     "server", os.strerror(err))
        self._refused.add(err)
