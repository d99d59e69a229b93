"""``-o metacopy``: the option as overlayfs reads it, carried to the server unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionfs.core.config import MountConfig, build_config
from unionfs.core.errors import QuietError
from unionfs.server import fastmount, protocol, resident


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("lower", "upper", "work", "mnt"):
        (tmp_path / name).mkdir()
        out[name] = str(tmp_path / name)
    return out


def _cfg(dirs: dict[str, str], extra: str, strict: bool = True) -> MountConfig:
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    return build_config(None, dirs["mnt"], [opts + ("," + extra if extra else "")], strict=strict)


def test_metacopy_on_off_and_default(dirs: dict[str, str]) -> None:
    assert _cfg(dirs, "metacopy=on").metacopy is True
    assert _cfg(dirs, "metacopy=on,metacopy=off").metacopy is False
    assert _cfg(dirs, "").metacopy is False
    assert build_config(f"{dirs['upper']}:{dirs['lower']}", dirs["mnt"], ["metacopy=on"]).metacopy


@pytest.mark.parametrize("extra, message", [
    ("metacopy=yes", "metacopy=yes: use metacopy=on or metacopy=off"),
    ("metacopy", "option metacopy needs a value"),
    ("redirect_dir=off,metacopy=on", "conflicting options: metacopy=on,redirect_dir=off"),
    ("metacopy=on,redirect_dir=nofollow", "conflicting options: metacopy=on,redirect_dir=nofollow"),
])
def test_metacopy_refused(dirs: dict[str, str], extra: str, message: str) -> None:
    with pytest.raises(QuietError, match=message):
        _cfg(dirs, extra, strict=False)


def test_metacopy_reaches_the_server(dirs: dict[str, str]) -> None:
    cfg = _cfg(dirs, "metacopy=on")
    order = protocol.decode_order(protocol.encode_order(protocol.Order(cfg)))
    assert order.config.metacopy is True
    sent = resident.config_from(fastmount.message(cfg))
    assert sent.metacopy is True
