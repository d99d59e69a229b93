"""The patches to pyfuse3 and libfuse (unionfs.server.compat): each is in force on a normal start,
and each check says so when its patch is silently bypassed.

A mount's daemon logs one INFO line naming the patches in force, or a WARNING naming the one
bypassed; the user-visible effect is checked beside it (hard links of a lower file share one
st_ino only with the st_ino patch; fallocate's modes and SEEK_DATA/SEEK_HOLE only with the shim).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import util

from unionfs.core.sysx import fallocate
from unionfs.server import compat

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
ALL_ACTIVE = "patched: libfuse shim, st_ino in replies, quick session loop, importlib.metadata stand-in"


@dataclass
class Served:
    mnt: Path
    lower: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path, need_fuse: None) -> Iterator[Callable[..., Served]]:
    """serve(prelude): mount a union in the foreground through ``unionfs.entry`` after running the
    Python *prelude* in the daemon's process; yields while mounted, unmounts after."""
    procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def start(prelude: str = "", foreground: bool = True) -> Served:
        lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
        for d in (lower, upper, work, mnt):
            d.mkdir(exist_ok=True)
        (lower / "a").write_bytes(b"x" * 65536)
        if not (lower / "b").exists():
            os.link(lower / "a", lower / "b")
        code = textwrap.dedent(prelude) + "\nfrom unionfs.entry import main\nmain()\n"
        log = tmp_path / "daemon.log"
        cmd = [sys.executable, "-c", code, "mount", *(["-f"] if foreground else []), "-o",
               f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        procs.append((mnt, proc))
        util.wait_for_mount(mnt, proc)
        os.stat(mnt)   # answered after INIT, when the daemon has made its report
        return Served(mnt, lower, log)

    yield start
    for mnt, proc in procs:
        assert util.umount(mnt, proc) == 0


def _hard_links_agree(s: Served) -> bool:
    return os.stat(s.mnt / "a").st_ino == os.stat(s.mnt / "b").st_ino


def _punch_hole(s: Served) -> int:
    """0, or the errno a hole punched through the union is refused with."""
    fd = os.open(s.mnt / "a", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return 0


def test_a_normal_start_reports_every_patch_in_force(serve: Callable[..., Served]) -> None:
    s = serve()
    assert _hard_links_agree(s)
    assert _punch_hole(s) == 0
    text = s.log_text()
    assert ALL_ACTIVE in text and f"pyfuse3 {compat.pyfuse3.__version__} on libfuse " in text, text
    assert "WARNING" not in text, text


def _default_log_after_umount(s: Served) -> str | None:
    """What the background daemon of *s* left in its default log (None: no log)."""
    from unionfs.server.statedir import key_for, state_dir

    subprocess.run([util.program("unionfs"), "umount", str(s.mnt)], check=True)  # waits for the daemon
    log = Path(state_dir()) / f"{key_for(str(s.mnt))}.log"
    if not log.exists():
        return None
    text = log.read_text()
    log.unlink()
    return text


def test_a_background_mount_keeps_no_log_for_its_start_up_report(serve: Callable[..., Served]) -> None:
    """The default log beside the pidfile is for warnings and errors: the INFO report leaves none."""
    s = serve(foreground=False)
    assert _hard_links_agree(s)
    assert _default_log_after_umount(s) is None


def test_a_background_mount_keeps_the_log_of_a_bypassed_patch(serve: Callable[..., Served]) -> None:
    s = serve("from unionfs.server import compat; compat._SHOWN_INO_OFFSET = None", foreground=False)
    assert not _hard_links_agree(s)
    text = _default_log_after_umount(s)
    assert text is not None and "WARNING patch bypassed: st_ino in replies" in text
    assert " INFO " not in text, text


def test_pyfuse3_imported_first_bypasses_the_shim_and_says_so(serve: Callable[..., Served]) -> None:
    s = serve("import pyfuse3")
    assert _punch_hole(s) == errno.EOPNOTSUPP
    text = s.log_text()
    assert "WARNING patch bypassed: libfuse shim: pyfuse3 was imported before unionfs.server.compat" in text
    assert ALL_ACTIVE not in text and "patched: st_ino in replies" in text, text


def test_an_unrecognised_reply_layout_bypasses_shown_ino_and_says_so(serve: Callable[..., Served]) -> None:
    s = serve("from unionfs.server import compat; compat._SHOWN_INO_OFFSET = None")
    assert not _hard_links_agree(s)
    text = s.log_text()
    assert "WARNING patch bypassed: st_ino in replies: pyfuse3's EntryAttributes layout not recognised" in text
    assert "patched: libfuse shim, quick session loop, importlib.metadata stand-in" in text, text


def test_an_unverified_version_warns_once_and_still_serves(serve: Callable[..., Served]) -> None:
    s = serve("from unionfs.server import compat\n"
              "compat.VERIFIED = {'pyfuse3': ('0.9',), 'libfuse': ('3.0', '3.1')}")
    assert _hard_links_agree(s) and _punch_hole(s) == 0
    warnings = [ln for ln in s.log_text().splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, warnings
    assert "unverified pyfuse3 " in warnings[0] and "(0.9.x verified) and libfuse " in warnings[0]
    assert "(3.0.x, 3.1.x verified)" in warnings[0]
    assert ALL_ACTIVE in s.log_text()


# -- each check on its own ---------------------------------------------------------------------------


def test_the_shim_check_names_the_entry_point_that_was_not_interposed() -> None:
    def shim(sessions: int, received: bool) -> object:
        return SimpleNamespace(sessions=lambda: sessions, received=lambda: received)

    assert compat._shim_problem(shim(1, True), None) is None
    assert "fuse_session_new" in str(compat._shim_problem(shim(0, False), None))
    assert "fuse_session_receive_buf" in str(compat._shim_problem(shim(1, False), None))
    assert compat._shim_problem(None, "not built (no module)") == "not built (no module)"


class _NotPyfuse3:
    """An object with an st_ino but not pyfuse3's reply layout."""
    __slots__ = ("st_ino", "padding")

    def __init__(self) -> None:
        self.padding = 0


def test_the_shown_ino_probe_finds_pyfuse3s_layout_and_no_other() -> None:
    assert compat._find_shown_ino_offset(compat.pyfuse3.EntryAttributes) == compat._SHOWN_INO_OFFSET
    assert compat._SHOWN_INO_OFFSET is not None
    assert compat._find_shown_ino_offset(_NotPyfuse3) is None


def test_set_shown_ino_changes_what_stat_shows_and_not_the_node_id() -> None:
    attr = compat.pyfuse3.EntryAttributes()
    attr.st_ino = 7
    compat.set_shown_ino(attr, 12345)
    assert attr.st_ino == 7
    assert compat._SHOWN_INO_OFFSET is not None
    assert ctypes.c_uint64.from_address(id(attr) + compat._SHOWN_INO_OFFSET).value == 12345


def _python(code: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd or ""), *sys.path]))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True, env=env).stdout


