"""What daemons that are gone leave in the state directory, and what the resident server's log keeps.

What a user sees: ``unionfs umount MNT`` (the C client and the Python command) returns at once and
says nothing wrong when the mount's pidfile names no daemon of that mount: one left by a daemon that
died with its PID namespace (its pid, 6 say, is a kernel thread's on the host), a bare pid of an
older version, or a pid that is now another process's.  What such daemons leave (pidfile, control
socket, empty log) is cleared by the next resident server's start, or by a daemon once mounted (at
most every ten minutes); what a live daemon has, a log with something in it and anything younger
than a minute stay.  The server's log is renamed to ``server.log.1`` at its start once over 1 MiB.

Each test runs in a mount namespace of its own whose /run/unionfs (root's state directory) is a new
tmpfs: the host's state directory is neither read nor left with anything.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import util
from test_resident_c import client

pytestmark = pytest.mark.usefixtures("need_fuse")

UNIONFS = util.program("unionfs")
STATE = "/run/unionfs"
__all__ = ["client"]   # a fixture used here
#: sh: whether the process $1 has exited (gone, or a zombie not reaped yet), as umount counts it
EXITED = """sh -c '[ ! -e /proc/$1 ] || [ "$(sed "s/.*) //" /proc/$1/stat | cut -c1)" = Z ]' -"""


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("root's state directory in a mount namespace of the test's own: the tests run as root")


def key(mountpoint: Path) -> str:
    return hashlib.sha1(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]


def in_private_state(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the sh *script* (``set -eu``) in a mount namespace of its own, with a new, empty
    /run/unionfs; whatever it leaves mounted goes with the namespace (its daemons are unmounted
    at the end: `$UNMOUNT_ALL`)."""
    private = (f"mount -t tmpfs -o mode=0700 tmpfs {STATE}" if os.path.isdir(STATE)
               else f"mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -m 0700 {STATE}")
    cleanup = ("trap 'for m in $(grep -o \" [^ ]* [^ ]* - fuse.unionfs \" /proc/self/mountinfo | "
               "cut -d\" \" -f2); do fusermount3 -u -z \"$m\"; done; "
               f"UNIONFS_SERVER=auto {UNIONFS} server stop >/dev/null 2>&1 || true' EXIT")
    env = dict(os.environ, UNIONFS_SERVER="off", U=UNIONFS)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc",
                           f"{private}\n{cleanup}\n{script}"],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def area(tmp_path: Path, *names: str) -> Path:
    for name in ("A", "B", *names):
        (tmp_path / name).mkdir()
    (tmp_path / "B" / "b").write_text("from B\n")
    return tmp_path


def timed(command: str) -> str:
    """sh that runs *command* and says ``rc=N ms=T``."""
    return (f"t0=$(date +%s%N); rc=0; {command} || rc=$?; t1=$(date +%s%N); "
            "echo rc=$rc ms=$(( (t1 - t0) / 1000000 ))")


def said(out: str, what: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in out.split() if ln.startswith(what + "=")]


@pytest.mark.parametrize("which", ["C", "Python"])
def test_umount_after_the_daemon_died_with_its_pid_namespace(tmp_path: Path, client: Path, which: str) -> None:
    """The daemon ran in a PID namespace (``unshare --pid --fork``) that is gone, and it with it: its
    pidfile's pid is another process's here.  The dead mount is unmounted at once, without a word."""
    a = area(tmp_path, "M")
    umount = f"{client / 'unionfs'}" if which == "C" else f"UNIONFS_SERVER=off {UNIONFS}"
    script = f"""
        unshare --pid --fork sh -c '$U mount {a}/A:{a}/B {a}/M && cat {a}/M/b' >/dev/null
        echo pid=$(cut -d" " -f1 {STATE}/{key(a / 'M')}.pid)
        {timed(f"{umount} umount {a}/M")}
        grep -q " {a}/M " /proc/self/mountinfo && echo mounted=yes || echo mounted=no
    """
    r = in_private_state(script)
    assert r.returncode == 0, r.stderr
    pid = int(said(r.stdout, "pid")[0])
    assert pid < 100, "the daemon's pid in its namespace is not a small one"
    assert said(r.stdout, "rc") == ["0"], r.stderr
    assert r.stderr == ""
    assert int(said(r.stdout, "ms")[0]) < 10_000, f"umount waited on pid {pid} of the host"
    assert said(r.stdout, "mounted") == ["no"]


