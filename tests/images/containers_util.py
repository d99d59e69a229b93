"""Helpers for the container tests: images with a config of our choosing, made without podman."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from images_util import sha, write_tar
from launcher_util import build_busybox_layer

CREATED = "2020-09-13T12:26:40Z"


def busybox_tar(work: Path) -> bytes:
    """A layer tar of launcher_util's busybox root (static busybox, its applets, passwd and group)."""
    root = work / "busybox-rootfs"
    build_busybox_layer(root, work)
    for d in ("tmp", "proc", "sys", "dev"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(root, arcname=".")
    return buf.getvalue()


def image_archive(path: Path, tars: Sequence[bytes], config: dict[str, Any], tag: str) -> None:
    """A docker-archive of one image: *tars* (bottom first) with *config* as its ``config`` object."""
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "created": CREATED, "config": config,
                      "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
                      "history": [{"created": CREATED, "created_by": f"layer {i}"} for i in range(len(tars))]},
                     sort_keys=True).encode()
    members = {sha(cfg)[7:] + ".json": cfg}
    names = []
    for t in tars:
        members[sha(t)[7:] + ".tar"] = t
        names.append(sha(t)[7:] + ".tar")
    members["manifest.json"] = json.dumps([{"Config": sha(cfg)[7:] + ".json", "RepoTags": [tag],
                                            "Layers": names}]).encode()
    write_tar(path, members)


def ps_rows(text: str) -> dict[str, dict[str, str]]:
    """`unionfs ps` output as {name: {column: value}}, cut at the header's column starts."""
    lines = text.splitlines()
    header = lines[0]
    cols = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]
    starts = [header.index(c) for c in cols]
    rows = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[-1]] = dict(zip(cols, cells, strict=True))
    return rows
