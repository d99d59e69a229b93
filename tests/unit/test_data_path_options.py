"""The options that choose an open file's data path: ``passthrough=on|off`` (on by default) and
``writeback`` (fuse-overlayfs' name; off by default), as `build_config` reads them and as the
resident server's worker gets them back."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionfs.core.config import build_config
from unionfs.core.errors import QuietError
from unionfs.server.fastmount import message
from unionfs.server.resident import config_from


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    for n in ("upper", "lower", "mnt"):
        (tmp_path / n).mkdir()
    return f"{tmp_path}/upper:{tmp_path}/lower", str(tmp_path / "mnt")


@pytest.mark.parametrize(("opts", "passthrough", "writeback"), [
    ([], True, False),
    (["passthrough=off"], False, False),
    (["passthrough=on"], True, False),
    (["writeback"], True, True),
    (["writeback=1"], True, True),
    (["writeback=0,passthrough=off"], False, False),
])
def test_data_path_options(dirs: tuple[str, str], opts: list[str], passthrough: bool, writeback: bool
                           ) -> None:
    cfg = build_config(dirs[0], dirs[1], opts)
    assert (cfg.passthrough, cfg.writeback) == (passthrough, writeback)
    again = config_from(message(cfg))
    assert (again.passthrough, again.writeback) == (passthrough, writeback)


@pytest.mark.parametrize("opt", ["passthrough", "passthrough=yes", "writeback=2"])
def test_bad_data_path_options(dirs: tuple[str, str], opt: str) -> None:
    with pytest.raises(QuietError, match=opt.split("=")[0]):
        build_config(dirs[0], dirs[1], [opt])
