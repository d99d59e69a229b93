"""Hardening, odd names and sizes, against kernel overlayfs.

(How these tests are built: see conftest.py here.)
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import util
from hardening_util import (
    UNIONFS,
    Layers,
    data_for,
    figure,
    kernel_view,
    overlay_daemon,
)
from util import D, F, call, err

pytestmark = pytest.mark.fuse


# ==================================================================================================
# 5. Odd names and sizes, against kernel overlayfs


def _create_read(path: bytes) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, os.path.basename(path)[-40:])
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


# (names of 252-255 bytes: see test_names_of_252_to_255_bytes)
ODD_NAMES = [b"n" * 251, b"\xff\xfe-not-utf8", b"line\nbreak", b"tab\there", b" lead space", b"-dash",
             b"\xe2\x82\xac-euro", b"x" * 250 + b"\xff"]


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_odd_names(pair: util.Pair, style: str) -> None:
    """251-byte names, non-UTF-8 bytes, newlines and tabs work as on the kernel; 256 bytes is
    ENAMETOOLONG; `.wh.`-prefixed names are refused with EPERM in both dialects (a documented
    difference: the kernel allows them)."""
    pair.build([[F("low", b"low\n"), F(b"\xfflow-odd", b"odd lower\n"), D("ld"), F(b"ld/line\nlower", b"nl")]],
               [], style=style, dialect="aufs" if style == "aufs" else "overlay")
    for name in ODD_NAMES:
        pair.same(lambda s, n=name: _create_read(s.p(n)), f"create {name!r}")
        pair.same(lambda s, n=name: os.lstat(s.p(n)).st_size, f"lstat {name!r}")
        pair.same(lambda s, n=name: os.rename(s.p(n), s.p(n[:-1] + b"R")), f"rename {name!r}")
    long = b"l" * 256
    pair.same(lambda s: _create_read(s.p(long)), "create 256")
    pair.same(lambda s: os.lstat(s.p(long)), "lstat 256")
    pair.same(lambda s: os.mkdir(s.p(long)), "mkdir 256")
    pair.same(lambda s: os.rename(s.p(b"low"), s.p(long)), "rename to 256")
    pair.same(lambda s: os.unlink(s.p(b"\xfflow-odd")), "unlink odd lower")
    pair.same(lambda s: os.rename(s.p(b"ld/line\nlower"), s.p(b"ld/moved\n")), "rename lower newline name")
    pair.same(lambda s: sorted(os.listdir(s.p())), "listing")
    pair.same(lambda s: sorted(os.listdir(s.p(b"ld"))), "listing ld")
    for wh in (b".wh.x", b".wh..wh..opq", b".wh.low"):
        k, u = pair.both(lambda s, n=wh: _create_read(s.p(n)))
        assert u == err("EPERM"), (wh, u)
        k2, u2 = pair.both(lambda s, n=wh: os.mkdir(s.p(n + b"-d")))
        assert u2 == err("EPERM"), (wh, u2)
        k3, u3 = pair.both(lambda s, n=wh: os.rename(s.p(b"low"), s.p(n + b"-r")))
        assert u3 == err("EPERM"), (wh, u3)
        if k3 is None:      # the kernel allowed it: put the file back, so the trees compare below
            os.rename(pair.k.p(wh + b"-r"), pair.k.p(b"low"))
    assert pair.u.mounted is not None and pair.u.mounted.proc is not None and pair.u.mounted.proc.poll() is None
    # the union still serves, and agrees apart from the refused .wh. names
    kt, ut = util.snapshot(pair.k.p()), util.snapshot(pair.u.p())
    kt = {r: v for r, v in kt.items() if not os.path.basename(r).startswith(b".wh.")}
    util.assert_trees_equal(kt, ut)


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_names_of_252_to_255_bytes(pair: util.Pair, style: str) -> None:
    pair.build([[F("low", b"low\n")]], [], style=style, dialect="aufs" if style == "aufs" else "overlay")
    for n in (252, 255):
        name = b"n" * n
        pair.same(lambda s, nm=name: _create_read(s.p(nm)), f"create {n}-byte name")
        pair.same(lambda s, nm=name: os.mkdir(s.p(nm + b"")[:-1] + b"d"), f"mkdir {n}-byte name")
        pair.same(lambda s, nm=name: os.rename(s.p(b"low"), s.p(nm[:-1] + b"r")), f"rename to {n}-byte name")


def _many_entries(layers: Layers, n: int) -> dict[str, Any]:
    lower = os.fsencode(str(layers.lowers[0] / "big"))
    os.mkdir(lower)
    half = n // 2
    for i in range(half):
        os.close(os.open(os.path.join(lower, b"lower-%06d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    d = layers.daemon().start()
    t0 = time.monotonic()
    try:
        dd = layers.m("big")
        dfd = os.open(dd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(n - half):
                os.close(os.open(b"upper-%06d" % i, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
            for i in range(0, half, 10):
                os.unlink(b"lower-%06d" % i, dir_fd=dfd)
        finally:
            os.close(dfd)
        t_create = time.monotonic() - t0
        want = {b"lower-%06d" % i for i in range(half) if i % 10} | {b"upper-%06d" % i for i in range(n - half)}
        t1 = time.monotonic()
        got = os.listdir(dd)
        t_list = time.monotonic() - t1
        assert len(got) == len(set(got)), "duplicate names in the listing"
        assert set(got) == want
        assert d.alive()
    finally:
        d.stop()
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    assert {os.path.basename(r) for r in kview if r.startswith(b"big/")} == want
    return {"entries": len(want), "create_s": round(t_create, 1), "list_s": round(t_list, 2)}


def test_many_entries_in_one_directory(layers: Layers) -> None:
    r = _many_entries(layers, 20_000)
    figure("many_entries", **r)


@pytest.mark.slow
def test_many_entries_in_one_directory_100k(layers: Layers) -> None:
    r = _many_entries(layers, 100_000)
    figure("many_entries_long", **r)


FOUR_G = 4 << 30


def test_files_beyond_4gib(layers: Layers) -> None:
    """A sparse lower file of 4 GiB + 1 MiB reads right at both ends through the union (no copy-up);
    a new file grows past 4 GiB by truncate and by a write at a 4.5 GiB offset."""
    lp = layers.lowers[0] / "sparse"
    with open(lp, "wb") as f:
        f.write(b"head")
        f.seek(FOUR_G + (1 << 20))
        f.write(b"tail")
    d = layers.daemon().start()
    try:
        p = layers.m("sparse")
        assert os.stat(p).st_size == FOUR_G + (1 << 20) + 4
        with open(p, "rb") as f:
            assert f.read(4) == b"head"
            f.seek(FOUR_G + (1 << 20))
            assert f.read() == b"tail"
            f.seek(FOUR_G)
            assert f.read(4096) == bytes(4096)
        n = layers.m("new")
        fd = os.open(n, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, FOUR_G + 10)
            assert os.pwrite(fd, b"far", FOUR_G + FOUR_G // 8) == 3
            assert os.pread(fd, 3, FOUR_G + FOUR_G // 8) == b"far"
            assert os.pread(fd, 10, FOUR_G) == bytes(10)
        finally:
            os.close(fd)
        assert os.stat(n).st_size == FOUR_G + FOUR_G // 8 + 3
        assert (layers.upper / "new").stat().st_blocks * 512 < (64 << 20), "holes of a new file not kept"
    finally:
        d.stop()


def _sparse_copy_up(layers: Layers, size: int) -> dict[str, Any]:
    lp = layers.lowers[0] / "sparse"
    with open(lp, "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")
    d = layers.daemon().start()
    try:
        t0 = time.monotonic()
        os.chmod(layers.m("sparse"), 0o600)     # copy-up
        secs = time.monotonic() - t0
        with open(layers.m("sparse"), "rb") as f:
            assert f.read(4) == b"head"
            f.seek(size - 4)
            assert f.read() == b"tail"
    finally:
        d.stop()
    allocated = (layers.upper / "sparse").stat().st_blocks * 512
    r = {"size": size, "seconds": round(secs, 2), "allocated_upper": allocated,
         "allocated_lower": lp.stat().st_blocks * 512}
    figure("sparse_copy_up", **r)
    return r


def test_sparse_copy_up_keeps_holes(layers: Layers) -> None:
    r = _sparse_copy_up(layers, 256 << 20)
    assert r["allocated_upper"] < (8 << 20), f"copy-up allocated {r['allocated_upper']} bytes for a sparse file"


@pytest.mark.slow
def test_sparse_copy_up_4gib(layers: Layers) -> None:
    r = _sparse_copy_up(layers, FOUR_G + (1 << 20) + 8)
    assert r["allocated_upper"] < (8 << 20) and r["seconds"] < 10, r


def _deep(root: bytes, depth: int, name_len: int) -> bytes:
    """mkdir a chain of *depth* directories of *name_len*-byte names through dir fds (so no single
    path is long); create a file at the bottom; return the full path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    try:
        for i in range(depth):
            n = (b"%03d" % i) + b"d" * (name_len - 3)
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel = os.path.join(rel, n) if rel else n
        f = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"deep\n")
        os.close(f)
    finally:
        os.close(fd)
    return os.path.join(rel, b"leaf")


