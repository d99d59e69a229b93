"""`daemon._open_fds`: the fds a daemon finds open at its start are kept from the shim's release of
the branches at the session's end, so a number listed there that is not open becomes a branch's fd
kept busy (the next open takes the lowest free number)."""

from __future__ import annotations

import os

from unionfs.server.daemon import _open_fds


def test_only_open_fds_are_listed() -> None:
    opened = [os.open("/", os.O_RDONLY | os.O_DIRECTORY) for _ in range(3)]
    os.close(opened[1])   # a hole, where the listing's own fds go
    try:
        found = _open_fds()
        for fd in found:
            os.fstat(fd)   # raises for a number that is not open
        assert {opened[0], opened[2]} <= found and opened[1] not in found
        nxt = os.open("/", os.O_RDONLY | os.O_DIRECTORY)   # as a branch opened next would be
        os.close(nxt)
        assert nxt not in found
    finally:
        os.close(opened[0])
        os.close(opened[2])
