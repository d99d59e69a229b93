"""The merged read path, through real mounts: every test builds the same layers twice and
compares unionfs with kernel overlayfs (the oracle). Differences normalised away: st_ino/st_dev, and
directory st_size/st_nlink (documented)."""

from __future__ import annotations

import os
import stat

import pytest
import util
from util import DIALECTS, D, F, H, L, N, Pair, W, call, err, run_tool

pytestmark = pytest.mark.fuse

CLASSIC = [
    [F("a", b"a from A\n"), F("x", b"x from A\n")],
    [F("b", b"b from B\n"), F("x", b"x from B\n")],
]


@pytest.mark.parametrize("style", ["overlay", "aufs", "aufs-modes"])
@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_classic_merge_higher_wins(pair: Pair, style: str, writable: bool) -> None:
    pair.build(CLASSIC, upper=[] if writable else None, style=style,
               dialect="aufs" if style != "overlay" else "overlay")
    k = pair.assert_same_tree(times=True)
    assert sorted(k) == [b"", b"a", b"b", b"x"]
    for side in pair.sides:
        names = os.listdir(side.p())
        assert sorted(names) == [b"a", b"b", b"x"], side.base
        with open(side.p("x"), "rb") as f:
            assert f.read() == b"x from A\n"
    # "." and ".." are listed, each name once
    pair.same(lambda s: run_tool(["ls", "-a", "-1"], cwd=s.p())[1], "ls -a")


def test_higher_wins_metadata_and_xattrs(pair: Pair) -> None:
    pair.build([
        [F("f", b"top", mode=0o600, uid=1000, gid=1001, xattrs={"user.who": b"top"}),
         D("d", mode=0o700, uid=7, gid=8, xattrs={"user.d": b"top"})],
        [F("f", b"bottom!", mode=0o644, xattrs={"user.who": b"bottom", "user.extra": b"1"}),
         D("d", mode=0o755), F("d/below", b"below")],
    ], upper=[])
    k = pair.assert_same_tree(times=True)
    assert k[b"f"]["xattrs"] == {b"user.who": b"top"}
    assert k[b"d"]["mode"] == "0o700"


@pytest.mark.parametrize("case", ["file-over-dir", "symlink-over-dir", "dir-over-file", "fifo-over-dir"])
def test_non_directory_hides_directory_below(pair: Pair, case: str) -> None:
    top = {
        "file-over-dir": [F("d", b"I am a file")],
        "symlink-over-dir": [L("d", "elsewhere")],
        "dir-over-file": [D("d"), F("d/new", b"new")],
        "fifo-over-dir": [N("d", "fifo")],
    }[case]
    bottom = [F("d", b"plain")] if case == "dir-over-file" else [F("d/hidden", b"must not show"), D("d/sub")]
    pair.build([top, bottom, [F("d/deeper", b"also hidden")]] if case != "dir-over-file" else [top, bottom],
               upper=[])
    pair.assert_same_tree(times=True)
    pair.same(lambda s: os.path.lexists(s.p("d/hidden")), "lexists d/hidden")


def _whiteout_layers() -> tuple[list, list]:
    top = [W("gone"), W("gonedir"), D("opq", opaque=True), F("opq/mine", b"mine"),
           D("merged"), W("merged/x"), F("merged/top", b"t")]
    bottom = [F("gone", b"hidden"), D("gonedir"), F("gonedir/inner", b"hidden"), F("opq/theirs", b"hidden"),
              D("opq/subdir"), F("merged/x", b"hidden"), F("merged/y", b"shown"), F("keep", b"keep")]
    return top, bottom


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_whiteouts_and_opaque_dirs(pair: Pair, dialect: str, where: str) -> None:
    top, bottom = _whiteout_layers()
    if where == "lower":
        pair.build([top, bottom], upper=[], dialect=dialect)
    else:
        pair.build([bottom], upper=top, dialect=dialect)
    k = pair.assert_same_tree(times=True)
    assert b"gone" not in k and b"gonedir" not in k and b"opq/theirs" not in k and b"merged/x" not in k
    assert k[b"merged/y"]["type"] == "file"
    # Markers never show up, by listing or by name.
    for rel in [".wh.gone", ".wh.gonedir", "opq/.wh..wh..opq", "merged/.wh.x", "gone", "opq/subdir"]:
        pair.same(lambda s, rel=rel: os.lstat(s.p(rel)).st_mode, f"lstat {rel}")
    for xname in ["trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque"]:
        pair.same(lambda s, x=xname: os.getxattr(s.p("opq"), x), f"getxattr opq {xname}")
    pair.same(lambda s: sorted(os.listxattr(s.p("opq"))), "listxattr opq")


