"""A read-only FUSE filesystem whose big file stops answering reads until it is told to go on.

    python stall_branch.py MOUNTPOINT CONTROL_DIR

It holds ``/big`` (BIG_SIZE bytes of `big_content`) and ``/small``.  Reads of ``/big`` past STALL_AT
and fsyncs of it wait until CONTROL_DIR/go exists; while one waits, CONTROL_DIR/waiting exists.
Everything else is answered at once.  Used as the lower branch of a union to hold a read of the union's in a
system call for as long as a test needs, without timing anything.  Runs until unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

BIG_SIZE = 4 << 20
STALL_AT = 2 << 20
SMALL = b"small file\n"
ROOT = pyfuse3.ROOT_INODE
FILES = {b"big": (ROOT + 1, BIG_SIZE), b"small": (ROOT + 2, len(SMALL))}


def big_content(offset: int, size: int) -> bytes:
    """Bytes *offset* .. *offset* + *size* of ``/big``: each 4-byte word holds its own index."""
    first, last = offset // 4, (offset + size + 3) // 4
    words = b"".join(i.to_bytes(4, "little") for i in range(first, last))
    start = offset - first * 4
    return words[start:start + size]


class StallFs(pyfuse3.Operations):
    def __init__(self, control: str) -> None:
        super().__init__()
        self.control = control

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 0
        if ino == ROOT:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            size = next(s for i, s in FILES.values() if i == ino)
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attr(ROOT)
        if name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILES[name][0])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = sorted(FILES)
        for i in range(start_id, len(names)):
            if not pyfuse3.readdir_reply(token, names[i], self._attr(FILES[names[i]][0]), i + 1):
                return

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        d = pyfuse3.StatvfsData()
        d.f_bsize = d.f_frsize = 4096
        d.f_blocks = d.f_files = 1024
        d.f_namemax = 255
        return d

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def _stall(self) -> None:
        go, waiting = os.path.join(self.control, "go"), os.path.join(self.control, "waiting")
        while not os.path.exists(go):
            open(waiting, "wb").close()
            await trio.sleep(0.01)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == FILES[b"small"][0]:
            return SMALL[off:off + size]
        size = max(0, min(size, BIG_SIZE - off))
        if off + size > STALL_AT:
            await self._stall()
        return big_content(off, size)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh == FILES[b"big"][0]:
            await self._stall()


def main() -> None:
    mnt, control = sys.argv[1:3]
    pyfuse3.init(StallFs(control), mnt, {"fsname=stall_branch", "default_permissions", "allow_other"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
