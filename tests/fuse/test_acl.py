"""POSIX ACLs through the union, for a second, unprivileged user, against kernel overlayfs.

Both sides are root mounts with allow_other on a base filesystem with ACLs (ext4 or tmpfs under
/var/tmp).  The other user is a bare uid/gid (no passwd entry needed) that `setpriv` switches to.
What is compared, step by step: the other user's exit status and output, `getfacl` through the
mount, the visible tree (modes and the ACL xattrs themselves) and, after unmount, the upper layer.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from util import D, F, Pair, Side, layer_digest, walk

from unionfs.core.caller import in_group_or_capable

pytestmark = pytest.mark.fuse

BOB = 61001          # uid and primary gid of the other user
NOT_BOB = 61002      # a group bob is not in


@pytest.fixture
def acl_pair(need_fuse: None, need_overlay: None) -> Iterator[Pair]:
    """A Pair in a directory the other user can reach (pytest's tmp_path is private to root), on a
    filesystem with ACLs."""
    base = Path(tempfile.mkdtemp(prefix="unionfs-acl-", dir="/var/tmp"))
    base.chmod(0o755)
    probe = base / "probe"
    probe.touch()
    r = subprocess.run(["setfacl", "-m", f"u:{BOB}:r", str(probe)], capture_output=True, text=True)
    probe.unlink()
    if r.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"no ACLs on /var/tmp: {r.stderr.strip()}")
    pr = Pair(base)
    for side in pr.sides:
        side.base.chmod(0o755)
    try:
        yield pr
    finally:
        try:
            pr.unmount(final=True)
        finally:
            pr.check_lowers()
            shutil.rmtree(base)


def build(pair: Pair, lower: list[Any], acls: dict[str, list[str]] | None = None, *,
          style: str = "overlay", dialect: str = "overlay", upper_acl: list[str] | None = None,
          work_acl: list[str] | None = None) -> None:
    """Build one lower branch and an empty upper on both sides, give lower paths the ACLs in *acls*
    (setfacl arguments), the upper root *upper_acl* and the work dirs *work_acl*, and mount."""
    pair.build([lower], upper=[], style=style, dialect=dialect, options=["allow_other"],
               kernel_options=[], mount=False)
    for side in pair.sides:
        assert side.upper is not None
        side.upper.chmod(0o755)
        for rel, args in (acls or {}).items():
            setfacl(side.lowers[0] / rel, args)
        if upper_acl:
            setfacl(side.upper, upper_acl)
        if work_acl and side.work is not None:
            setfacl(side.work, work_acl)
    for lp in pair.lower_digests:
        pair.lower_digests[lp] = layer_digest(lp)
    pair.mount()


def setfacl(path: Path, args: list[str]) -> None:
    subprocess.run(["setfacl", *args, str(path)], check=True, capture_output=True)


def run(cmd: str, *, user: bool = False, umask: int = 0o022) -> Callable[[Side], Any]:
    """``sh -c cmd`` in the side's mount, as root or as bob: (status, stdout, stderr)."""
    who = ["setpriv", f"--reuid={BOB}", f"--regid={BOB}", "--clear-groups", "--"] if user else []

    def op(s: Side) -> Any:
        r = subprocess.run([*who, "sh", "-c", f"umask {umask:03o}; {cmd}"], cwd=s.mnt,
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout, r.stderr.replace(str(s.mnt), "MNT")
    return op


def bob(cmd: str) -> Callable[[Side], Any]:
    return run(cmd, user=True)


def getfacl(*rels: str) -> Callable[[Side], Any]:
    return run("getfacl -n -p " + " ".join(rels))


def same_steps(pair: Pair, steps: list[tuple[str, Callable[[Side], Any]]]) -> None:
    for what, step in steps:
        pair.same(step, what)


def upper_getfacl(upper: Path) -> str:
    """getfacl of everything in a writable branch but whiteouts and AUFS bookkeeping, by path."""
    rels = []
    for rel, _abs, st in walk(os.fsencode(upper)):
        name = os.path.basename(rel)
        if rel.startswith(b".wh..wh.") or name.startswith(b".wh.") or (
                stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            continue
        rels.append(os.fsdecode(rel) if rel else ".")
    r = subprocess.run(["getfacl", "-n", "-p", *sorted(rels)], cwd=upper, capture_output=True,
                       text=True, check=True)
    return r.stdout


def assert_same_result(pair: Pair) -> None:
    """The visible trees are equal (modes and ACL xattrs included); after unmount, the upper layers
    are, and so is getfacl of every object in them."""
    pair.assert_same_tree()
    pair.assert_same_upper()
    assert pair.k.upper is not None and pair.u.upper is not None
    assert upper_getfacl(pair.u.upper) == upper_getfacl(pair.k.upper)


def test_deny_entry_is_honoured(acl_pair: Pair) -> None:
    """A `u:bob:---` entry keeps bob out of a world-readable file, whether it was in the lower
    branch or set through the mount."""
    build(acl_pair, [F("lowdeny", b"low", mode=0o644), F("f", b"data", mode=0o644), D("d", mode=0o755),
                     F("d/in", b"in")], {"lowdeny": ["-m", f"u:{BOB}:---"]})
    same_steps(acl_pair, [
        ("bob reads before", bob("cat lowdeny; cat f; ls d")),
        ("setfacl deny", run(f"setfacl -m u:{BOB}:--- f && setfacl -m u:{BOB}:--- d")),
        ("getfacl", getfacl("lowdeny", "f", "d")),
        ("bob is refused", bob("cat lowdeny; cat f; ls d; cat d/in")),
    ])
    assert_same_result(acl_pair)


def test_allow_entry_is_honoured(acl_pair: Pair) -> None:
    """`u:bob:r--` opens a 0600 file to bob; `u:bob:rwx` plus a default ACL opens a 0700 directory,
    and what bob makes in it inherits the default ACL."""
    build(acl_pair, [F("secret", b"s", mode=0o600), D("box", mode=0o700), F("box/old", b"o", mode=0o600)])
    same_steps(acl_pair, [
        ("bob is refused first", bob("cat secret; ls box; touch box/new")),
        ("setfacl allow", run(f"setfacl -m u:{BOB}:r-- secret && setfacl -m u:{BOB}:rwx,d:u:{BOB}:rwx box")),
        ("getfacl", getfacl("secret", "box")),
        ("bob reads the file", bob("cat secret")),
        ("bob writes in the dir", bob("ls box && echo b > box/new && mkdir box/sub && touch box/sub/x")),
        ("but not the other file", bob("cat box/old")),
        ("what bob made", getfacl("box/new", "box/sub", "box/sub/x")),
    ])
    assert_same_result(acl_pair)


def test_acls_survive_copy_up(acl_pair: Pair) -> None:
    """Lower objects with ACLs, copied up by a change root makes, keep every entry: bob's access is
    the same before and after, and the upper layer holds the kernel's ACLs."""
    build(acl_pair, [F("secret", b"s", mode=0o600), F("open", b"o", mode=0o644), D("box", mode=0o700),
                     F("box/f", b"f", mode=0o640)],
          {"secret": ["-m", f"u:{BOB}:r--"], "open": ["-m", f"u:{BOB}:---"],
           "box": ["-m", f"u:{BOB}:rwx,d:u:{BOB}:r-x,d:g::r-x"], "box/f": ["-m", f"u:{BOB}:r--"]})
    access = bob("cat secret; cat open; ls box; cat box/f; echo x >> box/f")
    same_steps(acl_pair, [
        ("bob before copy-up", access),
        ("root writes", run("echo more >> secret && echo more >> open && echo more >> box/f && touch box/new")),
        ("bob after copy-up", access),
        ("getfacl after copy-up", getfacl("secret", "open", "box", "box/f", "box/new")),
    ])
    assert_same_result(acl_pair)


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_default_acl_inheritance(acl_pair: Pair, style: str) -> None:
    """Files, directories and FIFOs made under a parent with a default ACL take it and ignore the
    umask; under a parent without one the umask applies once.  The same over a whiteout (a name
    deleted from the lower branch and made again), in a setgid parent, and with AUFS whiteouts."""
    dacl = ["-m", f"d:u::rwx,d:g::rwx,d:o::---,d:u:{BOB}:r-x"]
    names = [f"{k}{u}" for k in "fdp" for u in ("022", "077")]
    parents = ("acl", "plain", "sgid")
    build(acl_pair, [D("acl", mode=0o775), D("plain", mode=0o775), D("sgid", mode=0o2770, gid=BOB),
                     *[F(f"{d}/old-{n}", b"old") for d in parents for n in names]],
          {"acl": dacl, "sgid": dacl}, style=style, dialect=style)
    steps: list[tuple[str, Callable[[Side], Any]]] = []
    for umask in (0o022, 0o077):
        u = f"{umask:03o}"
        for parent in parents:
            for prefix in ("new-", "old-"):
                at = f"{parent}/{prefix}"
                make = f"touch {at}f{u} && mkdir {at}d{u} && mkfifo {at}p{u}"
                if prefix == "old-":    # the names exist below: made again over whiteouts
                    make = f"rm {at}f{u} {at}d{u} {at}p{u} && {make}"
                steps.append((f"umask {u} {at}", run(make, umask=umask)))
    steps.append(("getfacl of all", run("getfacl -n -p $(find acl plain sgid | sort)")))
    steps.append(("bob uses them", bob("cat acl/new-f022 acl/old-f077; ls acl/new-d022 acl/old-d077")))
    same_steps(acl_pair, steps)
    assert_same_result(acl_pair)


def test_chmod_updates_the_mask(acl_pair: Pair) -> None:
    """chmod of an object with an extended ACL sets its mask, which bounds bob's named entry."""
    build(acl_pair, [F("f", b"data", mode=0o660), D("d", mode=0o770)],
          {"f": ["-m", f"u:{BOB}:rw-"]})
    steps: list[tuple[str, Callable[[Side], Any]]] = [
        ("setfacl on the upper copy", run(f"setfacl -m u:{BOB}:rwx d")),
    ]
    for mode in ("640", "600", "660", "604"):
        steps += [
            (f"chmod {mode}", run(f"chmod {mode} f && chmod 7{mode[1:]} d")),
            (f"getfacl after chmod {mode}", getfacl("f", "d")),
            (f"bob after chmod {mode}", bob(f"cat f; echo b >> f; ls d; touch d/b-{mode}")),
        ]
    same_steps(acl_pair, steps)
    assert_same_result(acl_pair)


def test_revoke_is_seen_at_once(acl_pair: Pair) -> None:
    """Right after a setfacl or chmod through the mount, access is checked against the new mode and
    ACL, not against what the kernel cached when bob last looked (60 s attribute timeout)."""
    build(acl_pair, [F("f", b"data", mode=0o640, gid=BOB), D("d", mode=0o750, gid=BOB), F("d/x", b"x"),
                     F("g", b"g", mode=0o600), F("h", b"h", mode=0o640, gid=NOT_BOB)])
    steps: list[tuple[str, Callable[[Side], Any]]] = [
        ("copy up", run("chmod 640 f g h && chmod 750 d")),
        ("bob reads as a group member", bob("cat f; ls d")),
        ("g::--- revoke", run("setfacl -m g::--- f && setfacl -m g::--- d")),
        ("bob is refused at once", bob("cat f; ls d")),
        ("g::r-- grant", run("setfacl -m g::r-- f && setfacl -m g::r-x d")),
        ("bob reads again", bob("cat f; ls d")),
        ("chmod g-r", run("chmod g-r f")),
        ("bob refused after chmod", bob("cat f")),
        ("named entry", run(f"setfacl -m u:{BOB}:r-- g && setfacl -m g:{NOT_BOB}:r-- h")),
        ("bob reads the named entry", bob("cat g; cat h")),
        ("remove the entry", run(f"setfacl -x u:{BOB} g")),
        ("bob refused after removal", bob("cat g")),
        ("remove every ACL", run(f"setfacl -m u:{BOB}:r-- h && cat h && setfacl -b h")),
        ("bob refused after setfacl -b", bob("cat h")),
        ("getfacl", getfacl("f", "d", "g", "h")),
    ]
    same_steps(acl_pair, steps)
    assert_same_result(acl_pair)


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_copies_take_no_acl_from_the_work_dir(acl_pair: Pair, style: str) -> None:
    """Copies are assembled in a work dir: in the AUFS style inside the upper branch, whose root
    may carry a default ACL; in the overlay style inside the given workdir, which may too.  A copy
    gets its original's ACLs and no others, as on overlayfs (which strips its work dir)."""
    dacl = ["-m", f"d:u:{BOB}:rwx"]
    build(acl_pair, [F("f", b"data", mode=0o640), D("d", mode=0o750), F("d/x", b"x", mode=0o600)],
          style=style, dialect=style, upper_acl=dacl, work_acl=dacl)
    same_steps(acl_pair, [
        ("copy up", run("echo more >> f && echo more >> d/x && touch new")),
        ("getfacl", getfacl("f", "d", "d/x", "new")),
        ("bob", bob("cat f; cat d/x; ls d; cat new")),
    ])
    assert_same_result(acl_pair)


def test_setfacl_by_an_owner_outside_the_group_clears_setgid(acl_pair: Pair) -> None:
    """A change of the access ACL by a caller neither in the file's group nor privileged clears
    the setgid bit (a group member's or root's keeps it), set or removed, file or directory."""
    build(acl_pair, [D("d", mode=0o777),
                     *[F(f"d/{n}", b"x", mode=0o2775, uid=BOB, gid=g) for n, g in
                       (("other", NOT_BOB), ("own", BOB), ("byroot", NOT_BOB), ("rm", NOT_BOB))],
                     D("d/dir", mode=0o2775, uid=BOB, gid=NOT_BOB)],
          {"d/rm": ["-m", "u:1000:r"]})
    same_steps(acl_pair, [
        ("setgid", run("chmod 2775 d/other d/own d/byroot d/rm")),   # the layer's chown cleared it
        ("bob sets ACLs", bob("setfacl -m u:1000:r d/other d/own d/dir && setfacl -b d/rm")),
        ("root sets one", run("setfacl -m u:1000:r d/byroot")),
        ("modes", run("stat -c '%n %A' d/other d/own d/byroot d/rm d/dir")),
        ("getfacl", getfacl("d/other", "d/own", "d/byroot", "d/rm", "d/dir")),
    ])
    assert_same_result(acl_pair)


def test_in_group_or_capable_reads_the_callers_groups_and_capabilities() -> None:
    """What the server learns of a caller from /proc: supplementary groups, CAP_FSETID."""
    child = subprocess.Popen(["setpriv", f"--reuid={BOB}", f"--regid={BOB}", f"--groups={NOT_BOB}",
                              "--inh-caps=-all", "--", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text() != "sleep\n":    # setpriv is done
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert in_group_or_capable(child.pid, BOB, NOT_BOB)     # a supplementary group
        assert in_group_or_capable(child.pid, BOB, BOB)         # its own
        assert not in_group_or_capable(child.pid, BOB, 0)       # neither, and no CAP_FSETID
    finally:
        child.kill()
        child.wait()
    assert in_group_or_capable(os.getpid(), 12345, 0) == (os.geteuid() == 0)   # root: CAP_FSETID
    assert not in_group_or_capable(child.pid, BOB, 0)           # gone: nothing to go by


def test_setuid_file_made_by_a_user_under_a_default_acl(acl_pair: Pair) -> None:
    """bob creates a setuid and a setgid file in a directory with a default ACL: the set-id bits he
    asked for stay and the permission bits (the ACL's mask among them) are what the ACL gives."""
    dacl = ["-m", f"d:u::rwx,d:g::r-x,d:o::---,d:u:{BOB}:rwx,u:{BOB}:rwx"]
    build(acl_pair, [D("acl", mode=0o755)], {"acl": dacl})
    mk = ("python3 -c 'import os, sys; os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, "
          "int(sys.argv[2], 8)))'")
    same_steps(acl_pair, [
        ("bob creates 4775", bob(f"{mk} acl/suid 4775 && stat -c %a acl/suid")),
        ("bob creates 2750", bob(f"{mk} acl/sgid 2750 && stat -c %a acl/sgid")),
        ("getfacl", getfacl("acl/suid", "acl/sgid")),
    ])
    assert_same_result(acl_pair)
