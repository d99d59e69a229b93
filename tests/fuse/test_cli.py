"""The command line: bad input gets one clear line naming the culprit, a non-zero exit, nothing
mounted, no daemon and no traceback; help for every command; the background and foreground mount
lifecycles; ``unionfs-overlay`` with fuse-overlayfs' command line, also through
``mount -t fuse.unionfs-overlay``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
OVERLAY = util.program("unionfs-overlay")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what mount(8) gives helpers


def run(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


@pytest.fixture
def area(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    """A scratch area with branches A, B (each with a file), upper U, work W and mountpoint M.
    At the end: nothing may be mounted below it and no daemon may mention it."""
    for d in ("A", "B", "U", "W", "M"):
        (tmp_path / d).mkdir()
    (tmp_path / "A" / "a").write_text("a\n")
    (tmp_path / "B" / "b").write_text("b\n")
    yield tmp_path
    prefix = os.fsencode(str(tmp_path)) + b"/"
    left = [mp for mp, _t, _s in util.mounts() if mp.startswith(prefix)]
    for mp in reversed(left):
        util.umount(os.fsdecode(mp))
    # a background daemon exits shortly after its filesystem is unmounted
    daemons = util.wait_daemons_gone(str(tmp_path), timeout=10)
    if daemons:
        util.kill_daemons(str(tmp_path))
    assert not left, f"left mounted: {left}"
    assert not daemons, f"left daemons running (killed): {daemons}"


def assert_user_error(r: subprocess.CompletedProcess[str], culprit: str, area: Path) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    detail = f"exit {r.returncode}, stderr:\n{r.stderr}\nstdout:\n{r.stdout}"
    assert r.returncode != 0, detail
    assert "Traceback" not in r.stderr, detail
    assert len(lines) == 1, f"want exactly one line on stderr; {detail}"
    assert culprit in lines[0], f"the line should name {culprit!r}; {detail}"
    assert not util.is_mounted(area / "M"), detail
    assert not util.wait_daemons_gone(str(area), timeout=2), f"a daemon is still running; {detail}"


def _tmpfs(area: Path) -> Path:
    t = area / "tmpfs"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(t)], check=True)
    (t / "W").mkdir()
    return t


BAD: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "missing-branch": lambda a: (["mount", f"{a}/A:{a}/nope", f"{a}/M"], f"{a}/nope"),
    "branch-is-a-file": lambda a: (["mount", f"{a}/A:{a}/B/b", f"{a}/M"], f"{a}/B/b"),
    "same-branch-twice": lambda a: (["mount", f"{a}/A:{a}/B:{a}/A", f"{a}/M"], f"{a}/A"),
    "same-branch-twice-other-spelling": lambda a: (["mount", f"{a}/A:{a}/B/../A/", f"{a}/M"], "A"),
    "branch-inside-another": lambda a: (["mount", f"{a}/A:{a}/A/sub", f"{a}/M"], f"{a}/A"),
    "mountpoint-inside-branch": lambda a: (["mount", f"{a}/A:{a}/B", f"{a}/A/mnt"], f"{a}/A/mnt"),
    "mountpoint-is-a-file": lambda a: (["mount", f"{a}/A:{a}/B", f"{a}/A/a"], f"{a}/A/a"),
    "mountpoint-missing": lambda a: (["mount", f"{a}/A:{a}/B", f"{a}/nomnt"], f"{a}/nomnt"),
    "bad-branch-mode": lambda a: (["mount", f"{a}/A=rx:{a}/B", f"{a}/M"], "rx"),
    "unknown-option": lambda a: (["mount", "-o", "frobnicate", f"{a}/A:{a}/B", f"{a}/M"], "frobnicate"),
    "unknown-flag": lambda a: (["mount", "--frobnicate", f"{a}/A:{a}/B", f"{a}/M"], "frobnicate"),
    "bad-whiteout-value": lambda a: (["mount", "-o", "whiteout=zfs", f"{a}/A:{a}/B", f"{a}/M"], "zfs"),
    "overlay-missing-lower": lambda a: (["mount", "-o", f"lowerdir={a}/nope,upperdir={a}/U,workdir={a}/W",
                                         f"{a}/M"], f"{a}/nope"),
    "overlay-missing-upper": lambda a: (["mount", "-o", f"lowerdir={a}/A,upperdir={a}/nope,workdir={a}/W",
                                         f"{a}/M"], f"{a}/nope"),
    "overlay-missing-work": lambda a: (["mount", "-o", f"lowerdir={a}/A,upperdir={a}/U,workdir={a}/nope",
                                        f"{a}/M"], f"{a}/nope"),
    "overlay-upper-without-work": lambda a: (["mount", "-o", f"lowerdir={a}/A,upperdir={a}/U", f"{a}/M"],
                                             "workdir"),
    "overlay-work-inside-upper": lambda a: (["mount", "-o", f"lowerdir={a}/A,upperdir={a}/U,workdir={a}/U/w",
                                             f"{a}/M"], f"{a}/U/w"),
    "overlay-upper-is-lower": lambda a: (["mount", "-o", f"lowerdir={a}/A,upperdir={a}/A,workdir={a}/W",
                                          f"{a}/M"], f"{a}/A"),
    "overlay-upper-work-different-fs": lambda a: (
        ["mount", "-o", f"lowerdir={a}/A,upperdir={a}/U,workdir={_tmpfs(a)}/W", f"{a}/M"], f"{a}/tmpfs/W"),
    "overlay-empty-lowerdir": lambda a: (["mount", "-o", f"lowerdir=,upperdir={a}/U,workdir={a}/W", f"{a}/M"],
                                         "lowerdir"),
    "no-branches": lambda a: (["mount", f"{a}/M"], "BRANCHES"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(area: Path, case: str) -> None:
    if case in ("branch-inside-another",):
        (area / "A" / "sub").mkdir()
    if case == "mountpoint-inside-branch":
        (area / "A" / "mnt").mkdir()
    (area / "U" / "w").mkdir()
    try:
        args, culprit = BAD[case](area)
        r = run([UNIONFS, *args])
    finally:
        if util.is_mounted(area / "tmpfs"):
            util.umount(area / "tmpfs")
    assert_user_error(r, culprit, area)
    if case == "mountpoint-inside-branch":
        assert not util.is_mounted(area / "A" / "mnt")


def test_dev_fuse_cannot_be_opened(area: Path) -> None:
    """/dev/fuse that this process may not open: emulated in a private mount namespace by binding a
    mode-000 file over /dev/fuse and dropping CAP_DAC_OVERRIDE (what an ordinary user meets when
    /dev/fuse is mode 600). The one line must say /dev/fuse and how to fix it."""
    nofuse = area / "nofuse"
    nofuse.touch()
    nofuse.chmod(0)
    caps = "-dac_override,-dac_read_search"
    script = f'mount --bind "$1" /dev/fuse && shift && exec setpriv --bounding-set={caps} --inh-caps={caps} -- "$@"'
    r = run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(nofuse),
             UNIONFS, "mount", f"{area}/A:{area}/B", f"{area}/M"])
    assert_user_error(r, "/dev/fuse", area)
    line = r.stderr.strip()
    assert re.search(r"permission|denied|cannot open|can't open", line, re.I), line
    assert re.search(r"chmod|group|udev|root|sudo|modprobe|fuse\.conf|permission", line.split("/dev/fuse", 1)[1],
                     re.I), f"should say how to fix it: {line}"


# ---- help


def _commands() -> list[str]:
    r = run([UNIONFS, "--help"])
    assert r.returncode == 0, r.stderr
    cmds = re.findall(r"^  ([a-z][\w-]*)\s", r.stdout.split("Commands:", 1)[1], re.M) if "Commands:" in r.stdout else []
    return cmds


def test_help_for_every_command() -> None:
    for flag in ("--help", "-h"):
        r = run([UNIONFS, flag])
        assert r.returncode == 0 and "Usage:" in r.stdout and "Traceback" not in r.stderr, (flag, r)
    cmds = _commands()
    assert {"mount", "umount"} <= set(cmds), cmds
    for cmd in cmds:
        for flag in ("--help", "-h"):
            r = run([UNIONFS, cmd, flag])
            assert r.returncode == 0, (cmd, flag, r.stderr)
            assert "Usage:" in r.stdout and cmd in r.stdout, (cmd, flag, r.stdout)
    for flag in ("--help", "-h"):
        r = run([OVERLAY, flag])
        assert r.returncode == 0 and "lowerdir" in r.stdout + r.stderr, (flag, r)
    r = run([UNIONFS, "mount", "--help"])
    for word in ("BRANCHES", "lowerdir", "whiteout", "-f", "-d"):
        assert word in r.stdout, (word, r.stdout)


def test_umount_not_mounted(area: Path) -> None:
    r = run([UNIONFS, "umount", str(area / "M")])
    assert_user_error(r, str(area / "M"), area)


# ---- lifecycles


def test_background_mount_and_umount(area: Path) -> None:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", f"{area}/M"])
    assert r.returncode == 0, r.stderr
    try:
        assert util.mount_fstype(area / "M") is not None, "mount returned before the mount was ready"
        assert (area / "M" / "a").read_text() == "a\n" and (area / "M" / "b").read_text() == "b\n"
        assert util.find_daemons(str(area)), "no daemon serving the mount"
    finally:
        r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert not util.is_mounted(area / "M")
    assert not util.find_daemons(str(area)), "umount returned before the daemon exited"


def test_overlay_style_background_mount(area: Path) -> None:
    r = run([UNIONFS, "mount", "-o", f"lowerdir={area}/A:{area}/B,upperdir={area}/U,workdir={area}/W", f"{area}/M"])
    assert r.returncode == 0, r.stderr
    try:
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
        (area / "M" / "c").write_text("c")
    finally:
        r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert (area / "U" / "c").read_text() == "c"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_signal_unmounts_cleanly(area: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen([UNIONFS, "mount", "-f", f"{area}/A:{area}/B", f"{area}/M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        util.wait_for_mount(area / "M", proc)
        assert (area / "M" / "a").exists()
        proc.send_signal(sig)
        out, errout = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            util.umount(area / "M", proc)
    assert not util.is_mounted(area / "M"), "still mounted after the signal"
    assert b"Traceback" not in errout, errout.decode(errors="replace")
    assert proc.returncode in (0, -sig, 128 + sig), (proc.returncode, errout)


def test_debug_logs_requests(area: Path) -> None:
    proc = subprocess.Popen([UNIONFS, "mount", "-f", "-d", f"{area}/A:{area}/B", f"{area}/M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        util.wait_for_mount(area / "M", proc)
        os.listdir(area / "M")
        (area / "M" / "a").read_text()
    finally:
        util.umount(area / "M", proc)
    out = (proc.stdout.read() + proc.stderr.read()).decode(errors="replace")  # type: ignore[union-attr]
    ops = set(re.findall(r"\b(lookup|getattr|opendir|readdir|open|read|release)\b", out))
    assert len(ops) >= 3, f"want each request logged, saw {ops}: {out[-2000:]}"
    assert "Traceback" not in out


def _readdirs_seen(log: Path) -> int:
    return len(re.findall(r"\breaddir\(", log.read_text(errors="replace"))) if log.exists() else 0


@pytest.mark.parametrize("timeout", [None, "0"])
def test_kernel_keeps_listings_until_they_change(area: Path, timeout: str | None) -> None:
    """With the default caching a directory read twice is listed by the kernel the second time, and a
    change through the mount is seen at once; with -o timeout=0 every listing is asked for again."""
    log = area / "daemon.log"
    opts = ["-o", f"timeout={timeout}"] if timeout else []
    proc = subprocess.Popen([UNIONFS, "mount", "-f", "-d", "--log-file", str(log), *opts,
                             f"{area}/A:{area}/B", f"{area}/M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        util.wait_for_mount(area / "M", proc)
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
        first = _readdirs_seen(log)
        assert first >= 1
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
        again = _readdirs_seen(log)
        assert (again == first) if timeout is None else (again > first), (first, again)
        (area / "M" / "c").write_text("new")
        os.unlink(area / "M" / "a")
        assert sorted(os.listdir(area / "M")) == ["b", "c"]
        assert _readdirs_seen(log) > again
    finally:
        util.umount(area / "M", proc)


def test_listing_read_while_the_directory_changes(area: Path) -> None:
    """A reader part-way through a large directory while others create and delete in it sees
    every name that stayed exactly once (the kernel's cached listing is dropped by the change; the
    reader goes on from its offset in the listing it started with)."""
    for i in range(1500):
        (area / "B" / f"low{i:04}").write_text("")
    for i in range(1500):
        (area / "A" / f"up{i:04}").write_text("")
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", f"{area}/M"])
    assert r.returncode == 0, r.stderr
    try:
        m = area / "M"
        # what the union shows, known without listing it (the reader below must be the first)
        before = {p.name for b in ("A", "B") for p in (area / b).iterdir() if not p.name.startswith(".wh.")}
        assert len(before) == 3002
        seen: list[str] = []
        with os.scandir(m) as it:
            for entry in it:
                seen.append(entry.name)
                if len(seen) == 200:
                    for i in range(0, 1500, 3):          # delete some, add some, under the reader
                        os.unlink(m / f"up{i:04}")
                        (m / f"added{i:04}").write_text("")
        assert len(seen) == len(set(seen)), "a name was listed twice"
        stayed = {n for n in before if not (n.startswith("up") and int(n[2:]) % 3 == 0)}
        assert stayed <= set(seen), sorted(stayed - set(seen))[:5]
        after = set(os.listdir(m))
        assert after == stayed | {f"added{i:04}" for i in range(0, 1500, 3)}
    finally:
        run(["fusermount3", "-u", str(area / "M")])


# ---- unionfs-overlay


def _overlay_opts(a: Path) -> str:
    return f"lowerdir={a}/A:{a}/B,upperdir={a}/U,workdir={a}/W"


def test_unionfs_overlay_mounts_like_fuse_overlayfs(area: Path) -> None:
    r = run([OVERLAY, "-o", _overlay_opts(area), str(area / "M")])
    assert r.returncode == 0, r.stderr
    try:
        assert util.is_mounted(area / "M")
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
    finally:
        u = run(["fusermount3", "-u", str(area / "M")])
    assert u.returncode == 0, u.stderr
    assert not util.is_mounted(area / "M")


@pytest.mark.parametrize("opts", ["fsync=0", "static_nlink", "noacl", "squash_to_root", "fast_ino=1",
                                  "xattr_permissions=2", "volatile"])
def test_unionfs_overlay_ignores_unknown_fuse_overlayfs_options(area: Path, opts: str) -> None:
    r = run([OVERLAY, "-o", f"{_overlay_opts(area)},{opts}", str(area / "M")])
    try:
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and opts.split("=")[0] in lines[0], f"want one line naming {opts}: {r.stderr!r}"
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
    finally:
        run(["fusermount3", "-u", str(area / "M")])


def test_unionfs_overlay_source_argument_first(area: Path) -> None:
    """mount.fuse3 calls the program as `PROG SOURCE MOUNTPOINT -o OPTS`."""
    r = run([OVERLAY, "overlay", str(area / "M"), "-o", f"rw,{_overlay_opts(area)}"])
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
    finally:
        run(["fusermount3", "-u", str(area / "M")])


@pytest.fixture
def overlay_on_safe_path() -> Iterator[None]:
    """mount(8) runs helpers with a fixed PATH, so unionfs-overlay must be in /usr/local/bin (the
    set-up script should put it there). If it is missing, link it for this test and remove it after."""
    link = Path("/usr/local/bin/unionfs-overlay")
    created = False
    dangling = os.readlink(link) if link.is_symlink() and not link.exists() else None
    found = [os.path.join(d, "unionfs-overlay") for d in SAFE_PATH.split(":")
             if os.access(os.path.join(d, "unionfs-overlay"), os.X_OK)]
    if not found:
        if dangling is not None:
            link.unlink()      # left by a checkout that is gone; put back after the test
        link.symlink_to(OVERLAY)
        created = True
    elif os.path.realpath(found[0]) not in (os.path.realpath(OVERLAY),   # or the C client in front of it
                                            os.path.realpath(Path(OVERLAY).with_name("unionfs-fastclient"))):
        pytest.fail(f"mount(8) would run {found[0]} -> {os.path.realpath(found[0])}, not this checkout's "
                    f"{OVERLAY}; run scripts/setup.sh from this checkout")
    try:
        yield
    finally:
        if created and link.is_symlink() and os.readlink(link) == OVERLAY:
            link.unlink()
            if dangling is not None:
                link.symlink_to(dangling)


def test_fstab_style_mount(area: Path, overlay_on_safe_path: None) -> None:
    r = run(["mount", "-t", "fuse.unionfs-overlay", "overlay", str(area / "M"), "-o", _overlay_opts(area)])
    try:
        assert r.returncode == 0, r.stderr
        assert (util.mount_fstype(area / "M") or "").startswith("fuse")
        assert sorted(os.listdir(area / "M")) == ["a", "b"]
        (area / "M" / "new").write_text("n")
        assert (area / "U" / "new").read_text() == "n"
    finally:
        u = run(["umount", str(area / "M")])
    assert u.returncode == 0, u.stderr
    assert not util.is_mounted(area / "M")
