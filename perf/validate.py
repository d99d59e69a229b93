"""Check every workload's observations against the answers derived from the layout.

Each check returns None when the output is right, or a one-line description of the first thing that is wrong.
A run whose output is wrong is reported as invalid and never enters a median, so a fast wrong answer
cannot win.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from layerset import LayerSet
from spec import MIB, big_bytes, big_chunk, content_block, random_read_offsets
from worker import SAMPLE_LENGTH, file_digest, sample_offsets

Problem = str | None


def compare_listing(seen: dict[str, list[Any]], expected: dict[str, tuple[str, int]]) -> Problem:
    if len(seen) != len(expected):
        files = sum(1 for kind, _ in seen.values() if kind == "f")
        want = sum(1 for kind, _ in expected.values() if kind == "f")
        return f"{len(seen)} entries ({files} files), expected {len(expected)} ({want} files)"
    for path, (kind, size) in expected.items():
        got = seen.get(path)
        if got is None:
            return f"missing {path}"
        if tuple(got) != (kind, size):
            return f"{path}: type/size {got[0]}/{got[1]}, expected {kind}/{size}"
    return None


def expected_sample(size: int) -> str:
    block = content_block()
    digest = hashlib.sha1()
    for offset in sample_offsets(size):
        digest.update(big_bytes(block, 1, offset, min(SAMPLE_LENGTH, size - offset)))
    return digest.hexdigest()


def check(workload: str, variant: str, observed: Any, layers: LayerSet, params: dict[str, Any]) -> Problem:
    layout = layers.layout
    sizes = layout.sizes
    if workload == "W1":
        return compare_listing(observed, layout.expected_tree_listing())
    if workload == "W2":
        if observed["bytes"] != sizes.big_read:
            return f"read {observed['bytes']} bytes, expected {sizes.big_read}"
        return (
            None
            if observed["sample"] == expected_sample(sizes.big_read)
            else "content differs from the lower file"
        )
    if workload == "W3":
        want = layout.expected_tree_tar_bytes()
        return None if observed == want else f"tar stream of {observed} bytes, expected {want}"
    if workload == "W4":
        return _check_copy_up(variant, observed, layers)
    if workload == "W5":
        return _check_create_delete(variant, observed, params)
    if workload == "W6":
        names = layout.wide_merged
        if sorted(observed) == names:
            return None
        return f"{len(observed)} names, expected {len(names)} (whiteouts or a layer mishandled)"
    if workload == "W7":
        return compare_listing(observed, layout.expected_untar_listing())
    if workload == "W8":
        return compare_listing(observed, layout.expected_branch_listing(params["branches"]))
    if workload == "W10":
        return _check_small_io(variant, observed, params)
    return f"unknown workload {workload}"


def _check_small_io(variant: str, observed: Any, params: dict[str, Any]) -> Problem:
    if variant in ("write 4k", "write 1m"):
        size = params["small_writes" if variant == "write 4k" else "big_write"]
        if observed["size"] != size:
            return f"wrote {observed['size']} bytes, expected {size}"
        return None if observed["sha1"] == _repeated_sha1(size) else "the written file's content differs"
    block = content_block()
    offsets = random_read_offsets(params["big_read"], params["random_reads"])
    if observed["bytes"] != 4096 * len(offsets):
        return f"read {observed['bytes']} bytes, expected {4096 * len(offsets)}"
    chunks: dict[int, bytes] = {}
    digest = hashlib.sha1()
    for offset in offsets:          # 4 KiB-aligned: never across a MiB
        index, start = divmod(offset, MIB)
        if index not in chunks:
            chunks[index] = big_chunk(block, 1, index)
        digest.update(chunks[index][start : start + 4096])
    return None if observed["sha1"] == digest.hexdigest() else "content differs from the lower file"


def _check_copy_up(variant: str, observed: Any, layers: LayerSet) -> Problem:
    layout = layers.layout
    if variant == "small":
        if not observed["tails_ok"]:
            return "an appended byte is missing"
        for f in layout.copyup_targets:
            if observed["sizes"][f.rel] != f.merged_size + 1:
                return f"tree/{f.rel}: size {observed['sizes'][f.rel]}, expected {f.merged_size + 1}"
        return None
    want = layout.sizes.big_copyup + 1
    if not observed["tail_ok"]:
        return "the appended byte is missing"
    return None if observed["size"] == want else f"size {observed['size']}, expected {want}"


def _check_create_delete(variant: str, observed: Any, params: dict[str, Any]) -> Problem:
    count, size = params["count"], params["size"]
    if variant == "create":
        if observed != {"count": count, "bytes": count * size}:
            return f"after create: {observed}, expected {count} files of {size} bytes"
        return None
    return None if observed == 0 else f"{observed} files left after delete"


def check_layers_after(workload: str, upper: Path | None, layers: LayerSet) -> Problem:
    """After a union's write workload: the writes reached the upper layer and no lower layer changed."""
    if upper is None or workload not in ("W4", "W7", "W10"):
        return None
    layout = layers.layout
    if workload == "W10":
        if (layers.bottom / "w10").exists() or (layers.top / "w10").exists():
            return "W10 wrote into a lower layer"
        for name, size in (("small", layout.sizes.small_writes), ("big", layout.sizes.big_write)):
            path = upper / "w10" / name
            if not path.is_file() or path.stat().st_size != size:
                return f"w10/{name} not found in the upper layer with its {size} bytes"
            if file_digest(path)["sha1"] != _repeated_sha1(size):
                return f"w10/{name} in the upper layer differs from what was written"
        return None
    if workload == "W7":
        if (layers.bottom / "w7").exists() or (layers.top / "w7").exists():
            return "untar wrote into a lower layer"
        return None if (upper / "w7/src").is_dir() else "untarred tree not found in the upper layer"
    for f in layout.copyup_targets:
        if (layers.bottom / "tree" / f.rel).stat().st_size != f.bottom_size:
            return f"lower file tree/{f.rel} was modified"
        copied = upper / "tree" / f.rel
        if not copied.exists() or copied.stat().st_size != f.merged_size + 1:
            return f"tree/{f.rel} was not copied up"
    if (layers.bottom / "big/copyup.bin").stat().st_size != layout.sizes.big_copyup:
        return "lower big/copyup.bin was modified"
    big = upper / "big/copyup.bin"
    if not big.exists() or big.stat().st_size != layout.sizes.big_copyup + 1:
        return "big/copyup.bin was not copied up"
    return None


def _repeated_sha1(size: int) -> str:
    """What W10 writes: the content block repeated (*size* a multiple of a MiB)."""
    block = content_block()
    digest = hashlib.sha1()
    for _ in range(size // MIB):
        digest.update(block)
    return digest.hexdigest()
