"""What the benchmark measures: sizes, the deterministic layer contents, and the expected answers.

Everything a workload is checked against is computed here from a `Sizes` alone, never read back from
the disk, so a layer that was built wrong or an implementation that answers wrong both fail validation.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

BASE_DIR = Path(os.environ.get("UNIONFS_PERF_DIR", "/var/tmp/unionfs-perf"))
"""All of the benchmark's files and mount points live under here (and nowhere else); UNIONFS_PERF_DIR
moves them (two checkouts benchmarking at once must not share mount points)."""

BLOCK_SEED = 20260601
TOP_EXTRA_BYTES = 123
"""A file re-provided by the top layer is this much longer, so ignoring the top layer changes byte counts."""


@dataclass(frozen=True)
class Sizes:
    """The sizes of one benchmark mode; the defaults are the full sizes."""

    name: str = "full"
    tree_files: int = 20_000
    tree_dirs: int = 1_500
    median_file_size: int = 4 * KIB
    top_every: int = 10  # the top layer re-provides every 10th file (10%)
    big_read: int = 1 * GIB
    big_copyup: int = 512 * MIB
    copyup_small: int = 1_000
    create_files: int = 10_000
    create_size: int = 4 * KIB
    wide_bottom: int = 5_000
    wide_top: int = 5_000
    wide_whiteouts: int = 500
    untar_entries: int = 5_000
    untar_bytes: int = 95_000_000
    branch_counts: tuple[int, ...] = (1, 8, 32, 128)
    branch_files: int = 2_000
    branch_dirs: int = 100
    small_writes: int = 80 * MIB   # W10: written in 4 KiB writes to a new file
    random_reads: int = 20_000     # W10: 4 KiB reads at random offsets of big/read.bin
    big_write: int = 256 * MIB     # W10: written in 1 MiB writes to a new file

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


FULL = Sizes()
QUICK = Sizes(
    name="quick",
    tree_files=2_000,
    tree_dirs=150,
    big_read=64 * MIB,
    big_copyup=32 * MIB,
    copyup_small=100,
    create_files=1_000,
    wide_bottom=500,
    wide_top=500,
    wide_whiteouts=50,
    untar_entries=500,
    untar_bytes=9_500_000,
    branch_counts=(1, 8, 32, 128),
    branch_files=200,
    branch_dirs=20,
    small_writes=8 * MIB,
    random_reads=2_000,
    big_write=32 * MIB,
)


@dataclass(frozen=True)
class FileSpec:
    """One regular file of the merged view: its path under the tree and its bottom/top contents."""

    index: int
    rel: str
    bottom_size: int
    top_size: int | None  # None: not re-provided by the top layer

    @property
    def merged_size(self) -> int:
        return self.bottom_size if self.top_size is None else self.top_size


def content_block() -> bytes:
    """1 MiB of fixed pseudo-random bytes; every file's content is a rotation of it."""
    return random.Random(BLOCK_SEED).randbytes(MIB)


