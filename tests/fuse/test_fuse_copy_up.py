"""Copy-up through real mounts: SIGKILL in the middle of one, O_TRUNC, lower atimes, big files,
a full upper filesystem, long op sequences and concurrent copy-ups, against kernel overlayfs."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import util
from util import (
    IMPL,
    RENAME_NOREPLACE,
    D,
    F,
    L,
    Pair,
    Side,
    call,
    err,
    renameat2,
)
from write_ops import (
    LOWER,
    LOWER_BOTTOM,
    WR,
    p,
    sh,
    w,
)

pytestmark = pytest.mark.fuse


# ---- crash safety


def _make_big_lower(path: Path, size: int, every: int = 4 << 20) -> None:
    """A file with real data spread through it (1 MiB of random data every ``every`` bytes, holes
    between)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for off in range(0, size, every):
            f.seek(off)
            f.write(chunk[: min(len(chunk), size - off)])
        f.truncate(size)


def _files_under(root: Path) -> dict[str, int]:
    res = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            fp = os.path.join(dirpath, n)
            try:
                st = os.lstat(fp)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                res[os.path.relpath(fp, root)] = st.st_size
    return res


def _sigkill_mid_copy_up(tmp_path: Path, size: int, style: str) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    big = lower / "big"
    _make_big_lower(big, size)
    lower_hash = util.file_sha256(big)
    digest = util.layer_digest(lower)
    workdir = work if style == "overlay" else None
    m = util.mount_impl(style, [lower], upper, workdir, mnt)
    assert m.proc is not None
    caught = False
    writer = None
    try:
        # chmod forces a full copy-up of the data; it runs in a child so it can hang or fail freely
        writer = subprocess.Popen([sys.executable, "-c", f"import os; os.chmod({str(mnt / 'big')!r}, 0o600)"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and writer.poll() is None:
            partial = {k: v for k, v in {**_files_under(upper), **_files_under(work)}.items() if v > 0}
            if partial:
                os.kill(m.proc.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        m.proc.wait(timeout=30)
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()
        util.umount(mnt)
        if writer is not None:
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
    if not caught:
        pytest.fail(f"the copy-up of {size} bytes finished before it could be interrupted; use a bigger file")
    assert util.layer_digest(lower) == digest, "lower branch changed"
    assert util.file_sha256(big) == lower_hash
    # the final name in the upper layer is either absent or complete
    up = upper / "big"
    if up.exists():
        assert up.stat().st_size == size and util.file_sha256(up) == lower_hash, "partial file at the final name"
    # remount: the union shows the whole file, then a normal copy-up works and is complete
    m = util.mount_impl(style, [lower], upper, workdir, mnt)
    try:
        st = os.stat(mnt / "big")
        assert st.st_size == size
        assert util.file_sha256(mnt / "big") == lower_hash, "union shows a partial file after the crash"
        assert sorted(os.listdir(mnt)) == ["big"], "temporary files are visible"
        os.chmod(mnt / "big", 0o600)
        assert util.file_sha256(mnt / "big") == lower_hash
    finally:
        util.unmount(m)
    assert util.file_sha256(upper / "big") == lower_hash
    assert util.layer_digest(lower) == digest


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_sigkill_during_copy_up(tmp_path: Path, need_fuse: None, style: str) -> None:
    _sigkill_mid_copy_up(tmp_path, 128 << 20, style)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_sigkill_during_copy_up_1gib(tmp_path: Path, need_fuse: None, style: str) -> None:
    _sigkill_mid_copy_up(tmp_path, 1 << 30, style)


@pytest.mark.parametrize("style", ["overlay", pytest.param("aufs", marks=pytest.mark.slow)])
def test_o_trunc_copies_no_data(tmp_path: Path, need_fuse: None, style: str) -> None:
    """Opening a big lower file with O_TRUNC copies it up without its data: no file with data ever
    appears in the upper or work dir while the open runs."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    _make_big_lower(lower / "big", 512 << 20, every=128 << 20)
    digest = util.layer_digest(lower)
    m = util.mount_impl(style, [lower], upper, work if style == "overlay" else None, mnt)
    seen: dict[str, int] = {}
    try:
        code = f"import os; fd = os.open({str(mnt / 'big')!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x')"
        writer = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            seen.update({k: v for k, v in {**_files_under(upper), **_files_under(work)}.items() if v > 1})
            time.sleep(0.001)
        assert writer.wait(timeout=60) == 0
        assert (mnt / "big").read_bytes() == b"x"
    finally:
        util.unmount(m)
    assert not seen, f"data was copied during an O_TRUNC copy-up: {seen}"
    assert (upper / "big").read_bytes() == b"x"
    assert util.layer_digest(lower) == digest


@pytest.mark.skipif(IMPL != "unionfs", reason="kernel overlayfs and fuse-overlayfs update lower atimes")
def test_reads_leave_lower_atime_alone(tmp_path: Path, need_fuse: None) -> None:
    """Lower branches are not written, not even their atimes where avoidable (O_NOATIME)."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    util.render_layer(lower, [F("f", b"data"), F("d/x", b"x"), L("link", "f")], "overlay")
    upper.mkdir()
    mnt.mkdir()
    before = {rel: os.lstat(os.path.join(os.fsencode(lower), rel)).st_atime_ns
              for rel in (b"", b"f", b"d", b"d/x")}
    m = util.mount_impl("aufs", [lower], upper, None, mnt)
    try:
        assert (mnt / "f").read_bytes() == b"data"
        assert (mnt / "d" / "x").read_bytes() == b"x"
        assert sorted(os.listdir(mnt)) == ["d", "f", "link"] and os.listdir(mnt / "d") == ["x"]
        assert os.readlink(mnt / "link") == "f"
    finally:
        util.unmount(m)
    after = {rel: os.lstat(os.path.join(os.fsencode(lower), rel)).st_atime_ns for rel in before}
    assert after == before


def test_big_copy_up_is_complete(pair: Pair) -> None:
    data = os.urandom(1 << 20) * 20
    pair.build([[F("big", data)]], upper=[])
    pair.same(w("big", WR, b"END", off=len(data)), "append to big lower file")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_errno_of_failed_copy_up_on_full_upper(pair: Pair) -> None:
    """Copy-up into an upper that is too small fails with ENOSPC on both, leaving no partial file."""
    pair.build([[F("big", b"x" * (6 << 20)), F("small", b"s")]], upper=[], mount=False)
    for s in pair.sides:
        fs = s.base / "small-fs"
        fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)], check=True)
        pair.cleanup.append(fs)
        s.upper, s.work = fs / "upper", fs / "work"
        s.upper.mkdir()
        s.work.mkdir()
    pair.mount()
    res = pair.same(w("big", WR, b"!", off=0), "write triggering copy-up")
    assert res == err("ENOSPC")
    pair.same(w("small", WR, b"!", off=0), "a small copy-up still works")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_many_ops_sequence(pair: Pair) -> None:
    """A shell session of mixed changes, like a container build step."""
    pair.build([LOWER, LOWER_BOTTOM], upper=[])
    script = ("set -e; rm -f lf; rm -rf ld && mkdir ld && echo new > ld/file; mv lf2 lf2.moved; "
              "chmod 700 lf2.moved; mkdir -p a/b/c; echo x > a/b/c/x; ln -s a/b/c link; ln lf2.moved hard; "
              "rm -rf merged; mkdir merged; touch -d @1234567890 merged; echo appended >> bottom-only; "
              "mv wo wo2; rm -rf wo2")
    res = pair.same(sh(["sh", "-c", script]), "script")
    assert res[0] == 0, res
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_errno_spot_checks(pair: Pair) -> None:
    """A few errnos people rely on, asserted against the kernel's own answers."""
    pair.build([LOWER], upper=[])
    assert pair.same(p(os.rename, "ld", "ld2")) == err("EXDEV")
    assert pair.same(p(os.rmdir, "ld")) == err("ENOTEMPTY")
    assert pair.same(lambda s: renameat2(s.p("lf"), s.p("lf2"), RENAME_NOREPLACE)) == err("EEXIST")
    assert errno.EXDEV