def test_pyfuse3_is_imported_without_importlib_metadata() -> None:
    """The stand-in answered pyfuse3's version (the installed one), the real module was not loaded,
    and afterwards importlib.metadata is the real module."""
    import importlib.metadata

    out = _python("""
        import sys
        from unionfs.server import compat
        print(compat.pyfuse3.__version__, 'importlib.metadata' in sys.modules, 'email' in sys.modules)
        print(compat._standin.problem('pyfuse3', compat.pyfuse3.__version__))
        import importlib.metadata as md
        print(md.version('pyfuse3'), md.distribution('pyfuse3').metadata['Name'])
        """)
    installed = importlib.metadata.version("pyfuse3")
    assert out.splitlines() == [f"{installed} False False", "None", f"{installed} pyfuse3"]


@pytest.mark.parametrize(("source", "problem"), [
    ("from importlib.metadata import version\n__version__ = version('fakefuse')\n", "None"),
    ("from importlib.metadata import version, distribution\n__version__ = version('fakefuse')\n",
     "fakefuse asked it for distribution: the real module was loaded"),
    ("__version__ = '1.2'\n", "fakefuse did not ask it for its version"),
    ("from importlib.metadata import version\n__version__ = version('fakefuse') + '.post1'\n",
     "no fakefuse-*.dist-info found beside fakefuse: its version is '1.2.post1'"),
], ids=["answered", "asked-for-more", "not-asked", "other-version"])
def test_the_stand_in_check_says_when_it_was_bypassed(tmp_path: Path, source: str, problem: str) -> None:
    (tmp_path / "fakefuse").mkdir()
    (tmp_path / "fakefuse" / "__init__.py").write_text(source)
    (tmp_path / "fakefuse-1.2.dist-info").mkdir()
    out = _python("""
        from unionfs.server import compat
        with compat._version_only() as record:
            import fakefuse
        print(record.problem('fakefuse', fakefuse.__version__))
        """, cwd=tmp_path)
    assert out.strip() == problem


@pytest.mark.daemon_log_ok("patch bypassed")
def test_the_report_lists_what_is_bypassed(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Outside a FUSE session the shim has not been called: the report says so, as it would for a
    daemon whose pyfuse3 bypassed it."""
    monkeypatch.setattr(compat, "_SHOWN_INO_OFFSET", None)
    with caplog.at_level("INFO", logger="unionfs.server.compat"):
        bypassed = compat.report()
    assert set(bypassed) >= {compat.SHIM, compat.SHOWN_INO}
    said = {r.getMessage() for r in caplog.records if r.levelname == "WARNING"}
    assert any(m.startswith("patch bypassed: st_ino in replies: ") for m in said), said
    assert any(m.startswith("patch bypassed: libfuse shim: ") for m in said), said


def test_libfuse_version_is_the_loaded_librarys() -> None:
    version = compat.libfuse_version()
    assert version.startswith("3."), version


def test_a_reply_the_kernel_no_longer_waits_for_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """pyfuse3 logs an error when the kernel refuses a reply with ENOENT (its request was
    interrupted, or the unmount ended the connection): not one for the daemon's log, as libfuse
    does not count it either.  Any other refused reply still is."""
    assert compat is not None   # (its import installs the filter)
    pyfuse3_log = logging.getLogger("pyfuse3")
    with caplog.at_level(logging.ERROR):
        pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", os.strerror(errno.ENOENT))
        pyfuse3_log.error("fuse_write(): fuse_reply_* failed with %s", os.strerror(errno.EINVAL))
    assert [r.getMessage() for r in caplog.records] == [
        f"fuse_write(): fuse_reply_* failed with {os.strerror(errno.EINVAL)}"]
