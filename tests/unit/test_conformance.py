"""The conformance oracle's own parts, without mounting anything (except where marked)."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from unionfs.conformance import layers as L
from unionfs.conformance.cli import conformance_command
from unionfs.conformance.layers import LayerEntry, Layers, LayerSpec, build_layers, random_layers
from unionfs.conformance.machine import Case, Failure, Trace, parse_layers, shrink
from unionfs.conformance.ops import Chooser, Op, Session, execute
from unionfs.conformance.report import parse_step, script
from unionfs.conformance.snapshot import diff, mtime_class, upper_tree, visible_tree


def test_random_layers_are_deterministic() -> None:
    a = random_layers(random.Random(5), 3)
    b = random_layers(random.Random(5), 3)
    assert a == b
    assert a != random_layers(random.Random(6), 3)
    assert {e.layer for e in a.entries} <= {0, 1, 2}


def test_chooser_is_deterministic_and_draws_every_operation() -> None:
    tree = {"": "d", "a": "f", "d": "d", "d/b": "l"}
    first = [Chooser(random.Random(1)).next(tree) for _ in range(1)]
    c1, c2 = Chooser(random.Random(1)), Chooser(random.Random(1))
    ops1 = [c1.next(tree) for _ in range(2000)]
    assert ops1 == [c2.next(tree) for _ in range(2000)]
    assert ops1[:1] == first
    assert {op.name for op in ops1} == set(Chooser(random.Random(0)).names)


def test_chooser_can_be_restricted() -> None:
    c = Chooser(random.Random(1), {"unlink", "mkdir"})
    assert {c.next({"": "d", "a": "f"}).name for _ in range(100)} == {"unlink", "mkdir"}


def test_step_code_round_trips() -> None:
    """The repro script's steps are op.code(); reading them back gives the same operations."""
    chooser = Chooser(random.Random(3))
    tree = {"": "d", "a": "f", "b": "d", "b/c": "f"}
    for _ in range(500):
        op = chooser.next(tree)
        assert parse_step(op.code()) == op


def test_executor_reports_errno_not_exceptions(tmp_path: Path) -> None:
    s = Session(str(tmp_path))
    assert execute(s, Op("unlink", ("missing",))).errno == 2
    assert execute(s, Op("mkdir", ("d", 0o755))).errno == 0
    assert execute(s, Op("open_", ("d/f", "O_WRONLY|O_CREAT|O_EXCL", 0o600, b"hello"))).errno == 0
    assert execute(s, Op("open_", ("d/f", "O_WRONLY|O_CREAT|O_EXCL", 0o600, b""))).errno == 17
    assert execute(s, Op("read", ("d/f",))).result == b"hello"
    assert execute(s, Op("rename", ("d/f", "g", "RENAME_NOREPLACE"))).errno == 0
    assert execute(s, Op("rename", ("g", "d", "RENAME_NOREPLACE"))).errno == 17
    assert execute(s, Op("rename", ("g", "d", "RENAME_EXCHANGE"))).errno == 0
    assert os.path.isdir(tmp_path / "g") and os.path.isfile(tmp_path / "d")
    assert execute(s, Op("fd_pread", (0, 0))).errno == 9  # nothing held in slot 0
    assert execute(s, Op("fd_open", (0, "d", "O_RDWR"))).errno == 0
    assert execute(s, Op("fd_pwrite", (0, 2, b"XY"))).result == 2
    assert execute(s, Op("fd_pread", (0, 0))).result == b"heXYo"
    s.close_all()
    os.mkfifo(tmp_path / "p")
    # opening a fifo never blocks the oracle
    assert execute(s, Op("append", ("p", b"x"))).errno == 6  # ENXIO: no reader
    assert execute(s, Op("readdir_while", ("g", "create", "n"))) == execute(
        s, Op("readdir_while", ("g", "unlink", "n")))


