"""How a daemon ends (unionfs/server/daemon.py): once the kernel has ended its session (umount(8),
fusermount3 -u, or `unionfs umount`), it cleans up what a user can see (the branches let go of,
the AUFS work dir inside the top branch, its pidfile, control socket and empty log) and exits at
once (a resident server's worker goes back to the server instead, to serve another mount); on
SIGTERM it still unmounts first, and exits.  For a daemon of the normal path and a resident server's
worker alike."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import util
from launcher_util import UnprivUser
from test_fastclient_umount import mount, wait_done, wait_exited
from test_resident import area, mount_as, root_server, state_key, user_area, users

pytestmark = pytest.mark.usefixtures("need_fuse")
__all__ = ["area", "root_server", "user_area", "users"]   # fixtures used here


def state_files(area: Path) -> list[str]:
    key = state_key(area / "M")
    return sorted(n for n in os.listdir("/run/unionfs") if n.startswith(key))


@pytest.mark.parametrize("via_server", [False, True], ids=["normal-path", "server-worker"])
@pytest.mark.parametrize("how", [["umount"], ["fusermount3", "-u"]], ids=["umount", "fusermount3"])
def test_a_daemon_whose_mount_is_gone_cleans_up_and_exits(root_server: Path, area: Path, via_server: bool,
                                                            how: list[str]) -> None:
    daemon = mount(area, via_server)
    (area / "M" / "new").write_text("kept\n")
    assert state_files(area), "no pidfile to begin with"
    subprocess.run([*how, str(area / "M")], check=True)
    assert (wait_done if via_server else wait_exited)(daemon), "the daemon outlived its mount"
    assert (area / "A" / "new").read_text() == "kept\n"
    assert not (area / "A" / ".wh..wh.unionfs.work").exists(), "the AUFS work dir was left behind"
    assert state_files(area) == [], "the daemon left its state files"


@pytest.mark.parametrize("via_server", [False, True], ids=["normal-path", "server-worker"])
def test_sigterm_still_unmounts(root_server: Path, area: Path, via_server: bool) -> None:
    daemon = mount(area, via_server)
    (area / "M" / "new").write_text("kept\n")
    os.kill(daemon, signal.SIGTERM)
    assert wait_exited(daemon)
    assert not util.is_mounted(area / "M"), "SIGTERM left the mount behind"
    assert (area / "A" / "new").read_text() == "kept\n"
    assert state_files(area) == []


def test_sigterm_unmounts_a_users_mount_too(users: tuple[UnprivUser, UnprivUser],
                                            user_area: tuple[Path, Path]) -> None:
    """A user's worker unmounts through fusermount3 when SIGTERM ends its session."""
    me, _ = users
    base, state = user_area
    mount_as(me, base)
    daemon = int((state / f"{state_key(base / 'M')}.pid").read_text().split()[0])
    assert os.stat(f"/proc/{daemon}").st_uid == me.uid
    os.kill(daemon, signal.SIGTERM)
    assert wait_exited(daemon)
    assert not util.is_mounted(base / "M"), "SIGTERM left the user's mount behind"
