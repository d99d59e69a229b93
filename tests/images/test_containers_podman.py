"""`unionfs run IMAGE` beside `podman run` of the same podman-built image (Entrypoint, Cmd, Env,
WorkingDir and User, and the flags that override them), and the round trip of a container: changed
under `unionfs run`, `unionfs commit`, `unionfs image export`, `podman load`, `podman run`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_util import cli, docker_archive
from test_podman import Podman, private_podman

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("need_fuse")]

BASE = "localhost/unionfs-ctr-base:latest"
BUILT = "localhost/unionfs-ctr-built:latest"
COMMITTED = "localhost/unionfs-ctr-committed:latest"
SCRIPT = 'echo "$0|$*"; pwd; id -u; id -g; echo "$GREETING|$EXTRA|$PATH|$HOME"; ls'
CONTAINERFILE = f"""\
FROM {BASE}
ENV GREETING=hello PATH=/bin:/usr/bin
RUN mkdir -p /srv/app /srv/other && echo data > /srv/app/data && echo gone > /srv/app/victim && \
    echo app:x:1000:1000::/home/app:/bin/sh >> /etc/passwd && echo app:x:1000: >> /etc/group
WORKDIR /srv/app
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c", {json.dumps(SCRIPT)}]
CMD ["default", "cmd"]
"""
# The same runs both ways: flags and arguments after the image.
CASES = [
    ((), ()),
    ((), ("x", "y")),
    (("-e", "GREETING=flag", "-e", "EXTRA=e"), ()),
    (("-w", "/srv/other"), ()),
    (("-u", "0"), ()),
    (("-u", "0:0", "-e", "HOME=/nowhere"), ("a",)),
    (("--entrypoint", "/bin/echo"), ()),
    (("--entrypoint", "/bin/echo"), ("z", "w")),
    (("--entrypoint", ""), ("echo", "no entrypoint")),
]


@pytest.fixture(scope="module")
def pm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    base = tmp_path_factory.mktemp("podman-containers")
    with private_podman(base, None, "the podman container tests") as p:
        docker_archive(base / "base.tar", [([p.rootfs_tar()], [BASE])])
        p("load", "-i", str(base / "base.tar"))
        ctx = base / "ctx"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(CONTAINERFILE)
        p("build", "--pull=never", "--network=none", "-t", BUILT, str(ctx))
        p("save", "-o", str(base / "built.tar"), BUILT)
        yield p


@pytest.fixture(scope="module")
def store(pm: Podman, tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = tmp_path_factory.mktemp("ctr-store") / "store"
    cli("image", "import", str(pm.base / "built.tar"), store=s)
    return s


@pytest.mark.parametrize("flags,args", CASES, ids=[" ".join((*f, *a)) or "plain" for f, a in CASES])
def test_run_image_as_podman_runs_it(pm: Podman, store: Path, flags: tuple[str, ...], args: tuple[str, ...]) -> None:
    theirs = pm("run", "--rm", "--pull=never", "--network=none", *flags, BUILT, *args)
    ours = cli("run", "--rm", *flags, BUILT, *args, store=store).stdout
    assert ours == theirs


def test_container_round_trip_into_podman(pm: Podman, store: Path, tmp_path: Path) -> None:
    changes = "rm victim && echo new > new && mkdir -p /srv/made && echo m > /srv/made/f && rm -rf /srv/other"
    cli("run", "--name", "rt", "-u", "0", "--entrypoint", "/bin/sh", BUILT, "-c", changes, store=store)
    diff = cli("diff", "rt", store=store).stdout.splitlines()
    assert sorted(diff) == ["A /srv/app/new", "A /srv/made", "A /srv/made/f", "C /srv", "C /srv/app",
                            "D /srv/app/victim", "D /srv/other"]
    cli("commit", "rt", COMMITTED, store=store)
    cli("rm", "rt", store=store)
    archive = tmp_path / "committed.tar"
    cli("image", "export", COMMITTED, "-o", str(archive), store=store)
    pm("load", "-i", str(archive))
    look = ["--entrypoint", "/bin/sh", COMMITTED, "-c", "ls /srv /srv/app; cat /srv/made/f /srv/app/new"]
    theirs = pm("run", "--rm", "--pull=never", "--network=none", *look)
    assert theirs.split() == ["/srv:", "app", "made", "/srv/app:", "data", "new", "m", "new"]
    assert cli("run", "--rm", *look, store=store).stdout == theirs
    # the committed image keeps the base's config
    assert pm("run", "--rm", "--pull=never", "--network=none", COMMITTED).splitlines()[0] == "default|cmd"