def file_bytes(block: bytes, seed: int, size: int) -> bytes:
    """The deterministic content of a small file (size <= 1 MiB) identified by `seed`."""
    start = (seed * 7919) % len(block)
    data = block[start:] + block[:start]
    return (data * (size // len(data) + 1))[:size]


def big_chunk(block: bytes, seed: int, index: int = 0) -> bytes:
    """MiB number *index* of the big file `seed` names: each MiB a rotation of its own, so that a read
    at a wrong MiB of the right file gives other bytes."""
    return file_bytes(block, seed * 100_003 + index, MIB)


def big_bytes(block: bytes, seed: int, offset: int, length: int) -> bytes:
    """*length* bytes at *offset* of the big file `seed` names (see `big_chunk`)."""
    out = bytearray()
    while length > 0:
        index, start = divmod(offset, MIB)
        piece = big_chunk(block, seed, index)[start : start + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


def random_read_offsets(size: int, count: int) -> list[int]:
    """W10's 4 KiB-aligned read offsets in a file of *size* bytes: the same for every implementation."""
    rng = random.Random(10)
    return [rng.randrange(size // (4 * KIB)) * 4 * KIB for _ in range(count)]


def lognormal_sizes(rng: random.Random, count: int, median: int, cap: int) -> list[int]:
    return [min(cap, int(rng.lognormvariate(math.log(median), 1.0))) for _ in range(count)]


def dir_names(count: int, prefix: str = "d") -> list[str]:
    """`count` directory paths, two levels deep: a few top directories with the rest spread beneath."""
    tops = max(1, count // 50)
    names = [f"{prefix}{t:02d}" for t in range(tops)]
    names += [f"{prefix}{j % tops:02d}/s{j:04d}" for j in range(count - tops)]
    return names


@dataclass(frozen=True)
class Layout:
    """The deterministic content of every layer for one `Sizes`, and the answers derived from it."""

    sizes: Sizes

    @cached_property
    def tree_dirs(self) -> list[str]:
        return dir_names(self.sizes.tree_dirs)

    @cached_property
    def tree_files(self) -> list[FileSpec]:
        s = self.sizes
        rng = random.Random(1)
        sizes = lognormal_sizes(rng, s.tree_files, s.median_file_size, 512 * KIB)
        dirs = self.tree_dirs
        files = []
        for i, size in enumerate(sizes):
            top = size + TOP_EXTRA_BYTES if i % s.top_every == 0 else None
            files.append(FileSpec(i, f"{dirs[i % len(dirs)]}/f{i:05d}", size, top))
        return files

    @cached_property
    def copyup_targets(self) -> list[FileSpec]:
        """The files W4 appends to: only in the bottom layer, so each append is a copy-up."""
        bottom_only = [f for f in self.tree_files if f.top_size is None]
        step = max(1, len(bottom_only) // self.sizes.copyup_small)
        return bottom_only[::step][: self.sizes.copyup_small]

    # W6: the wide directory ------------------------------------------------------------------------
    @cached_property
    def wide_bottom_names(self) -> list[str]:
        return [f"b{i:05d}" for i in range(self.sizes.wide_bottom)]

    @cached_property
    def wide_top_names(self) -> list[str]:
        return [f"t{i:05d}" for i in range(self.sizes.wide_top)]

    @cached_property
    def wide_whiteouts(self) -> list[str]:
        """Names of the bottom layer that the upper layer deletes with a 0/0 character device."""
        step = self.sizes.wide_bottom // self.sizes.wide_whiteouts
        return self.wide_bottom_names[::step][: self.sizes.wide_whiteouts]

    @cached_property
    def wide_merged(self) -> list[str]:
        hidden = set(self.wide_whiteouts)
        return sorted([n for n in self.wide_bottom_names if n not in hidden] + self.wide_top_names)

    # W7: the source tarball ------------------------------------------------------------------------
    @cached_property
    def untar_dirs(self) -> list[str]:
        return dir_names(max(1, self.sizes.untar_entries // 20), prefix="pkg")

    @cached_property
    def untar_files(self) -> list[tuple[str, int]]:
        s = self.sizes
        count = s.untar_entries - len(self.untar_dirs) - 1  # minus the dirs and the root "src"
        rng = random.Random(7)
        raw = [rng.random() for _ in range(count)]
        scale = s.untar_bytes / sum(raw)
        dirs = self.untar_dirs
        return [(f"{dirs[i % len(dirs)]}/m{i:05d}.py", int(r * scale)) for i, r in enumerate(raw)]

    # W8: the branch tree ---------------------------------------------------------------------------
    @cached_property
    def branch_dirs(self) -> list[str]:
        return dir_names(self.sizes.branch_dirs)

    @cached_property
    def branch_files(self) -> list[tuple[str, int]]:
        dirs = self.branch_dirs
        return [
            (f"{dirs[i % len(dirs)]}/g{i:05d}", 1 + (i * 37) % 2048) for i in range(self.sizes.branch_files)
        ]

    # Expected answers ------------------------------------------------------------------------------
    def expected_tree_listing(self) -> dict[str, tuple[str, int]]:
        """What `find tree -printf '%y %s %P'` must print, as {path: (type, size)} (root excluded)."""
        listing: dict[str, tuple[str, int]] = {d: ("d", -1) for d in self.tree_dirs}
        listing.update({f.rel: ("f", f.merged_size) for f in self.tree_files})
        return listing

    def expected_tree_tar_bytes(self) -> int:
        """The exact length of `tar cf - tree` (GNU format, short names, default blocking factor 20)."""
        total = 512 * (1 + len(self.tree_dirs))  # the root "tree/" and every directory
        total += sum(512 + _round_up(f.merged_size, 512) for f in self.tree_files)
        return _round_up(total + 1024, 10240)

    def expected_branch_listing(self, branches: int) -> dict[str, tuple[str, int]]:
        listing: dict[str, tuple[str, int]] = {d: ("d", -1) for d in self.branch_dirs}
        listing.update({rel: ("f", size) for rel, size in self.branch_files})
        listing.update({f"only{i:03d}": ("f", 4) for i in range(1, branches)})
        return listing

    def expected_untar_listing(self) -> dict[str, tuple[str, int]]:
        listing: dict[str, tuple[str, int]] = {"src": ("d", -1)}
        listing.update({f"src/{d}": ("d", -1) for d in self.untar_dirs})
        listing.update({f"src/{rel}": ("f", size) for rel, size in self.untar_files})
        return listing


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