@pytest.mark.parametrize("dialect", ["overlay", "aufs"])
def test_builder_writes_whiteouts_in_the_dialect(tmp_path: Path, dialect: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("building overlay whiteouts needs root (mknod, trusted.* xattrs)")
    spec = LayerSpec(2, [
        LayerEntry(0, "d", "opaque", 0o755),
        LayerEntry(0, "f", "whiteout"),
        LayerEntry(1, "f", "file", 0o644, data=b"below"),
        LayerEntry(1, "d", "dir", 0o700),
        LayerEntry(1, "d/x", "file", 0o600),
    ])
    roots = build_layers(spec, str(tmp_path), dialect)
    if dialect == "aufs":
        assert (Path(roots[0]) / ".wh.f").is_file()
        assert (Path(roots[0]) / "d" / ".wh..wh..opq").is_file()
    else:
        st = os.lstat(Path(roots[0]) / "f")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(Path(roots[0]) / "d", "trusted.overlay.opaque") == b"y"
    # either way the normalised view of the top layer is the same
    top = upper_tree(roots[0])
    assert top.entries["f"] == {"type": "whiteout"}
    assert top.entries["d"]["opaque"] is True


def test_stale_whiteouts_are_not_built(tmp_path: Path) -> None:
    """A whiteout in a directory no layer below has would show up in kernel readdir; skip it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spec = LayerSpec(2, [LayerEntry(0, "d/w", "whiteout"), LayerEntry(0, "top", "whiteout")])
    roots = build_layers(spec, str(tmp_path), "overlay")
    assert not os.path.lexists(Path(roots[0]) / "d" / "w")
    assert os.path.lexists(Path(roots[0]) / "top")  # the root is always merged


def test_upper_normalisation_ignores_private_bookkeeping(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    kernel, ours = tmp_path / "k", tmp_path / "u"
    for root in (kernel, ours):
        (root / "d").mkdir(parents=True)
        (root / "f").write_bytes(b"data")
        os.setxattr(root / "f", "user.keep", b"1")
        os.utime(root, ns=(L.synthetic_time("."),) * 2)
        for p in (root / "d", root / "f"):
            os.utime(p, ns=(L.synthetic_time("x"),) * 2)
    os.setxattr(kernel / "f", "trusted.overlay.origin", b"\x00junk")
    os.setxattr(kernel / "d", "trusted.overlay.impure", b"y")
    os.mknod(kernel / "gone", stat.S_IFCHR, 0)
    os.link(kernel / "gone", kernel / "gone2")  # the kernel shares one whiteout inode
    (ours / ".wh.gone").touch()
    (ours / ".wh.gone2").touch()
    (ours / ".wh..wh.plnk").mkdir()  # AUFS private dir at the branch root
    for root in (kernel, ours):
        os.utime(root, ns=(L.synthetic_time("."),) * 2)
    assert diff(upper_tree(str(kernel)), upper_tree(str(ours))) == []
    os.setxattr(ours / "d", "user.overlay.opaque", b"y")
    assert diff(upper_tree(str(kernel)), upper_tree(str(ours))) == ["/d: opaque A=False B=True"]


def test_mtime_is_exact_when_synthetic_and_now_otherwise() -> None:
    assert mtime_class(L.synthetic_time("a")) == L.synthetic_time("a")
    assert mtime_class(1_700_000_000 * 10**9) == mtime_class(1_800_000_000 * 10**9) == "now"


def test_visible_tree_records_what_users_see(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    os.link(tmp_path / "f", tmp_path / "h")
    os.symlink("f", tmp_path / "l")
    os.setxattr(tmp_path / "f", "user.a", b"v")
    snap = visible_tree(str(tmp_path))
    assert snap.entries["f"]["nlink"] == 2
    assert snap.entries["f"]["content"].startswith("sha256:")
    assert snap.entries["f"]["xattrs"] == {"user.a": b"v"}
    assert snap.entries["l"]["target"] == "f"
    assert snap.links == [("f", "h")]


def test_parse_layers() -> None:
    assert parse_layers("2") == (2, 2)
    assert parse_layers("1-3") == (1, 3)
    with pytest.raises(ValueError):
        parse_layers("0")


class FakeRunner:
    """Fails whenever both marker steps are present, in order, and the marker entry exists."""

    def __init__(self) -> None:
        self.runs = 0

    def replay(self, case: Case) -> tuple[Trace, Failure | None]:
        self.runs += 1
        names = [op.args[0] if op.args else None for op in case.ops]
        has_entry = any(e.path == "needed" for e in case.spec.entries)
        if has_entry and "first" in names and "second" in names[names.index("first"):]:
            step = names.index("second", names.index("first"))
            return Trace(), Failure(step, "outcome", ["marker"])
        return Trace(), None


def test_shrink_finds_the_minimal_case() -> None:
    rng = random.Random(0)
    noise = [Op("unlink", (f"n{i}",)) for i in range(40)]
    ops = noise[:17] + [Op("unlink", ("first",))] + noise[17:30] + [Op("unlink", ("second",))] + noise[30:]
    entries = [LayerEntry(rng.randrange(3), f"e{i}", "file") for i in range(10)]
    entries.insert(4, LayerEntry(2, "needed", "file", 0o600, (1000, 1000), b"data" * 10, xattrs=(("user.x", b"1"),)))
    runner = FakeRunner()
    result = shrink(runner, Case(LayerSpec(3, entries), ops), Failure(31, "outcome", []), Trace())  # type: ignore[arg-type]
    assert result.case.ops == [Op("unlink", ("first",)), Op("unlink", ("second",))]
    assert result.case.spec == LayerSpec(1, [LayerEntry(0, "needed", "file", 0o644, (0, 0), b"x")])
    assert result.runs < 200


def test_script_is_valid_python() -> None:
    spec = random_layers(random.Random(2), 2)
    ops = [Chooser(random.Random(2)).next({"": "d", "a": "f"}) for _ in range(30)]
    text = script(Case(spec, ops), Failure(3, "tree", ['/a: mode A="0o644" B="0o600"']), impl_a="kernel",
                  impl_b="unionfs", whiteout="aufs", lower_whiteout=None, fault=None, provenance="test")
    compile(text, "repro.py", "exec")
    namespace: dict[str, object] = {"__name__": "not_main"}
    exec(text, namespace)
    assert [parse_step(s) for s in namespace["STEPS"]] == ops  # type: ignore[attr-defined]
    assert namespace["N_LAYERS"] == 2


def test_layer_code_replays_the_spec(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spec = random_layers(random.Random(11), 3)
    a = build_layers(spec, str(tmp_path / "a"), "overlay") if (tmp_path / "a").mkdir() is None else None
    namespace: dict[str, object] = {}
    exec("from unionfs.conformance.layers import *\ndef layers(L):\n"
         + "\n".join("    " + line for line in spec.code().splitlines()), namespace)
    (tmp_path / "b").mkdir()
    roots = [str(tmp_path / "b" / f"l{i}") for i in range(3)]
    for r in roots:
        os.mkdir(r)
    namespace["layers"](Layers(roots, "overlay"))  # type: ignore[operator]
    assert a is not None
    for ra, rb in zip(a, roots, strict=True):
        assert diff(upper_tree(ra), upper_tree(rb)) == []


def test_cli_help_and_summary_line() -> None:
    runner = CliRunner()
    result = runner.invoke(conformance_command, ["--help"])
    assert result.exit_code == 0
    assert "--whiteout" in result.output and "Example:" in result.output
    result = runner.invoke(conformance_command, ["--layers", "0"])
    assert result.exit_code == 2


def test_inode_stability_is_compared_as_a_set_of_paths() -> None:
    from unionfs.conformance.machine import _touched
    from unionfs.conformance.snapshot import Snapshot, ino_changes

    before = Snapshot(inos={"": 1, "d": 2, "d/f": 3, "g": 4})
    after = Snapshot(inos={"": 1, "d": 9, "d/f": 8, "g": 4, "new": 5})
    assert ino_changes(before, after, ()) == {"d", "d/f"}
    assert ino_changes(before, after, ("d",)) == set()  # the step named d: anything may happen below
    assert ino_changes(before, after, ("d/f",)) == {"d"}  # a parent's number must survive copy-up
    assert _touched(Op("rename", ("a", "b/c", "RENAME_NOREPLACE"))) == ("a", "b/c")
    assert _touched(Op("setxattr", ("a", "user.x", b"", ""))) == ("a",)
    assert _touched(Op("open_", ("a", "O_RDONLY", 0o644, b""))) == ("a",)
    assert _touched(Op("symlink", ("target", "l"))) == ("l",)
    assert _touched(Op("fd_open", (0, "f", "O_RDWR"))) == ("f",)
    assert _touched(Op("remount")) == ()
