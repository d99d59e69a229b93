"""fanotify's event records as `unionfs.server.watch.parse` reads them, checked against the kernel:
a mark on a directory reports a change made in it with the directory's handle (as `handle_of`
gives it), the name and the pid of the process that made it."""
from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from unionfs.server import watch


def _events(fan: int) -> list[tuple[int, int, bytes, bytes]]:
    out = []
    while select.select([fan], [], [], 1.0)[0]:
        out += watch.parse(os.read(fan, 1 << 16))
        if out:
            break
    return out


def test_events_name_the_directory_the_entry_and_who(tmp_path: Path) -> None:
    try:
        fan = watch.fan_init()
    except OSError as e:
        pytest.skip(f"no fanotify here: {e}")
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        watch.fan_mark(fan, watch.FAN_MARK_ADD, d)
        handle = watch.handle_of(d)
        pid = os.fork()
        if pid == 0:
            (tmp_path / "theirs").write_text("x")
            os._exit(0)
        os.waitpid(pid, 0)
        (tmp_path / "ours").mkdir()
        got = _events(fan)
        got += _events(fan) if len(got) < 2 else []
        by_name = {name: (mask, who, h) for mask, who, h, name in got}
        assert by_name[b"theirs"][0] & watch.FAN_CREATE and by_name[b"theirs"][1] == pid
        assert by_name[b"theirs"][2] == handle
        assert by_name[b"ours"][0] & watch.FAN_CREATE and by_name[b"ours"][0] & watch.FAN_ONDIR
        assert by_name[b"ours"][1] == os.getpid()
    finally:
        os.close(d)
        os.close(fan)
