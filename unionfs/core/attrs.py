"""The attributes of a real object as the union keeps them: packed into one small bytes object.

A cached `os.stat_result` costs about 600 bytes (the struct sequence plus a float, an int and a
nanosecond int per time, and an int per field); a node keeps one per object the kernel knows, which
made it the largest part of the daemon's memory per directory entry.  `Stat` holds the fields the
union uses in 84 bytes and reads them back on demand.
"""
from __future__ import annotations

import os
import struct

_LAYOUT = struct.Struct("=QQIQqqIqqqIII")   # see Stat.of for the order


class Stat(bytes):
    """An immutable, compact stat of a real object (the fields `os.stat_result` names alike)."""

    __slots__ = ()

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        return cls(_LAYOUT.pack(
            st.st_dev, st.st_ino, st.st_nlink, st.st_rdev, st.st_size, st.st_blocks, st.st_blksize,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid, st.st_gid))

    def fields(self) -> tuple[int, ...]:
        """(dev, ino, nlink, rdev, size, blocks, blksize, atime_ns, mtime_ns, ctime_ns, mode, uid, gid)"""
        return _LAYOUT.unpack(self)

    def _field(self, i: int) -> int:
        return int(_LAYOUT.unpack(self)[i])

    @property
    def st_dev(self) -> int:
        return self._field(0)

    @property
    def st_ino(self) -> int:
        return self._field(1)

    @property
    def st_nlink(self) -> int:
        return self._field(2)

    @property
    def st_rdev(self) -> int:
        return self._field(3)

    @property
    def st_size(self) -> int:
        return self._field(4)

    @property
    def st_blocks(self) -> int:
        return self._field(5)

    @property
    def st_blksize(self) -> int:
        return self._field(6)

    @property
    def st_atime_ns(self) -> int:
        return self._field(7)

    @property
    def st_mtime_ns(self) -> int:
        return self._field(8)

    @property
    def st_ctime_ns(self) -> int:
        return self._field(9)

    @property
    def st_mode(self) -> int:
        return self._field(10)

    @property
    def st_uid(self) -> int:
        return self._field(11)

    @property
    def st_gid(self) -> int:
        return self._field(12)

    def __repr__(self) -> str:
        return f"Stat(mode={self.st_mode:o}, ino={self.st_ino}, size={self.st_size})"
