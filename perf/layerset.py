"""Build the benchmark's layers once and cache them under BASE_DIR.

Layout of a built layer set (`layers-<mode>/`):

    bottom/   tree/ (all files), wide/ (b* names), big/read.bin, big/copyup.bin
    top/      tree/ (every 10th file, longer), wide/ (t* names)
    upper/    the upper-layer template: wide/ holding 0/0 character-device whiteouts of some b* names
    native/   the merged view as one plain directory (the "native" implementation)
    untar.tar the W7 source tree

The W8 branches live apart in a short path (`b<m>/<i>`) so that 128 of them fit in one mount option.
A set is rebuilt when its stamp (the sizes and FORMAT) differs; the build goes to a temporary name and is
renamed into place, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spec import BASE_DIR, MIB, Layout, big_chunk, content_block, file_bytes

FORMAT = 2  # 2: each MiB of a big file differs from the others


@dataclass(frozen=True)
class LayerSet:
    """Paths of one built layer set."""

    root: Path
    branches_root: Path
    layout: Layout

    @property
    def bottom(self) -> Path:
        return self.root / "bottom"

    @property
    def top(self) -> Path:
        return self.root / "top"

    @property
    def upper_template(self) -> Path:
        return self.root / "upper"

    @property
    def native(self) -> Path:
        return self.root / "native"

    @property
    def tarball(self) -> Path:
        return self.root / "untar.tar"

    @property
    def lowers(self) -> list[Path]:
        """Lower layers, top first (overlayfs order)."""
        return [self.top, self.bottom]

    def branches(self, count: int) -> list[Path]:
        """`count` W8 branches, top first; the bottom one (0) holds every file."""
        return [self.branches_root / str(i) for i in reversed(range(count))]


def ensure_layers(layout: Layout, log: bool = True) -> LayerSet:
    mode = layout.sizes.name
    layers = LayerSet(BASE_DIR / f"layers-{mode}", BASE_DIR / f"b{mode[0]}", layout)
    stamp = json.dumps({"format": FORMAT, "sizes": layout.sizes.as_dict()}, sort_keys=True)
    _build_if_stale(layers.root, stamp, lambda tmp: _build_main(tmp, layout), log)
    _build_if_stale(layers.branches_root, stamp, lambda tmp: _build_branches(tmp, layout), log)
    return layers


def _build_if_stale(target: Path, stamp: str, build: object, log: bool) -> None:
    stamp_file = target / ".stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    started = time.monotonic()
    if log:
        print(f"building {target} (once; cached for later runs) ...", file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + ".tmp")
    for old in (tmp, target):
        if old.exists():
            shutil.rmtree(old)
    tmp.mkdir(parents=True)
    build(tmp)  # type: ignore[operator]
    (tmp / ".stamp").write_text(stamp)
    os.sync()
    tmp.rename(target)
    if log:
        print(f"built {target} in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_big(path: Path, size: int, seed: int, block: bytes) -> None:
    with open(path, "wb") as out:
        for index in range((size + MIB - 1) // MIB):
            out.write(big_chunk(block, seed, index)[: min(MIB, size - index * MIB)])


def _build_main(root: Path, layout: Layout) -> None:
    block = content_block()
    _build_tree(root, layout, block)
    _build_wide(root, layout)
    _build_big(root, layout, block)
    _build_tarball(root, layout, block)


def _build_tree(root: Path, layout: Layout, block: bytes) -> None:
    for layer in ("bottom", "top", "native"):
        for d in layout.tree_dirs:
            (root / layer / "tree" / d).mkdir(parents=True)
    for f in layout.tree_files:
        bottom = file_bytes(block, f.index, f.bottom_size)
        write_file(root / "bottom/tree" / f.rel, bottom)
        if f.top_size is None:
            write_file(root / "native/tree" / f.rel, bottom)
        else:
            top = file_bytes(block, f.index + 1_000_003, f.top_size)
            write_file(root / "top/tree" / f.rel, top)
            write_file(root / "native/tree" / f.rel, top)


def _build_wide(root: Path, layout: Layout) -> None:
    for layer in ("bottom", "top", "native", "upper"):
        (root / layer / "wide").mkdir(parents=True)
    for name in layout.wide_bottom_names:
        write_file(root / "bottom/wide" / name, b"")
    for name in layout.wide_top_names:
        write_file(root / "top/wide" / name, b"")
    for name in layout.wide_merged:
        write_file(root / "native/wide" / name, b"")
    for name in layout.wide_whiteouts:
        os.mknod(root / "upper/wide" / name, 0o600 | 0o020000, os.makedev(0, 0))


def _build_big(root: Path, layout: Layout, block: bytes) -> None:
    for layer in ("bottom", "native"):
        (root / layer / "big").mkdir()
    write_big(root / "bottom/big/read.bin", layout.sizes.big_read, 1, block)
    os.link(root / "bottom/big/read.bin", root / "native/big/read.bin")  # read-only in every workload
    write_big(root / "bottom/big/copyup.bin", layout.sizes.big_copyup, 2, block)
    write_big(root / "native/big/copyup.bin", layout.sizes.big_copyup, 2, block)


def _build_tarball(root: Path, layout: Layout, block: bytes) -> None:
    source = root / "untar-src"
    for d in layout.untar_dirs:
        (source / "src" / d).mkdir(parents=True)
    for i, (rel, size) in enumerate(layout.untar_files):
        write_file(source / "src" / rel, file_bytes(block, 50_000 + i, size))
    subprocess.run(["tar", "cf", str(root / "untar.tar"), "-C", str(source), "src"], check=True)
    shutil.rmtree(source)


def _build_branches(root: Path, layout: Layout) -> None:
    block = content_block()
    for i in range(max(layout.sizes.branch_counts)):
        branch = root / str(i)
        for d in layout.branch_dirs:
            (branch / d).mkdir(parents=True)
        if i > 0:
            write_file(branch / f"only{i:03d}", b"only")
    for j, (rel, size) in enumerate(layout.branch_files):
        write_file(root / "0" / rel, file_bytes(block, 90_000 + j, size))


def restore_native(layers: LayerSet) -> None:
    """Undo what the write workloads did to the native directory (appends, new directories)."""
    native = layers.native
    for f in layers.layout.copyup_targets:
        path = native / "tree" / f.rel
        if path.stat().st_size != f.merged_size:
            os.truncate(path, f.merged_size)
    big = native / "big/copyup.bin"
    if big.stat().st_size != layers.layout.sizes.big_copyup:
        os.truncate(big, layers.layout.sizes.big_copyup)
    for leftover in ("w5", "w7", "w10"):
        if (native / leftover).exists():
            shutil.rmtree(native / leftover)