@pytest.mark.parametrize("which", ["C", "Python"])
@pytest.mark.parametrize("pidfile", ["bare pid", "another start"])
def test_umount_with_a_pidfile_that_names_a_live_stranger(tmp_path: Path, client: Path, which: str,
                                                          pidfile: str) -> None:
    """The pidfile names a live process that is not the mount's daemon: an older version's bare pid,
    or a pid reused by another process since (the pidfile's start time is not its).  The mount is
    unmounted at once, and its daemon exits all the same."""
    a = area(tmp_path, "M")
    umount = f"{client / 'unionfs'}" if which == "C" else f"UNIONFS_SERVER=off {UNIONFS}"
    pidfile_ = f"{STATE}/{key(a / 'M')}.pid"
    forge = ('echo "$stranger" >' if pidfile == "bare pid" else
             'echo "$stranger $(( $(cut -d" " -f22 /proc/$stranger/stat) + 1 )) $(stat -L -c %i /proc/self/ns/pid)" >')
    script = f"""
        $U mount {a}/A:{a}/B {a}/M
        daemon=$(cut -d" " -f1 {pidfile_})
        sleep 300 & stranger=$!
        {forge} {pidfile_}
        {timed(f"{umount} umount {a}/M")}
        grep -q " {a}/M " /proc/self/mountinfo && echo mounted=yes || echo mounted=no
        for i in $(seq 500); do {EXITED} $daemon && break; sleep 0.02; done
        {EXITED} $daemon && echo daemon=gone || echo daemon=alive
        kill $stranger
    """
    r = in_private_state(script)
    assert r.returncode == 0, r.stderr
    assert said(r.stdout, "rc") == ["0"] and r.stderr == "", r.stderr
    assert int(said(r.stdout, "ms")[0]) < 10_000, "umount waited on a process that is not the daemon"
    assert said(r.stdout, "mounted") == ["no"]
    assert said(r.stdout, "daemon") == ["gone"]


def test_umount_still_waits_for_the_daemon(tmp_path: Path, client: Path) -> None:
    """The pidfile of a live daemon: umount returns once it has exited (so that the filesystem under
    its branches is free at once)."""
    a = area(tmp_path, "M", "N")
    script = f"""
        for m in M N; do $U mount {a}/A:{a}/B {a}/$m; done
        m=$(cut -d" " -f1 {STATE}/{key(a / 'M')}.pid); n=$(cut -d" " -f1 {STATE}/{key(a / 'N')}.pid)
        {client / 'unionfs'} umount {a}/M
        {EXITED} $m && echo m=gone || echo m=alive
        $U umount {a}/N
        {EXITED} $n && echo n=gone || echo n=alive
        ls {STATE}
    """
    r = in_private_state(script)
    assert r.returncode == 0, r.stderr
    assert (said(r.stdout, "m"), said(r.stdout, "n")) == (["gone"], ["gone"])
    assert key(a / "M") not in r.stdout and key(a / "N") not in r.stdout, "a daemon left its state files"


@pytest.mark.parametrize("which", ["C", "Python"])
def test_umount_in_a_pid_namespace_with_the_hosts_proc(tmp_path: Path, client: Path, which: str) -> None:
    """``unshare --pid --fork`` keeps the host's /proc, where the daemon's pid (a small one) is another
    process's: umount in that namespace still waits for the daemon (its pidfile is gone, and the
    filesystem under its branches free, once umount has returned)."""
    a = area(tmp_path, "M", "T")
    umount = f"{client / 'unionfs'}" if which == "C" else f"UNIONFS_SERVER=off {UNIONFS}"
    inner = tmp_path / "inner.sh"
    inner.write_text(f"""
        for i in 1 2 3; do
            mount -t tmpfs -o size=1m tmpfs {a}/T
            mkdir {a}/T/A {a}/T/B
            $U mount {a}/T/A:{a}/T/B {a}/M
            echo pid=$(cut -d" " -f1 {STATE}/{key(a / 'M')}.pid)
            echo x > {a}/M/x
            {umount} umount {a}/M
            [ -e {STATE}/{key(a / 'M')}.pid ] && echo pidfile=left || echo pidfile=gone
            umount {a}/T
        done
    """)
    r = in_private_state(f"unshare --pid --fork sh -eu {inner}")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert all(int(pid) < 100 for pid in said(r.stdout, "pid"))
    assert said(r.stdout, "pidfile") == ["gone"] * 3, "umount returned before the daemon exited"


def listing(out: str) -> set[str]:
    return {ln for ln in out.split() if "=" not in ln}