def test_deep_tree_near_path_max(pair: util.Pair) -> None:
    """A tree whose full paths pass PATH_MAX (4096): built through dir fds, it works as on the
    kernel; a full path of 4096+ bytes gets the VFS's ENAMETOOLONG on both, a shorter one works."""
    pair.build([[D("base"), F("base/low", b"low")]], [])
    rel = pair.same(lambda s: _deep(s.p(b"base"), 22, 200), "deep mkdir chain")
    full = os.path.join(b"base", rel)
    assert len(pair.u.p(full)) > 4096
    pair.same(lambda s: os.stat(s.p(full)), "stat beyond PATH_MAX")
    short = os.path.join(b"base", *rel.split(b"/")[:18])   # just under PATH_MAX with the mount prefix
    assert len(pair.u.p(short)) < 4000
    pair.same(lambda s: sorted(os.listdir(s.p(short))), "list deep dir")
    pair.same(lambda s: os.rename(s.p(short), s.p(b"moved")), "rename deep dir")
    pair.assert_same_tree()


def test_128_branches(tmp_path: Path, need_fuse: None, need_overlay: None) -> None:
    """128 lower branches (each with its own file, a file shadowed by the ones above, and a merged
    dir): unionfs shows what kernel overlayfs shows, and copy-up from the bottom branch works."""
    base = tmp_path / "b"
    base.mkdir()
    names = [str(i) for i in range(128)]
    for i, n in enumerate(names):
        lp = base / n
        (lp / "common").mkdir(parents=True)
        (lp / f"own{i}").write_bytes(b"%d\n" % i)
        (lp / "shadowed").write_bytes(b"from %d\n" % i)
        (lp / "common" / f"c{i}").write_bytes(b"c%d\n" % i)
    for side in ("k", "u"):
        for sub in ("up", "wk", "mnt"):
            (base / f"{side}{sub}").mkdir()
    lower_before = [util.layer_digest(base / n) for n in names]
    # kernel mount options are limited to one page: relative lowerdirs, resolved from cwd
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(names)},upperdir=kup,workdir=kwk," + util.KERNEL_OPTS, "kmnt"],
                       cwd=base, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = overlay_daemon([base / n for n in names], base / "uup", base / "uwk", base / "umnt", base / "u.log").start()
    try:
        kt, ut = util.snapshot(base / "kmnt"), util.snapshot(base / "umnt")
        util.assert_trees_equal(kt, ut)
        assert len(ut) == 1 + 128 + 1 + 1 + 128
        for m in ("kmnt", "umnt"):
            os.chmod(base / m / "own127", 0o600)
            os.unlink(base / m / "common" / "c0")
        util.assert_trees_equal(util.snapshot(base / "kmnt"), util.snapshot(base / "umnt"))
    finally:
        d.stop()
        util.umount(base / "kmnt")
    assert [util.layer_digest(base / n) for n in names] == lower_before
    figure("branches", lowers=128, paths_compared=len(ut))