@pytest.mark.parametrize("dialect", ["aufs", "overlay"])
def test_whiteout_in_middle_branch_of_three(pair: Pair, dialect: str) -> None:
    pair.build([
        [F("a", b"top a")],
        [W("a"), W("b"), D("c", opaque=True)],
        [F("a", b"bottom a"), F("b", b"bottom b"), F("c/x", b"x"), F("d", b"d")],
    ], upper=[], dialect=dialect, style="aufs" if dialect == "aufs" else "overlay")
    k = pair.assert_same_tree()
    assert sorted(k) == [b"", b"a", b"c", b"d"]


def test_special_files_and_hardlinks(pair: Pair) -> None:
    pair.build([
        [N("fifo", "fifo", mode=0o640), N("null", "chr", 1, 3, mode=0o666), N("loop", "blk", 7, 200),
         N("sock", "sock", mode=0o755), F("h1", b"linked", uid=5), H("h2", "h1"), D("sub"), H("sub/h3", "h1")],
        [F("h1", b"old")],
    ], upper=[])
    k = pair.assert_same_tree(times=True)
    assert k[b"h2"]["nlink"] == 3 and k[b"null"]["rdev"] == (1, 3)


def test_symlinks_are_never_followed_inside_a_branch(pair: Pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside the branch")
    pair.build([
        [D("shadow"), F("shadow/mine", b"mine"), D("root"), D("up")],
        [L("etc", "/"), L("d", "../../"), L("shadow", str(outside)), L("root", "/"), L("up", "../.."),
         L("rel", "etc/passwd"), L("dangling", "no/such/file")],
    ], upper=[])
    pair.assert_same_tree()
    for s in pair.sides:
        assert stat.S_ISLNK(os.lstat(s.p("etc")).st_mode)
        assert os.readlink(s.p("etc")) == b"/"
        assert os.readlink(s.p("d")) == b"../../"
    for rel in ["shadow", "root", "up"]:
        pair.same(lambda s, rel=rel: sorted(os.listdir(s.p(rel))), f"listdir {rel}")
    for rel in ["shadow/secret", "root/etc", "root/tmp", "up/k", "up/u"]:
        pair.same(lambda s, rel=rel: os.lstat(s.p(rel)).st_mode, f"lstat {rel}")
    # Following happens in the kernel, client-side, relative to the mount: same answer on both.
    pair.same(lambda s: open(s.p("etc/hostname"), "rb").read(), "read etc/hostname")
    pair.same(lambda s: os.stat(s.p("dangling")).st_mode, "stat dangling")


def test_deep_tree(pair: Pair) -> None:
    depth = 120
    path = "/".join(f"d{i}" for i in range(depth))
    half = "/".join(f"d{i}" for i in range(depth // 2))
    pair.build([
        [F(f"{path}/top", b"top"), W(f"{half}/gone"), D(f"{half}/opq", opaque=True)],
        [F(f"{path}/bottom", b"bottom"), F(f"{half}/gone", b"x"), F(f"{half}/opq/hidden", b"x"),
         F(f"{half}/file", b"f")],
    ], upper=[])
    k = pair.assert_same_tree()
    assert os.fsencode(f"{path}/top") in k and os.fsencode(f"{path}/bottom") in k
    assert os.fsencode(f"{half}/gone") not in k


def test_ten_thousand_entries(pair: Pair) -> None:
    n = 10_000
    top = [F(f"big/t{i:05d}", b"") for i in range(0, n, 2)] + [W(f"big/b{i:05d}") for i in range(0, n, 10)]
    bottom = [F(f"big/b{i:05d}", b"") for i in range(n)] + [F(f"big/t{i:05d}", b"old") for i in range(0, n, 4)]
    pair.build([top, bottom], upper=[])
    listings = pair.same(lambda s: sorted(os.listdir(s.p("big"))), "listdir big")
    assert len(listings) == n // 2 + n - n // 10
    assert len(set(listings)) == len(listings)
    def entries(s):  # type: ignore[no-untyped-def]
        res = []
        with os.scandir(s.p("big")) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                res.append((e.name, e.is_file(follow_symlinks=False), st.st_mode, st.st_size, st.st_nlink))
        return sorted(res)
    pair.same(entries, "scandir + lstat of every entry")
    pair.assert_same_tree("big/t00000")
    # readdir with small getdents buffers (ls -f streams the directory in many calls)
    pair.same(lambda s: sorted(run_tool(["ls", "-f", "-1"], cwd=s.p("big"))[1].split(b"\n")), "ls -f")


ODD_NAMES = [b"with space", b" leading space", b"trailing space ", b"new\nline", b"tab\there",
             b"\xff\xfe not utf-8", b"caf\xc3\xa9", b"-dash", b"back\\slash", b"quote'\"", b"x" * 255,
             b".hidden", b"..dots", b".wh", b"wh.x", b"colon:comma,equals=", b"*glob?[x]"]


def test_odd_names(pair: Pair) -> None:
    top = [F(b"dir/" + n, b"top " + n) for n in ODD_NAMES[::2]] + [W(b"dir/" + ODD_NAMES[1])]
    bottom = [F(b"dir/" + n, b"bottom " + n) for n in ODD_NAMES] + [D(b"sub " + ODD_NAMES[3])]
    pair.build([top, bottom], upper=[])
    k = pair.assert_same_tree()
    assert b"dir/" + ODD_NAMES[1] not in k and b"dir/new\nline" in k
    pair.same(lambda s: sorted(os.listdir(s.p("dir"))), "listdir")


LAYERS_FOR_TOOLS = [
    [F("etc/conf", b"top conf\n", mode=0o600, uid=1000, gid=1000), W("etc/removed"), L("etc/link", "conf"),
     D("var/opq", opaque=True), F("var/opq/new", b"new\n"), F("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755),
     F("sparse", b"")],
    [F("etc/conf", b"bottom conf\n"), F("etc/removed", b"gone\n"), F("etc/kept", b"kept\n" * 1000),
     F("var/opq/old", b"old\n"), F("var/log/a.log", os.urandom(100_000)), H("var/log/hard", "var/log/a.log"),
     N("dev/null", "chr", 1, 3, mode=0o666), F("name with space", b"s"), F(b"non-utf8-\xff", b"b"),
     D("emptydir", mode=0o1777)],
]


@pytest.fixture
def tools_pair(pair: Pair) -> Pair:
    pair.build(LAYERS_FOR_TOOLS, upper=[])
    # a sparse file with a hole and data at the end, in the top layer of both copies
    for s in pair.sides:
        p = os.path.join(os.fsencode(s.lowers[0]), b"sparse")
        with open(p, "r+b") as f:
            f.truncate(5 << 20)
            f.seek((5 << 20) - 5)
            f.write(b"tail\n")
        os.utime(p, ns=(1_600_000_000 * 10**9,) * 2)
    pair.lower_digests = {p: util.layer_digest(p) for p in pair.lower_digests}
    return pair


def _tool(pair: Pair, args: list[str], what: str, normalise=None) -> bytes:  # type: ignore[no-untyped-def]
    def run(s):  # type: ignore[no-untyped-def]
        rc, out, errout = run_tool(args, cwd=s.p())
        out = out.replace(os.fsencode(s.mnt), b"MNT")
        return rc, normalise(out) if normalise else out, errout.replace(os.fsencode(s.mnt), b"MNT")
    res = pair.same(run, what)
    assert res[0] == 0, res
    return res[1]


def _drop_dir_size_nlink_ls(out: bytes) -> bytes:
    lines = []
    for line in out.split(b"\n"):
        parts = line.split(None, 5)
        if line.startswith(b"d") and len(parts) == 6:
            parts[1] = b"N"  # directory link count: documented difference
            parts[4] = b"S"  # directory size: documented difference
            line = b" ".join(parts)
        if line.startswith(b"total "):
            line = b"total T"  # sums directory blocks too
        lines.append(line)
    return b"\n".join(lines)


def test_ls(tools_pair: Pair) -> None:
    _tool(tools_pair, ["ls", "-lAR", "--time-style=+%s", "-b", "."], "ls -lAR", _drop_dir_size_nlink_ls)
    _tool(tools_pair, ["ls", "-la", "--time-style=+%s", "-b", "etc"], "ls -la etc", _drop_dir_size_nlink_ls)


def _sorted_records(out: bytes) -> bytes:
    sep = b"\0" if b"\0" in out else b"\n"
    return sep.join(sorted(out.split(sep)))  # readdir order is not specified


def test_find(tools_pair: Pair) -> None:
    out = _tool(tools_pair, ["find", ".", "!", "-type", "d", "-printf", r"%p|%y|%m|%U|%G|%s|%n|%l|%T@|%b\0"],
                "find files", _sorted_records)
    assert b"etc/removed" not in out and b"var/opq/old" not in out
    _tool(tools_pair, ["find", ".", "-type", "d", "-printf", r"%p|%m|%U|%G|%T@\0"], "find dirs", _sorted_records)
    _tool(tools_pair, ["find", ".", "-name", "*.log", "-newer", "etc/conf"], "find -newer", _sorted_records)
    _tool(tools_pair, ["find", ".", "-type", "l", "-xtype", "f"], "find -xtype", _sorted_records)


def test_cat(tools_pair: Pair) -> None:
    out = _tool(tools_pair, ["cat", "etc/conf", "etc/kept", "var/log/a.log", "var/log/hard", "sparse",
                             "bin/tool", "name with space"], "cat")
    assert out.startswith(b"top conf\n")


def test_tar(tools_pair: Pair) -> None:
    _tool(tools_pair, ["tar", "--format=gnu", "--sort=name", "--numeric-owner", "-cf", "-", "."], "tar c")
    _tool(tools_pair, ["tar", "--format=posix", "--sort=name", "--numeric-owner", "--xattrs",
                       "--pax-option=delete=atime,delete=ctime", "-cf", "-", "."], "tar c --xattrs")


def test_du(tools_pair: Pair) -> None:
    def files_only(out: bytes) -> bytes:
        return b"\n".join(sorted(line for line in out.split(b"\n") if line and not line.endswith(b"\t.")
                                 and not any(line.endswith(b"\t./" + d) for d in
                                             (b"etc", b"var", b"var/opq", b"var/log", b"bin", b"dev",
                                              b"emptydir"))))
    _tool(tools_pair, ["du", "-a", "-l", "--apparent-size", "-b"], "du -ab", files_only)
    _tool(tools_pair, ["du", "-a", "-l", "-k"], "du -ak", files_only)
    _tool(tools_pair, ["du", "-s", "--inodes"], "du --inodes")


def test_stat(tools_pair: Pair) -> None:
    paths = ["etc/conf", "etc/link", "etc/kept", "sparse", "var/log/a.log", "var/log/hard", "dev/null",
             "bin/tool", "name with space"]
    _tool(tools_pair, ["stat", "--printf", r"%n|%F|%a|%A|%u|%g|%s|%h|%t|%T|%N|%Y|%b|%B|%o\n", *paths],
          "stat files")
    _tool(tools_pair, ["stat", "--printf", r"%n|%F|%a|%u|%g|%Y\n", ".", "etc", "var/opq", "emptydir"],
          "stat dirs")
    _tool(tools_pair, ["stat", "-L", "--printf", r"%n|%F|%s\n", "etc/link"], "stat -L")


def test_statfs(tools_pair: Pair) -> None:
    def sv(s):  # type: ignore[no-untyped-def]
        v = os.statvfs(s.p())
        return (v.f_bsize, v.f_frsize, v.f_blocks, v.f_files, v.f_namemax)
    pair = tools_pair
    pair.same(sv, "statvfs")
    for s in pair.sides:
        v = os.statvfs(s.p())
        assert v.f_bavail > 0 and v.f_ffree > 0


def test_xattrs(pair: Pair) -> None:
    pair.build([
        [F("f", b"", xattrs={"user.a": b"1", "user.big": b"x" * 3000, "user.bin": b"\x00\xff\n"}),
         D("d", xattrs={"user.dir": b"yes"})],
        [F("g", b"", xattrs={"user.low": b"low"}), D("d", xattrs={"user.hidden": b"lower dir xattr"})],
    ], upper=[])
    pair.assert_same_tree()
    for rel in ["f", "g", "d"]:
        pair.same(lambda s, rel=rel: sorted(os.listxattr(s.p(rel))), f"listxattr {rel}")
        pair.same(lambda s, rel=rel: os.getxattr(s.p(rel), "user.nonexistent"), f"getxattr missing {rel}")
    pair.same(lambda s: os.getxattr(s.p("f"), "user.big"), "getxattr big")
    pair.same(lambda s: os.getxattr(s.p("d"), "user.hidden"), "lower dir's xattr is not merged")
    # size probe (getxattr with a zero buffer) via getfattr, and a too-small buffer via ctypes
    pair.same(lambda s: run_tool(["getfattr", "-d", "-m", "-", "--absolute-names", s.p("f")])[1]
              .replace(os.fsencode(s.mnt), b"MNT"), "getfattr -d")
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def small(s):  # type: ignore[no-untyped-def]
        buf = ctypes.create_string_buffer(4)
        n = libc.getxattr(s.p("f"), b"user.big", buf, 4)
        return n, ctypes.get_errno() if n < 0 else 0
    pair.same(small, "getxattr ERANGE")


def test_stable_inode_numbers(pair: Pair) -> None:
    pair.build([[F("a/f", b"1"), H("a/g", "a/f"), D("a/sub")], [F("a/f", b"2"), F("b/x", b"x")]],
               upper=[], options=["timeout=0"])
    u = pair.u
    for rel in ["a/f", "a/g", "b/x"]:
        inos = {os.lstat(u.p(rel)).st_ino for _ in range(50)}
        assert len(inos) == 1, f"{rel}: st_ino changed across lookups: {inos}"
    assert os.lstat(u.p("a/f")).st_ino == os.lstat(u.p("a/g")).st_ino
    assert os.lstat(u.p("a/f")).st_ino != os.lstat(u.p("b/x")).st_ino
    # the contract: the real inode number of the object where it currently lives
    for rel, layer in [("a/f", 0), ("b/x", 1)]:
        assert os.lstat(u.p(rel)).st_ino == os.lstat(os.path.join(u.lowers[layer], rel)).st_ino
    # directories too: stable across lookups, distinct from each other
    dirs = {rel: {os.lstat(u.p(rel)).st_ino for _ in range(20)} for rel in ["", "a", "a/sub", "b"]}
    assert all(len(v) == 1 for v in dirs.values()), dirs
    assert len({next(iter(v)) for v in dirs.values()}) == len(dirs), dirs
    # readdir's d_ino agrees with stat for files
    with os.scandir(u.p("a")) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                assert e.inode() == os.lstat(e.path).st_ino, e.name


@pytest.mark.parametrize("style", ["aufs", "aufs-modes"])
def test_three_plus_branches_aufs_style(pair: Pair, style: str) -> None:
    pair.build([
        [F("x", b"B"), W("c1"), F("shared/b", b"B")],
        [F("x", b"C"), F("c1", b"C"), F("c2", b"C"), F("shared/c", b"C"), D("onlyc/deep/er")],
        [F("x", b"D"), F("c1", b"D"), F("d1", b"D"), F("shared/d", b"D"), W("c2")],
    ], upper=[F("a", b"A"), F("shared/a", b"A")], style=style, dialect="aufs")
    k = pair.assert_same_tree(times=True)
    assert sorted(k) == sorted([b"", b"a", b"x", b"c2", b"d1", b"shared", b"shared/a", b"shared/b",
                                b"shared/c", b"shared/d", b"onlyc", b"onlyc/deep", b"onlyc/deep/er"])


def test_read_content_and_offsets(pair: Pair) -> None:
    data = os.urandom(3 << 20)
    pair.build([[F("big", data), F("empty", b"")], [F("big", b"small")]], upper=[])
    with pair.opened("big", "empty") as fd:
        for off, ln in [(0, 10), (4095, 2), (1 << 20, 1 << 20), ((3 << 20) - 3, 100), (3 << 20, 10),
                        (10 << 20, 1)]:
            pair.same(lambda s, o=off, n=ln: os.pread(fd(s, "big"), n, o), f"pread {off} {ln}")
        pair.same(lambda s: os.pread(fd(s, "empty"), 10, 0), "pread empty")
        pair.same(lambda s: os.lseek(fd(s, "big"), 0, os.SEEK_END), "lseek end")


def test_access_and_open_errors(pair: Pair) -> None:
    pair.build([[F("ro", b"", mode=0o444), F("x", b"", mode=0o755), F("none", b"", mode=0o000),
                 L("dangling", "nope"), D("dir")], []], upper=None)
    for rel in ["ro", "x", "none", "dangling", "dir", "missing"]:
        for mode in (os.F_OK, os.R_OK, os.W_OK, os.X_OK):
            pair.same(lambda s, r=rel, m=mode: os.access(s.p(r), m), f"access {rel} {mode}")
    pair.same(lambda s: os.open(s.p("dir/nothing"), os.O_RDONLY), "open missing")
    pair.same(lambda s: os.open(s.p("ro/child"), os.O_RDONLY), "open under file")
    pair.same(lambda s: os.readlink(s.p("ro")), "readlink file")
    pair.same(lambda s: os.listdir(s.p("x")), "listdir file")


def test_unsupported_names_lookup(pair: Pair) -> None:
    pair.build([[F("a", b"")], [F("b", b"")]], upper=[])
    pair.same(lambda s: os.lstat(s.p(b"x" * 256)), "lookup 256-byte name")
    pair.same(lambda s: os.lstat(s.p("a/")), "trailing slash on file")
    assert call(os.lstat, pair.k.p(b"x" * 256)) == err("ENAMETOOLONG")


def test_aufs_branch_private_entries_hidden(pair: Pair) -> None:
    """Real AUFS branches carry .wh..wh.aufs, .wh..wh.plnk/ and .wh..wh.orph/ at their root; a union
    of such branches shows none of them (the kernel side simply lacks them)."""
    pair.build([[F("a", b"a"), W("gone")], [F("gone", b"g"), F("b", b"b")]], upper=[], dialect="aufs",
               style="aufs", mount=False)
    for lp in pair.u.lowers:
        (lp / ".wh..wh.aufs").write_bytes(b"")
        (lp / ".wh..wh.plnk").mkdir()
        (lp / ".wh..wh.plnk" / "123.456").write_bytes(b"pseudo-link")
        (lp / ".wh..wh.orph").mkdir()
        pair.lower_digests[lp] = util.layer_digest(lp)
    pair.mount()
    k = pair.assert_same_tree()
    assert sorted(k) == [b"", b"a", b"b"]
    for rel in [".wh..wh.aufs", ".wh..wh.plnk", ".wh..wh.orph", ".wh..wh.plnk/123.456"]:
        pair.same(lambda s, rel=rel: os.lstat(s.p(rel)).st_mode, f"lstat {rel}")


def test_many_branches(pair: Pair) -> None:
    layers = [[F(f"f{i}", b"%d" % i), F("shared", b"from %d" % i), F(f"d/x{i}", b""), W(f"f{i + 1}")]
              for i in range(12)]
    pair.build(layers, upper=[])
    k = pair.assert_same_tree()
    assert k[b"shared"] == pair.visible(pair.k, "shared")[b""]
    pair.same(lambda s: open(s.p("shared"), "rb").read(), "top of 12 wins")


def test_readdir_while_the_directory_changes(pair: Pair) -> None:
    """Entries that exist throughout a listing are returned exactly once, even when others are
    created and removed in the middle of it (readdir offsets stay valid)."""
    names = [f"{i:04d}-" + "n" * 100 for i in range(3000)]
    pair.build([[F(f"d/{n}", b"") for n in names[::2]], [F(f"d/{n}", b"") for n in names[1::2]]], upper=[])

    def run(s):  # type: ignore[no-untyped-def]
        seen = []
        removed = set(names[2000:2500])
        with os.scandir(s.p("d")) as it:
            for i, e in enumerate(it):
                seen.append(e.name)
                if i == 50:
                    for n in removed:
                        os.unlink(os.path.join(s.p("d"), os.fsencode(n)))
                    for j in range(500):
                        open(os.path.join(s.p("d"), b"new-%04d" % j), "wb").close()
        dups = sorted({n for n in seen if seen.count(n) > 1})
        kept = set(names) - removed
        missing = sorted(kept - {os.fsdecode(n) for n in seen})
        return dups, missing
    dups, missing = pair.same(run, "readdir across changes")
    assert dups == [] and missing == [], (dups[:5], missing[:5])
    pair.same(lambda s: sorted(os.listdir(s.p("d"))), "listing after")


@pytest.mark.parametrize("dialect", ["overlay", "aufs"])
def test_markers_between_layers(pair: Pair, dialect: str) -> None:
    """Whiteouts and opaque dirs in a middle layer cut off only what is below them."""
    pair.build([
        [D("x"), F("x/top", b""), D("o"), F("o/top", b""), F("gone-then-back", b"top")],
        [W("x"), D("o", opaque=True), F("o/mid", b""), W("gone-then-back"), F("y/mid", b"")],
        [F("x/bottom", b""), F("o/bottom", b""), F("gone-then-back", b"bottom"), F("y/bottom", b""),
         D("notopq", xattrs={"trusted.overlay.opaque": b"n"})],
        [F("notopq/deep", b"")],
    ], upper=[], dialect=dialect, style="aufs" if dialect == "aufs" else "overlay")
    k = pair.assert_same_tree()
    assert b"x/bottom" not in k and b"o/bottom" not in k and b"notopq/deep" in k and b"y/bottom" in k
    pair.same(lambda s: open(s.p("gone-then-back"), "rb").read(), "read")
