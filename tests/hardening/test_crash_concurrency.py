"""Hardening, SIGKILL during a storm and concurrent processes.

(How these tests are built: see conftest.py here.)
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import util
from hardening_util import (
    FORK,
    Layers,
    data_for,
    errno_name,
    figure,
    kernel_view,
    )

pytestmark = pytest.mark.fuse


# ==================================================================================================
# 2. Crash safety: SIGKILL of the daemon during a storm


BIG = 3 << 20          # copied on a worker thread (over 1 MiB)
NBIG, NSMALL = 6, 30


def _crash_lower(lower: Path) -> dict[bytes, bytes]:
    files: dict[bytes, bytes] = {}
    (lower / "dir").mkdir()
    for i in range(NBIG):
        files[b"big%d" % i] = data_for(b"big%d" % i, BIG)
    for i in range(NSMALL):
        files[b"dir/s%d" % i] = data_for(b"s%d" % i, 1000 + i)
    for rel, data in files.items():
        (lower / os.fsdecode(rel)).write_bytes(data)
    return files


def _journal(jfd: int, line: str) -> None:
    os.write(jfd, (line + "\n").encode())
    os.fsync(jfd)


def _mount_is_dead(mnt: bytes) -> bool:
    try:
        os.stat(mnt)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _storm(mnt: bytes, journal: str, seed: int, worker: int) -> None:
    """Copy-ups (chmod, O_RDWR open), renames, unlinks and new fsynced files until the mount dies.
    Intentions and completions go to a journal outside the mount, fsynced."""
    rng = random.Random(seed * 100 + worker)
    jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    k = 0
    try:
        while True:
            k += 1
            op = rng.choice(["chmod", "rdwr", "rename", "unlink", "new", "new", "newbig"])
            try:
                if op in ("chmod", "rdwr", "rename", "unlink"):
                    pool = [b"big%d" % i for i in range(NBIG)] + [b"dir/s%d" % i for i in range(NSMALL)]
                    rel = rng.choice(pool)
                    p = os.path.join(mnt, rel)
                    if op == "chmod":
                        os.chmod(p, 0o600 | rng.randrange(0o100))
                    elif op == "rdwr":
                        os.close(os.open(p, os.O_RDWR))
                    elif op == "rename":
                        _journal(jfd, f"gone {os.fsdecode(rel)}")
                        os.rename(p, p + b".r%d-%d" % (worker, k))
                    else:
                        _journal(jfd, f"gone {os.fsdecode(rel)}")
                        os.unlink(p)
                else:
                    size = rng.randrange(1, 200_000) if op == "new" else 2 << 20
                    name = b"dir/n-%d-%d-%d" % (seed, worker, k)
                    data = data_for(name, size)
                    fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    _journal(jfd, f"done {os.fsdecode(name)} {size}")
            except OSError as e:
                if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    return
                # ENOENT: a name another worker removed first
                if e.errno == errno.ENOENT:
                    continue
                # A call in flight as the daemon dies may end with any error the kernel picks for an
                # aborted request (EIO from a write's fsync was seen): if the mount is gone by now, this
                # error was its death, not a bug.
                if _mount_is_dead(mnt):
                    return
                _journal(jfd, f"errno {errno_name(e)} {op}")
    finally:
        os.close(jfd)


def _verify_after_crash(layers: Layers, lower_files: dict[bytes, bytes], journal: Path) -> dict[str, int]:
    m = layers.m()
    done: dict[bytes, int] = {}
    gone: set[bytes] = set()
    odd: list[str] = []
    for line in journal.read_text().splitlines():
        parts = line.split(" ")
        if parts[0] == "done":
            done[os.fsencode(parts[1])] = int(parts[2])
        elif parts[0] == "gone":
            gone.add(os.fsencode(parts[1]))
        elif parts[0] == "errno":
            odd.append(line)
    assert not odd, f"the storm met unexpected errors: {odd[:10]}"
    checked = 0
    seen = util.snapshot(m)
    for rel, desc in seen.items():
        if desc["type"] != "file":
            continue
        base = rel.split(b".r")[0] if b".r" in rel else rel
        if base in lower_files:
            want = lower_files[base]
            got = open(os.path.join(m, rel), "rb").read()
            assert got == want, f"{rel!r}: partial or changed copy ({len(got)} of {len(want)} bytes)"
            checked += 1
        elif rel.startswith(b"dir/n-"):
            got = open(os.path.join(m, rel), "rb").read()
            full = data_for(rel, done.get(rel, len(got)))
            assert full.startswith(got), f"{rel!r}: content is not what was written"
            checked += 1
        else:
            raise AssertionError(f"unexpected file {rel!r} after the crash")
    for rel, size in done.items():
        if rel in gone:
            continue
        got = open(os.path.join(m, rel), "rb").read()
        assert got == data_for(rel, size), f"{rel!r}: fsynced file not intact after the crash"
    for rel in lower_files:
        if rel not in gone:
            assert rel in seen, f"{rel!r} vanished though nothing removed it"
    return {"files_checked": checked, "fsynced": len(done)}


def _crash_rounds(layers: Layers, rounds: int, seed: int, style: str = "overlay") -> dict[str, Any]:
    lower_files = _crash_lower(layers.lowers[0])
    lower_before = layers.lower_digests()
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    workdir = layers.workdir(style)
    for rnd in range(rounds):
        d = layers.daemon(style=style).start()
        # the work dir is clean once mounted, whatever the last crash left
        assert os.listdir(workdir) == [], f"round {rnd}: work dir not cleaned: {os.listdir(workdir)}"
        journal = layers.base / f"journal-{rnd}"
        workers = [FORK.Process(target=_storm, args=(layers.m(), str(journal), seed * 1000 + rnd, w))
                   for w in range(3)]
        try:
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.2, 1.2))   # the random moment of the crash
            leftovers = len(os.listdir(workdir))
            stats["kills_with_temporaries"] += bool(leftovers)
            d.kill(detach=False)      # the workers now get ENOTCONN and stop
            for w in workers:
                w.join(timeout=30)
                assert w.exitcode == 0, f"storm worker ended with {w.exitcode}"
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join()
            if d.proc is not None:
                d.kill(detach=False)
            d.detach()
        d = layers.daemon(style=style).start()
        try:
            assert os.listdir(workdir) == [], f"round {rnd}: leftovers after remount: {os.listdir(workdir)}"
            jn = layers.base / "journal-all"
            with open(jn, "ab") as f:
                f.write(journal.read_bytes())
            r = _verify_after_crash(layers, lower_files, jn)
            stats["files_checked"] += r["files_checked"]
            stats["fsynced"] = r["fsynced"]
        finally:
            d.stop()
        stats["rounds"] += 1
        assert layers.lower_digests() == lower_before, f"round {rnd}: a lower branch changed"
    if style == "aufs":
        return dict(stats)      # kernel overlayfs does not read AUFS whiteouts
    # in the end the union agrees with kernel overlayfs on the same layers
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    d = layers.daemon().start()
    try:
        util.assert_trees_equal(kview, util.snapshot(layers.m()))
    finally:
        d.stop()
    return dict(stats)


def test_sigkill_during_a_storm(layers: Layers) -> None:
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=5, seed=11)
    figure("crash", **s, seconds=round(time.monotonic() - t0, 1))


@pytest.mark.slow
def test_sigkill_during_a_storm_long(layers: Layers) -> None:
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=20, seed=12)
    figure("crash_long", **s, seconds=round(time.monotonic() - t0, 1))


@pytest.mark.slow
def test_sigkill_during_a_storm_aufs_style(layers: Layers) -> None:
    """The same storm on an AUFS-style mount (temporaries hidden in the writable branch; a rename
    of a lower file is rename-then-whiteout, so a crash between them may show the lower file again,
    as documented — never a partial one)."""
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=10, seed=13, style="aufs")
    figure("crash_aufs_long", **s, seconds=round(time.monotonic() - t0, 1))


# ==================================================================================================
# 3. Concurrency


# errnos kernel overlayfs gives to these calls on overlapping paths
ALLOWED_ERRNOS = {"ENOENT", "EEXIST", "ENOTEMPTY", "EXDEV", "EISDIR", "ENOTDIR", "EINVAL", "ELOOP", "EBUSY",
                  "EPERM"}   # EPERM: link() of a directory, refused by the VFS
CONC_NAMES = [b"a", b"b", b"c", b"lf0", b"lf1", b"ld", b"ld/x", b"ld/y", b"ld/lf", b"nd", b"nd/z", b"nd/a"]


def _conc_lower(lower: Path) -> None:
    (lower / "ld").mkdir()
    for rel in ("lf0", "lf1", "ld/lf", "ld/x"):
        (lower / rel).write_bytes(data_for(rel, 3000))
    (lower / "bigf").write_bytes(data_for("bigf", 2 << 20))


def _conc_worker(mnt: bytes, seed: int, seconds: float, out: Any) -> None:
    rng = random.Random(seed)
    errs: Counter[str] = Counter()
    examples: dict[str, str] = {}
    history: list[str] = []
    ops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        a = os.path.join(mnt, rng.choice(CONC_NAMES))
        b = os.path.join(mnt, rng.choice(CONC_NAMES))
        op = rng.choice(["create", "write", "unlink", "rename", "mkdir", "rmdir", "chmod", "read", "list",
                         "truncate", "symlink", "link", "big"])
        ops += 1
        try:
            if op == "create":
                fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                os.write(fd, data_for(a, rng.randrange(5000)))
                os.close(fd)
            elif op == "write":
                fd = os.open(a, os.O_WRONLY | os.O_NOFOLLOW)
                os.pwrite(fd, b"w" * 100, rng.randrange(4000))
                os.close(fd)
            elif op == "unlink":
                os.unlink(a)
            elif op == "rename":
                os.rename(a, b)
            elif op == "mkdir":
                os.mkdir(a)
            elif op == "rmdir":
                os.rmdir(a)
            elif op == "chmod":
                os.chmod(a, 0o600 | rng.randrange(0o100), follow_symlinks=False) \
                    if os.chmod in os.supports_follow_symlinks else os.chmod(a, 0o644)
            elif op == "read":
                fd = os.open(a, os.O_RDONLY | os.O_NOFOLLOW)
                os.read(fd, 1 << 16)
                os.close(fd)
            elif op == "list":
                os.listdir(a)
            elif op == "truncate":
                os.truncate(a, rng.randrange(6000))
            elif op == "symlink":
                os.symlink(b"target", a)
            elif op == "link":
                os.link(a, b, follow_symlinks=False)
            else:
                fd = os.open(os.path.join(mnt, b"bigf"), os.O_RDWR)
                os.pwrite(fd, b"B", rng.randrange(2 << 20))
                os.close(fd)
        except OSError as e:
            key = f"{op}:{errno_name(e)}"
            errs[key] += 1
            if key.split(":")[1] not in ALLOWED_ERRNOS and key not in examples:
                examples[key] = f"{op}({a!r}, {b!r}) after {history[-6:]}"
        history.append(f"{op} {a[len(mnt):]!r} {b[len(mnt):]!r}")
    out.put((ops, dict(errs), examples))


def _concurrency(layers: Layers, nproc: int, seconds: float, seed: int) -> dict[str, Any]:
    _conc_lower(layers.lowers[0])
    lower_before = layers.lower_digests()
    d = layers.daemon().start()
    q = FORK.Queue()
    procs = [FORK.Process(target=_conc_worker, args=(layers.m(), seed * 100 + i, seconds, q)) for i in range(nproc)]
    results = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            try:
                results.append(q.get(timeout=seconds + 60))
            except Exception:
                aborted = util.abort_fuse_under(layers.mnt)
                raise AssertionError(f"a worker hung (deadlock?); aborted {aborted}") from None
        for p in procs:
            p.join(timeout=30)
        assert d.alive(), "the daemon died under concurrent load"
        os.listdir(layers.m())          # and still answers
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        d.stop(check=False)
    log_text = d.log_text()
    ops = sum(r[0] for r in results)
    errs: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for _, e, ex in results:
        errs.update(e)
        examples.update(ex)
    bad = {k: v for k, v in errs.items() if k.split(":")[1] not in ALLOWED_ERRNOS}
    assert layers.lower_digests() == lower_before
    # the union agrees with kernel overlayfs on the layers it left behind
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    d = layers.daemon().start()
    try:
        uview = util.snapshot(layers.m())
    finally:
        d.stop()
    tracebacks = [ln for ln in log_text.splitlines() if "unexpected error in" in ln]
    return {"ops": ops, "errors": dict(errs), "bad": bad, "paths_compared": len(uview), "kview": kview,
            "uview": uview, "tracebacks": tracebacks, "examples": examples}


def _assert_concurrency(r: dict[str, Any]) -> None:
    assert not r["bad"], f"errnos kernel overlayfs would not give: {r['bad']}; e.g. {r['examples']}"
    assert not r["tracebacks"], f"{len(r['tracebacks'])} unexpected errors (EIO), e.g. {r['tracebacks'][:3]}"
    util.assert_trees_equal(r["kview"], r["uview"])


def test_concurrent_random_ops(layers: Layers) -> None:
    t0 = time.monotonic()
    r = _concurrency(layers, nproc=8, seconds=15, seed=21)
    figure("concurrency", procs=8, seconds=15, ops=r["ops"], paths_compared=r["paths_compared"],
           elapsed=round(time.monotonic() - t0, 1), bad=r["bad"], eio=len(r["tracebacks"]))
    _assert_concurrency(r)


@pytest.mark.slow
def test_concurrent_random_ops_long(layers: Layers) -> None:
    r = _concurrency(layers, nproc=8, seconds=60, seed=22)
    figure("concurrency_long", procs=8, seconds=60, ops=r["ops"], paths_compared=r["paths_compared"], bad=r["bad"],
           eio=len(r["tracebacks"]))
    _assert_concurrency(r)


def _copy_up_twice(mnt: bytes, which: int, barrier: Any) -> None:
    barrier.wait(timeout=30)
    fd = os.open(os.path.join(mnt, b"large"), os.O_RDWR)
    try:
        os.pwrite(fd, b"%d" % which * 4096, which * 4096 * 7)
    finally:
        os.close(fd)


def test_two_processes_copy_up_the_same_large_file(layers: Layers) -> None:
    size = 64 << 20
    data = bytearray(data_for("large", size))
    (layers.lowers[0] / "large").write_bytes(data)
    lower_before = layers.lower_digests()
    d = layers.daemon().start()
    try:
        barrier = FORK.Barrier(2)
        procs = [FORK.Process(target=_copy_up_twice, args=(layers.m(), i + 1, barrier)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        for i in (1, 2):
            data[i * 4096 * 7:i * 4096 * 7 + 4096] = b"%d" % i * 4096
        got = open(layers.m("large"), "rb").read()
        assert got == bytes(data), "two simultaneous copy-ups lost one writer's change"
        assert os.listdir(layers.work / "unionfs-work") == []
    finally:
        d.stop()
    assert (layers.upper / "large").read_bytes() == bytes(data)
    assert layers.lower_digests() == lower_before