def _tmpfs(where: Path, size: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    return where


@pytest.mark.parametrize("ro_option", [False, True])
def test_read_only_upper_filesystem(tmp_path: Path, need_fuse: None, need_overlay: None, ro_option: bool) -> None:
    """An upper dir on a read-only filesystem: as the kernel refuses a writable overlay there,
    unionfs refuses the mount (one line naming the cause, non-zero exit, nothing mounted). With
    `-o ro` the kernel refuses it too (EINVAL, "upper fs is r/o"); unionfs serves it read-only
    (EROFS for every change) — a difference, in the user's favour."""
    t = _tmpfs(tmp_path / "t", "4m")
    try:
        for n in ("ku", "kw", "uu", "uw"):
            (t / n).mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(t)], check=True)
        low = tmp_path / "low"
        low.mkdir()
        (low / "f").write_bytes(b"f\n")
        km, um = tmp_path / "km", tmp_path / "um"
        km.mkdir()
        um.mkdir()
        extra = ",ro" if ro_option else ""
        kr = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                             f"lowerdir={low},upperdir={t}/ku,workdir={t}/kw{extra}", str(km)],
                            capture_output=True, text=True)
        ur = subprocess.run([UNIONFS, "mount", "-o", f"lowerdir={low},upperdir={t}/uu,workdir={t}/uw{extra}", str(um)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            assert kr.returncode != 0, "kernel overlayfs mounted on a read-only upper"
            assert (ur.returncode == 0) == ro_option, ur
            if ur.returncode != 0:
                lines = ur.stderr.strip().splitlines()
                assert len(lines) == 1 and "Traceback" not in ur.stderr, ur.stderr
                assert "read-only" in lines[0].lower(), lines
                assert not util.is_mounted(um)
            else:
                for m in (um,):
                    assert (m / "f").read_bytes() == b"f\n"
                    assert call(os.unlink, m / "f") == err("EROFS")
                    assert call(os.mkdir, m / "d") == err("EROFS")
        finally:
            if util.is_mounted(km):
                util.umount(km)
            if util.is_mounted(um):
                rr = subprocess.run([UNIONFS, "umount", str(um)], capture_output=True, text=True, timeout=60)
                assert rr.returncode == 0, rr.stderr
    finally:
        util.umount(t)


def test_full_upper_filesystem(tmp_path: Path, need_fuse: None, need_overlay: None) -> None:
    """A 1 MiB tmpfs upper: a big write, a copy-up of a 4 MiB lower file and a copy-up of many small
    ones fail with the kernel's errno (ENOSPC); the daemon keeps serving, leaves no temporaries, and
    works again once space is freed."""
    low = tmp_path / "low"
    low.mkdir()
    (low / "big").write_bytes(data_for("big", 4 << 20))
    (low / "small").write_bytes(b"small\n")
    sides = {}
    for side in ("k", "u"):
        t = _tmpfs(tmp_path / f"t{side}", "1m")
        (t / "up").mkdir()
        (t / "wk").mkdir()
        (tmp_path / f"m{side}").mkdir()
        sides[side] = t
    lower_before = util.layer_digest(low)
    km, um = tmp_path / "mk", tmp_path / "mu"
    util.mount_kernel([low], sides["k"] / "up", sides["k"] / "wk", km)
    d = overlay_daemon([low], sides["u"] / "up", sides["u"] / "wk", um, tmp_path / "u.log").start()
    try:
        def both(fn: Callable[[Path], Any], what: str) -> Any:
            k, u = call(fn, km), call(fn, um)
            assert k == u, f"{what}: unionfs {u}, kernel {k}"
            return k

        def write_big(m: Path) -> int:
            with open(m / "new", "wb") as f:
                f.write(bytes(2 << 20))
            return 0

        assert both(write_big, "write 2 MiB") == err("ENOSPC")
        both(lambda m: os.unlink(m / "new"), "unlink partial")
        assert both(lambda m: os.chmod(m / "big", 0o600), "copy-up 4 MiB") == err("ENOSPC")
        both(lambda m: (m / "big").read_bytes() == data_for("big", 4 << 20), "lower big still visible")
        both(lambda m: os.chmod(m / "small", 0o600), "small copy-up fits")
        both(lambda m: (m / "after").write_bytes(b"works\n"), "write after freeing")
        assert d.alive()
        assert os.listdir(sides["u"] / "wk" / "unionfs-work") == []
        util.assert_trees_equal(util.snapshot(km), util.snapshot(um))
    finally:
        d.stop()
        util.umount(km)
        for t in sides.values():
            util.umount(t)
    assert util.layer_digest(low) == lower_before