def _threads(fns: list[Callable[[], Any]]) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(fns)) as ex:
        futs = [ex.submit(call, fn) for fn in fns]
        return [f.result() for f in futs]


def test_concurrent_copy_up_of_one_file(pair: Pair) -> None:
    """Many writers hit the same lower file at once: one copy-up, every append kept, no leftovers."""
    pair.build([[F("shared", b"base\n"), F("d/f", b"f")]], upper=[])

    def run(s: Side) -> Any:
        def writer(i: int) -> Callable[[], Any]:
            def go() -> None:
                fd = os.open(s.p("shared"), os.O_WRONLY | os.O_APPEND)
                try:
                    for j in range(20):
                        os.write(fd, b"w%02d-%02d\n" % (i, j))
                finally:
                    os.close(fd)
            return go
        res = _threads([writer(i) for i in range(8)])
        with open(s.p("shared"), "rb") as f:
            lines = f.read().split(b"\n")
        return res, lines[0], sorted(lines[1:])
    pair.same(run, "8 concurrent appenders")  # same lines (the interleaving may differ)

    def without_shared_hash(tree: dict[bytes, dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
        tree[b"shared"].pop("sha256")
        return tree
    util.assert_trees_equal(*(without_shared_hash(util.snapshot(s.p())) for s in pair.sides))
    pair.unmount()
    util.assert_trees_equal(*(without_shared_hash(util.normalise_upper(s.upper)) for s in pair.sides  # type: ignore
                              ), what="upper layer")


def test_concurrent_copy_up_of_siblings(pair: Pair) -> None:
    """Copy-ups of many files below the same lower directories at once: parents copied up once, with
    their metadata, every change kept."""
    files = [F(f"a/b/c/f{i:02d}", b"%d" % i, mode=0o644) for i in range(24)]
    pair.build([[D("a", mode=0o751, uid=3), D("a/b", mode=0o715, gid=4), D("a/b/c", mode=0o705), *files]],
               upper=[])

    def run(s: Side) -> Any:
        return _threads([lambda i=i: os.chmod(s.p(f"a/b/c/f{i:02d}"), 0o600 + i % 8) for i in range(24)])
    pair.same(run, "24 concurrent chmods")
    pair.assert_same_tree(times=True)
    pair.assert_same_upper(times=True)