def plant_and_sweep(a: Path, sweeper: str, swept: bool = True) -> subprocess.CompletedProcess[str]:
    """In a private state directory: what a daemon killed with SIGKILL leaves (on M), what one that
    died with its PID namespace leaves (on P), an old version's bare pidfile with a dead socket and
    an empty log (on Q), a log with warnings in it (on R), all an hour old; a live daemon's files
    (on L), an hour old too; a bare pidfile just written (on Y); a spare worker's throwaways, an
    hour old and new (server/rehearsal.py); then *sweeper*, and the listing
    (once M's pidfile is gone, when *swept*: a daemon sweeps on a thread of its own)."""
    s = STATE
    q, r, y = key(a / "Q"), key(a / "R"), key(a / "Y")
    script = f"""
        $U mount {a}/A:{a}/B {a}/M
        kill -9 $(cut -d" " -f1 {s}/{key(a / 'M')}.pid)
        fusermount3 -u {a}/M
        unshare --pid --fork sh -c '$U mount {a}/A:{a}/B {a}/P && cat {a}/P/b' >/dev/null
        fusermount3 -u {a}/P
        echo 6 > {s}/{q}.pid; : > {s}/{q}.log
        python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).bind(sys.argv[1])' \\
            {s}/{q}.ctl
        echo "a warning" > {s}/{r}.log
        mkdir {s}/rehearsal-killed; : > {s}/rehearsal-killed/f; : > {s}/rehearsal-99999.log
        $U mount {a}/A:{a}/B {a}/L
        touch -d "1 hour ago" {s}/*
        echo 6 > {s}/{y}.pid
        : > {s}/rehearsal-fresh.log
        {sweeper}
        for i in $(seq {200 if swept else 0}); do [ -e {s}/{key(a / 'M')}.pid ] || break; sleep 0.05; done
        cat {a}/L/b >/dev/null
        ls -A {s}
    """
    return in_private_state(script)


@pytest.mark.parametrize("sweeper", ["server start", "a daemon"])
def test_what_gone_daemons_left_is_swept(tmp_path: Path, sweeper: str) -> None:
    a = area(tmp_path, "M", "P", "L", "N")
    run = ("UNIONFS_SERVER=auto $U server" if sweeper == "server start" else
           f"rm -f {STATE}/.swept; $U mount {a}/A:{a}/B {a}/N")
    r = plant_and_sweep(a, run)
    assert r.returncode == 0, r.stderr
    left = listing(r.stdout)
    for gone in ("M", "P", "Q"):
        assert not {n for n in left if n.startswith(key(a / gone))}, f"the files of {gone} are left: {left}"
    live = key(a / "L")
    assert {f"{live}.pid", f"{live}.ctl", f"{live}.log"} <= left, "a live daemon's files were taken"
    assert f"{key(a / 'R')}.log" in left, "a log with warnings in it was taken"
    assert f"{key(a / 'Y')}.pid" in left, "a pidfile just written was taken"
    assert not {"rehearsal-killed", "rehearsal-99999.log"} & left, "a killed spare's throwaways are left"
    assert "rehearsal-fresh.log" in left, "a spare's throwaway was taken while it may be in use"


def test_no_sweep_more_often_than_every_ten_minutes(tmp_path: Path) -> None:
    a = area(tmp_path, "M", "P", "L", "N")
    r = plant_and_sweep(a, f"touch {STATE}/.swept; $U mount {a}/A:{a}/B {a}/N; sleep 1", swept=False)
    assert r.returncode == 0, r.stderr
    assert f"{key(a / 'M')}.pid" in listing(r.stdout), "swept again within ten minutes"


def test_server_log_is_kept_under_a_mebibyte(tmp_path: Path) -> None:
    """At its start the server renames a log of more than 1 MiB to server.log.1 (replacing the one
    before) and starts a new one."""
    a = area(tmp_path, "M")
    s = STATE
    script = f"""
        echo older > {s}/server.log.1
        head -c 1100000 /dev/zero | tr '\\0' x > {s}/server.log
        export UNIONFS_SERVER=auto
        $U server
        $U mount {a}/A:{a}/B {a}/M
        $U umount {a}/M
        $U server stop
        echo log=$(stat -c %s {s}/server.log) log1=$(stat -c %s {s}/server.log.1)
        $U server
        $U server stop
        echo log=$(stat -c %s {s}/server.log) log1=$(stat -c %s {s}/server.log.1)
        grep -c " on {a}/M: " {s}/server.log
    """
    r = in_private_state(script)
    assert r.returncode == 0, r.stderr
    assert said(r.stdout, "log1") == ["1100000", "1100000"], "server.log.1 is not the log that grew too long"
    first, second = (int(n) for n in said(r.stdout, "log"))
    assert 0 < first < 10_000 and second > first, "the new log does not go on"
    assert r.stdout.split()[-1] == "1", "the mount is not in the new log"


def test_server_log_is_renamed_while_the_server_runs(tmp_path: Path) -> None:
    """A server that runs long: the mount that takes its log over 1 MiB is the last in server.log.1."""
    a = area(tmp_path, "M")
    s = STATE
    script = f"""
        head -c $((1048576 - 10)) /dev/zero | tr '\\0' x > {s}/server.log
        export UNIONFS_SERVER=auto
        $U server
        for i in 1 2; do $U mount {a}/A:{a}/B {a}/M; $U umount {a}/M; done
        $U server stop
        echo old=$(grep -c " on {a}/M: " {s}/server.log.1) new=$(grep -c " on {a}/M: " {s}/server.log)
        echo size=$(stat -c %s {s}/server.log)
    """
    r = in_private_state(script)
    assert r.returncode == 0, r.stderr
    assert (said(r.stdout, "old"), said(r.stdout, "new")) == (["1"], ["1"])
    assert int(said(r.stdout, "size")[0]) < 10_000
