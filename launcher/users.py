"""``--user``: a user spec resolved against the image's /etc/passwd and /etc/group, as Docker does.

``UID[:GID]`` or ``NAME[:GROUP]`` (either side a name or a number).  A name must be in the image's
files; a number need not be.  Without a group, the user's primary group from /etc/passwd, or 0 for
a uid the image does not list.  The supplementary groups are those /etc/group lists the user's name
in (plus the primary group), or only the group given; HOME comes from /etc/passwd, ``/`` when the
image has no entry.
"""

from __future__ import annotations

from typing import NamedTuple

from launcher.errors import EXIT_USAGE, LaunchError


class User(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _rows(text: bytes | None, fields: int) -> list[list[str]]:
    rows = []
    for line in (text or b"").decode(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) >= fields and not line.startswith("#"):
            rows.append(parts)
    return rows


def _number(value: str) -> int | None:
    if value.isdigit():
        n = int(value)
        if n < 2**32 - 1:
            return n
    return None


def resolve(spec: str, passwd: bytes | None, group: bytes | None) -> User:
    """The ids for *spec* from the image's *passwd* and *group* contents (None: the file is missing)."""
    who, sep, grp = spec.partition(":")
    if not who or (sep and not grp):
        raise LaunchError(f"bad --user {spec!r} (want UID[:GID] or NAME[:GROUP])", EXIT_USAGE)
    users = _rows(passwd, 7)
    groups = _rows(group, 4)
    entry = next((row for row in users if row[0] == who), None)
    uid = _number(who)
    if entry is None and uid is not None:
        entry = next((row for row in users if _number(row[2]) == uid), None)
    if entry is None and uid is None:
        raise LaunchError(f"unable to find user {who}: no matching entries in the image's /etc/passwd")
    if entry is not None:
        uid = _number(entry[2])
        if uid is None:
            raise LaunchError(f"the image's /etc/passwd has a bad uid for {entry[0]}: {entry[2]!r}")
    assert uid is not None
    gid = _number(entry[3]) if entry is not None else 0
    if gid is None:
        gid = 0
    if grp:
        gid_given = _number(grp)
        row = next((r for r in groups if r[0] == grp), None)
        if row is not None:
            gid_given = _number(row[2])
        if gid_given is None:
            raise LaunchError(f"unable to find group {grp}: no matching entries in the image's /etc/group")
        gid = gid_given
    supplementary = [gid]
    if entry is not None and not grp:  # an explicit group is the only one, as in runc
        for row in groups:
            n = _number(row[2])
            if n is not None and entry[0] in row[3].split(",") and n not in supplementary:
                supplementary.append(n)
    home = entry[5] if entry is not None and entry[5] else "/"
    return User(uid, gid, tuple(supplementary), home)
