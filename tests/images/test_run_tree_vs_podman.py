"""`unionfs run IMAGE` shows the same tree as `podman run IMAGE` of a podman-built image whose layers
hold the hard cases: a deleted file, a directory replaced by `rm -rf d && mkdir d`, a renamed
directory, a hard link, a setuid file, a file with a user.* xattr and a symlink.

Both runs print the same walk of the whole root (type, mode, owner, link count, size, md5 of
content, link target, xattrs, and which paths share an inode), made inside the container by
busybox plus getfattr (copied into the image with the libc it needs), and the two walks must be equal.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_util import cli, docker_archive
from test_podman import Podman, private_podman

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("need_fuse")]

BASE = "localhost/unionfs-tree-base:latest"
BUILT = "localhost/unionfs-tree-built:latest"
# Host files copied into the image so the walk can read xattrs (busybox has no getfattr).
TOOLS = {"/usr/bin/getfattr": "xbin/getfattr", "/usr/bin/setfattr": "xbin/setfattr",
         "/lib/x86_64-linux-gnu/libc.so.6": "lib/x86_64-linux-gnu/libc.so.6",
         "/lib64/ld-linux-x86-64.so.2": "lib64/ld-linux-x86-64.so.2"}
CONTAINERFILE = """\
FROM {base}
COPY tools/ /
RUN rm /base/del.txt
RUN rm -rf /base/d && mkdir /base/d && echo fresh > /base/d/fresh
RUN mv /base/tree /base/tree2
RUN ln /base/keep.txt /base/hard
RUN echo setuid > /base/suid && chmod 4755 /base/suid && echo setgid > /base/sgid && chmod 2711 /base/sgid
RUN echo x > /base/xa && /xbin/setfattr -n user.note -v hello /base/xa
RUN ln -s ../keep.txt /base/d/sym
"""
# Not the image's: what each runtime puts into a container of its own (podman adds /etc/mtab too).
SKIP = ("./etc/hosts", "./etc/resolv.conf", "./etc/hostname", "./run/.containerenv", "./etc/mtab")
WALK = r"""
cd /
find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev \) -prune -o -print | sort | while IFS= read -r p; do
    case "$p" in @SKIP@) continue ;; esac
    t=$(stat -c %F "$p")
    line="$p|$t|$(stat -c '%a|%u|%g|%h|%i' "$p")"
    case "$t" in
        regular*) line="$line|$(stat -c %s "$p")|$(md5sum < "$p" | cut -d' ' -f1)" ;;
        symbolic\ link) line="$line|$(readlink "$p")" ;;
    esac
    echo "F $line"
    /xbin/getfattr -h -d -m - -e hex "$p" 2>/dev/null | grep -v '^#' | grep . | sed "s|^|X $p |"
done
echo END
""".replace("@SKIP@", "|".join(SKIP))


def walk(out: str) -> list[str]:
    """The walk's lines with inode numbers replaced by the first path that has the inode (inode
    numbers differ between runtimes; which paths share one must not)."""
    assert out.rstrip().endswith("END"), out[-2000:]
    first: dict[str, str] = {}
    lines = []
    for line in out.splitlines():
        if line.startswith("F "):
            fields = line[2:].split("|")
            path, ino = fields[0], fields[6]
            fields[6] = first.setdefault(ino, path)
            line = "F " + "|".join(fields)
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def pm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    base = tmp_path_factory.mktemp("podman-tree")
    with private_podman(base, None, "the tree comparison with podman") as p:
        docker_archive(base / "base.tar", [([p.rootfs_tar()], [BASE])])
        p("load", "-i", str(base / "base.tar"))
        ctx = base / "ctx"
        for src, dst in TOOLS.items():
            (ctx / "tools" / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / "tools" / dst)
        (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=BASE))
        p("build", "--pull=never", "--network=none", "-t", BUILT, str(ctx))
        p("save", "-o", str(base / "built.tar"), BUILT)
        yield p


def test_run_shows_the_tree_podman_shows(pm: Podman, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli("image", "import", str(pm.base / "built.tar"), store=store)
    theirs = walk(pm("run", "--rm", "--pull=never", "--network=none", BUILT, "sh", "-c", WALK))
    ours = walk(cli("run", "--rm", BUILT, "sh", "-c", WALK, store=store).stdout)
    # the walk saw the cases it is about (so an empty or truncated walk cannot pass)
    by_path = {ln.split("|")[0][2:]: ln for ln in theirs if ln.startswith("F ")}
    assert "./base/del.txt" not in by_path and "./base/tree" not in by_path
    assert by_path["./base/tree2/inner/t"].startswith("F ./base/tree2/inner/t|regular file|644|")
    assert sorted(p for p in by_path if p.startswith("./base/d/")) == ["./base/d/fresh", "./base/d/sym"]
    assert by_path["./base/hard"].split("|")[5:7] == ["2", "./base/hard"]
    assert by_path["./base/keep.txt"].split("|")[6] == "./base/hard"
    assert by_path["./base/suid"].split("|")[2] == "4755"
    assert by_path["./base/sgid"].split("|")[2] == "2711"
    assert by_path["./base/d/sym"].endswith("|../keep.txt")
    assert "X ./base/xa user.note=0x68656c6c6f" in theirs
    # containers/storage gives the bottom layer's root directory mode 0555 whatever the layer's "./"
    # entry says; unionfs keeps the entry's mode (0755 here, as the base layer's tar has it).
    assert theirs[0] == "F .|directory|555|0|0|1|."
    assert ours[0] == "F .|directory|755|0|0|1|."
    assert ours[1:] == theirs[1:]

