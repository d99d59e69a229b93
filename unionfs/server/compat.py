"""Every patch unionfs makes to third-party code (pyfuse3 and libfuse), in one module.

Import pyfuse3 in the server only after this module (``from . import compat`` first): two of the
patches must be in place before pyfuse3 is loaded.

The patches (docs/architecture.md, "Patches to third-party code", says what upstream would need for
each to go away):

- **The libfuse shim** (``_fuse_shim.c``): fallocate(2) and lseek(2) (SEEK_DATA, SEEK_HOLE)
  handlers, kernel-cached directory listings (cache_readdir, no OPENDIR at all where the kernel
  allows), modes of new objects without the umask applied (FUSE_CAP_DONT_MASK, so that a default
  ACL can replace it), letting go of the branches the moment the session ends, and FUSE
  passthrough (the INIT flag, backing files, OPEN and CREATE replies naming one).  It works by
  being the ``fuse_session_new`` and ``fuse_session_receive_buf`` that pyfuse3 binds to, so it is
  loaded here, into the global symbol scope, before pyfuse3 is imported.
- **st_ino in replies** (`set_shown_ino`): pyfuse3 sets a reply's node id and the st_ino the
  kernel shows from one field; the second is written directly into pyfuse3's reply object, at an
  offset found by probing (`_find_shown_ino_offset`), so that a lower file's hard links show one
  inode number as on overlayfs while each name keeps its own node.  Knowing that offset, the shim
  also fills a whole reply's attributes in one call (`attr_builder`), checked by reading a probe
  back through pyfuse3's properties.
- **a quicker session loop** (`quicken_session_loop`): pyfuse3's loop takes a trio lock and waits
  for trio's epoll to say /dev/fuse is readable before every read (a quarter of what a request
  costs the server); a stand-in for its ``_wait_fuse_readable`` asks the shim (poll(2)) first and only waits
  through trio when nothing is there, or after a run of requests, so other tasks get their turn.
  The shim makes a read that finds nothing return EINTR, so a read can never block the loop.
  While requests come close together, the loop waits for the next one for up to `SPIN_US` by
  polling in the shim, the GIL let go, before it sleeps in trio's epoll: waking a CPU that went
  idle costs more than a request (docs/performance.md, "Waking up").
- **importlib.metadata stand-in** (`_version_only`): pyfuse3 reads its ``__version__`` through
  importlib.metadata as it is imported, 12-19 ms of every server's start-up; a stand-in answers
  version() alone.

Each patch is checked where it can be seen to work: the shim by its own record of having been
called, the st_ino offset by the probe finding exactly one, the stand-in by having answered
pyfuse3's version.  `report()`, called when the kernel's INIT request has come through the session
loop, logs one INFO line with the versions and the patches in force, or a WARNING for each one
bypassed (the union then serves without what it gives), and a WARNING when pyfuse3 or libfuse is
not a version listed in `VERIFIED`.

Attributes:
    pyfuse3: the pyfuse3 module, imported behind the patches.
    VERIFIED: the pyfuse3 and libfuse versions (major.minor) the patches were verified on.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


class _AnsweredTooLate(logging.Filter):
    """pyfuse3 logs an error when the kernel refuses a reply with ENOENT: a request no longer
    waited for (its caller was interrupted, or the unmount ended the connection, a RELEASE queued
    just before it say).  libfuse does not count that as an error; neither do we."""

    GONE = os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.endswith("fuse_reply_* failed with %s")
                    and isinstance(record.args, tuple) and record.args[:1] == (self.GONE,))


logging.getLogger("pyfuse3").addFilter(_AnsweredTooLate())

VERIFIED = {"pyfuse3": ("3.5",), "libfuse": ("3.14",)}

SHIM = "libfuse shim"
SHOWN_INO = "st_ino in replies"
STANDIN = "importlib.metadata stand-in"
QUICK_LOOP = "quick session loop"
_WITHOUT_SHIM = ("no fallocate, no SEEK_DATA/SEEK_HOLE, no kernel-cached listings, umask applied by "
                 "the kernel")


# ------------------------------------------------------------------ the libfuse shim

def _load_shim() -> tuple[ModuleType | None, str | None]:
    """The shim, loaded into the global symbol scope; or None and why not."""
    if "pyfuse3" in sys.modules:
        return None, "pyfuse3 was imported before unionfs.server.compat"
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from unionfs.server import _fuse_shim
    except ImportError as e:
        return None, f"not built ({e})"
    finally:
        sys.setdlopenflags(flags)
    return _fuse_shim, None


def _shim_problem(shim: ModuleType | None, not_loaded: str | None) -> str | None:
    """Why *shim* is not in force in this server's session (None: it is).  Valid once a request has
    come through the session loop."""
    if shim is None:
        return not_loaded or "not loaded"
    if not shim.sessions():
        return "pyfuse3's fuse_session_new did not go through it"
    if not shim.received():
        return "pyfuse3's fuse_session_receive_buf did not go through it"
    return None


def configure_session(cache_dirs: bool, fallocate: Callable[[int, int, int, int, int, int], int | None],
                      lseek: Callable[[int, int, int, int], int], passthrough: bool = False,
                      writeback: bool = False) -> None:
    """What the next FUSE session gets from the shim: these fallocate and lseek handlers, modes
    without the umask applied, kernel-cached listings when *cache_dirs*, FUSE passthrough asked for
    when *passthrough* and the kernel offers it (*writeback*: the kernel's writeback cache is asked
    for, which excludes it).  Nothing without the shim."""
    global _passthrough_wanted, _writeback
    _passthrough_wanted, _writeback = passthrough, writeback
    if _shim is not None:
        _shim.configure(cache_dirs=cache_dirs, fallocate=fallocate, stateless_dirs=True,
                        dont_mask=True, lseek=lseek, passthrough=passthrough)


_passthrough_wanted = False
_writeback = False


def _passthrough_state() -> str:
    """The start-up report's word on FUSE passthrough."""
    if _writeback:
        return "off (the writeback cache is on)"
    if not _passthrough_wanted:
        return "off (passthrough=off)"
    if _shim is None or _shim_problem(_shim, _shim_not_loaded) is not None:
        return "off (no libfuse shim)"
    if not passthrough_offered():
        return "off (the kernel does not offer it: Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
    return "asked (open files in the writable branch are read and written by the kernel)"


def passthrough_asked() -> bool:
    """Whether this session asks the kernel for FUSE passthrough (valid once INIT has been read)."""
    return _shim is not None and bool(_shim.passthrough()[1])


def passthrough_offered() -> bool:
    """Whether the kernel offered FUSE passthrough at INIT (it does from Linux 6.9 when built with it)."""
    return _shim is not None and bool(_shim.passthrough()[0])


#: The st_mode of a SETATTR that truncates for a caller without CAP_FSETID, when the session agreed
#: FUSE_HANDLE_KILLPRIV_V2 (the shim's KILL_SUIDGID_MARK: no file has this type).
KILL_SUIDGID_MARK = 0o170000


def killpriv() -> bool:
    """Whether this session agreed FUSE_HANDLE_KILLPRIV_V2 (valid once INIT has been answered): the
    kernel then leaves clearing set-id bits on write, truncate and chown to the server."""
    return _shim is not None and _shim.killpriv()


def backing_open(fd: int) -> int:
    """Register the open file *fd* as a backing file of this session: its id, or the errno negated
    (EPERM: passthrough not agreed, or the server lacks CAP_SYS_ADMIN in the initial user namespace;
    ELOOP: *fd*'s filesystem is stacked too deep)."""
    return _shim.backing_open(fd) if _shim is not None else -errno.EPERM


def backing_close(backing_id: int) -> int:
    """Drop a backing id (files open on it keep their backing file): 0, or the errno negated."""
    return _shim.backing_close(backing_id) if _shim is not None else -errno.EBADF


def no_capability(node_id: int, none: bool) -> None:
    """Whether node *node_id* has no security.capability (the shim then answers the kernel's
    question at every write itself) or may have one (the server is asked again)."""
    if _shim is not None:
        _shim.no_capability(node_id, none)


def pass_through(fh: int, backing_id: int) -> None:
    """The OPEN or CREATE reply about to be sent for file handle *fh* (in the same step: no await
    in between) tells the kernel to read and write backing file *backing_id* itself."""
    assert _shim is not None, "backing ids come from the shim only"
    _shim.pass_through(fh, backing_id)


def reply_err(req: int, err: int) -> None:
    """Answer a fallocate request that its handler took (returned None for)."""
    assert _shim is not None, "fallocate requests come through the shim only"
    _shim.reply_err(req, err)


def release_on_session_end(devices: Sequence[int], keep: Sequence[int]) -> None:
    """Have the shim point every fd on *devices* (but 0-2 and *keep*) at a sink of its own as soon
    as the session loop finds the session ended.  ValueError: more filesystems than it keeps."""
    if _shim is not None:
        _shim.release_on_session_end(devices, keep)


def let_go_at_session_end(lock_fd: int, dir_fd: int, names: Sequence[tuple[str, int, int, int]],
                          nice: int | None = None, work: tuple[int, bytes] | None = None,
                          pause_us: int = 0) -> bool:
    """Have the shim let go of a mount the moment the kernel ends its session, once the branches are
    let go of (`release_on_session_end`) and nothing on their filesystems is left: remove each of
    *names* (name, st_dev, st_ino, fd) from the directory *dir_fd* while it is still that file (with
    an fd other than -1, a log: only while it is empty and no other daemon holds it), unlock the
    pidfile *lock_fd* (``flock``), which `unionfs umount` waits for, and then go on at priority
    *nice* (None: as it is, after a pause of *pause_us* microseconds). *work* (an fd and a name: an
    AUFS-style work dir in the top branch) is removed first, if empty, and the fd let go of with the
    branches. *lock_fd* -1: none of it (the session's end leaves it all to the daemon). Whether the
    shim can."""
    if _shim is None or not hasattr(_shim, "let_go_at_session_end"):
        return False
    given = [(os.fsencode(name), dev, ino, fd) for name, dev, ino, fd in names]
    work_fd, work_name = work if work is not None else (-1, b"")
    _shim.let_go_at_session_end(lock_fd, dir_fd, given, -100 if nice is None else nice, work_fd, work_name,
                                pause_us)
    return lock_fd >= 0


def let_go_early() -> tuple[bool, bool, bool]:
    """What the last session's end did in the shim (`let_go_at_session_end`): whether it let go of
    the mount, whether it removed the work dir (the top branch's fd is then no longer one), and
    whether the kernel ended the session (the mount is gone, even if a signal came meanwhile)."""
    if _shim is None or not hasattr(_shim, "let_go_early"):
        return False, False, False
    done, dropped, by_kernel = _shim.let_go_early()
    return bool(done), bool(dropped), bool(by_kernel)


def session_exited() -> bool:
    """Whether the session made through the shim last has ended (False without the shim)."""
    return _shim is not None and _shim.session_exited()


QUICK_RUN = 32
"""Requests served in a row without trio's wait (the loop then lets other tasks run once)."""

SPIN_US = 50
"""How long the quick loop waits for the next request without sleeping (UNIONFS_SPIN_US; 0: never)."""

CLOSE_US = 500
"""Requests that came within this long of the server's wait for them are close together: the loop
spins for the next one (a caller that sends requests one after the other: a walk, an untar)."""


_before_next_read: list[Callable[[], None]] = []


def answer_init(timeout_ms: int = 1000) -> bool:
    """Answer the session's INIT request now, before the session loop runs (the mount exists
    already: a resident server's worker); whether it was answered (False without the shim)."""
    answer = getattr(_shim, "answer_init", None)
    return bool(answer is not None and answer(timeout_ms))


def before_next_read(fn: Callable[[], None]) -> bool:
    """Have the quick session loop call *fn* before it reads the next request, that is once the
    reply to the request being served has gone out (the INIT reply: the kernel sets the mount's
    read-ahead from it).  False, and nothing done, when the quick loop is not in place."""
    quick = _quick_in_place(pyfuse3)
    if quick:
        _before_next_read.append(fn)
    return quick


def _quick_in_place(pyfuse3: ModuleType) -> bool:
    """Whether pyfuse3's session loop waits through the stand-in (`quicken_session_loop`)."""
    return bool(getattr(getattr(pyfuse3, "_wait_fuse_readable", None), "quick", False))


SPIN_US_MAX = 1000


def _spin_wanted() -> int:
    """`SPIN_US`, or UNIONFS_SPIN_US (in the serving process's environment: a resident server's),
    at most `SPIN_US_MAX`; 0 with one CPU, where polling only keeps the caller from running."""
    try:
        us = int(os.environ.get("UNIONFS_SPIN_US", SPIN_US))
    except ValueError:
        us = SPIN_US
    return min(max(us, 0), SPIN_US_MAX) if len(os.sched_getaffinity(0)) > 1 else 0


def _quick_wanted() -> bool:
    # UNIONFS_QUICK_LOOP=0 leaves pyfuse3's loop as it is: for measuring what the stand-in gives.
    return os.environ.get("UNIONFS_QUICK_LOOP", "1") != "0"


_pyfuse3_wait: Any = None   # pyfuse3's own _wait_fuse_readable, once replaced


def quicken_session_loop(pyfuse3: ModuleType) -> bool:
    """Put the stand-in for pyfuse3's ``_wait_fuse_readable`` in place, for the session made by
    ``pyfuse3.init`` (call it after that, before ``pyfuse3.main``).  False (nothing changed) without
    the shim, when pyfuse3 has no such function to replace, or with UNIONFS_QUICK_LOOP=0."""
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    if not _quick_wanted():
        return False
    if _shim is None or original is None:
        return _quick_in_place(pyfuse3)
    # Made anew for each session (a resident server's worker serves one after another): the fd,
    # the guarded reads and the loop's state are the session's.
    global _pyfuse3_wait
    _before_next_read.clear()
    if not _quick_in_place(pyfuse3):
        _pyfuse3_wait = original
    fd = _shim.guard_reads()
    if fd < 0:
        if _pyfuse3_wait is not None:   # not the last session's stand-in
            pyfuse3._wait_fuse_readable = _pyfuse3_wait  # type: ignore[attr-defined]
        return False
    waiting, exited = _shim.request_waiting, _shim.session_exited
    polls = hasattr(_shim, "spin_for_request")   # (not a shim built before it)
    spin_for_request: Callable[[int], bool] = _shim.spin_for_request if polls else lambda us: False
    spin = _spin_wanted() if polls else 0
    close = spin > 0  # the last request came soon after the wait for it began (a new mount's
    # first requests come one after the other: the kernel's INIT, then its caller's first calls)
    serving: set[object] = set()   # session tasks that read a request and have not come back
    monotonic_ns, current_task = time.monotonic_ns, trio.lowlevel.current_task
    wait_readable = trio.lowlevel.wait_readable
    run = 0
    in_wait = False
    turn = trio.lowlevel.ParkingLot()

    async def _wait_fuse_readable() -> bool:
        # pyfuse3's _session_loop reads right after this returns True, with no await in between;
        # a request is waiting now, or the shim makes that read return EINTR.
        nonlocal run, in_wait, close
        task = current_task()
        serving.discard(task)
        while _before_next_read:
            _before_next_read.pop(0)()
        if run < QUICK_RUN and waiting():
            run += 1
            serving.add(task)
            return True
        # Not while another task's request waits on something (a worker thread's big copy or
        # fsync): its caller sends nothing meanwhile, and trio must see the thread finish.
        if close and not serving and run < QUICK_RUN and spin_for_request(spin):
            run += 1
            serving.add(task)
            return True
        run = 0
        # pyfuse3's own wait takes a trio lock (one more pass of trio's scheduler) so that one task
        # at a time waits for the fd; a flag and a parking lot do that here.  (pyfuse3 then sees no
        # task waiting and starts more, up to its max_tasks: each parks here, which costs nothing.)
        while in_wait:
            await turn.park()
        if exited():
            turn.unpark()
            return False
        in_wait = True
        began = monotonic_ns()
        try:
            await wait_readable(fd)
        except trio.ClosedResourceError:
            return False
        finally:
            in_wait = False
            turn.unpark()
        close = spin > 0 and monotonic_ns() - began < CLOSE_US * 1000
        serving.add(task)
        return True

    _wait_fuse_readable.quick = True  # type: ignore[attr-defined]
    pyfuse3._wait_fuse_readable = _wait_fuse_readable  # type: ignore[attr-defined]
    return True


@functools.cache
def libfuse_version() -> str:
    """The version of the libfuse pyfuse3 runs on, as libfuse says (``fuse_pkgversion()``): asked
    once per process (a reused worker's start-up report comes with each mount's INIT)."""
    try:
        lib = ctypes.CDLL("libfuse3.so.3", mode=os.RTLD_NOW | os.RTLD_NOLOAD)
        pkgversion = lib.fuse_pkgversion
    except (OSError, AttributeError):
        return "unknown"
    pkgversion.restype = ctypes.c_char_p
    pkgversion.argtypes = []
    answer = pkgversion()
    return answer.decode(errors="replace") if isinstance(answer, bytes) else "unknown"


# ------------------------------------------------------------------ importlib.metadata stand-in

class _NotFound(ModuleNotFoundError):
    """The stand-in's PackageNotFoundError (the real one is a ModuleNotFoundError too)."""


class _StandIn:
    """What the stand-in was asked while it stood in.

    Attributes:
        preloaded: importlib.metadata was loaded before: no stand-in was needed.
        answered: the versions it answered, by distribution name.
        fell_back: the first attribute it could not answer (the real module was loaded for it).
    """

    def __init__(self) -> None:
        self.preloaded = False
        self.answered: dict[str, str | None] = {}
        self.fell_back: str | None = None

    def problem(self, name: str, version: str) -> str | None:
        """Why the stand-in did not spare *name*'s import the real importlib.metadata, which gave it
        *version* (None: it did, or it was not needed)."""
        if self.preloaded:
            return None
        if self.fell_back is not None:
            return f"{name} asked it for {self.fell_back}: the real module was loaded"
        if name not in self.answered:
            return f"{name} did not ask it for its version"
        if self.answered[name] != version:
            return f"no {name}-*.dist-info found beside {name}: its version is {version!r}"
        return None


def _dist_info_version(name: str) -> str:
    """The version of the installed package *name*, read off the ``NAME-VERSION.dist-info``
    directory beside it; _NotFound when there is none (a source tree, an egg).

    Enough for pyfuse3, whose distribution and package have one name; unlike importlib.metadata
    it does not normalise distribution names.
    """
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    locations: list[str] = list(getattr(spec, "submodule_search_locations", None) or [])
    prefix = name + "-"
    for location in locations:
        site = os.path.dirname(os.path.abspath(location))
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(prefix) and entry.endswith(".dist-info"):
                return entry[len(prefix) : -len(".dist-info")]
    raise _NotFound(name)


def _real_metadata(attr: str) -> object:
    """Any other attribute of the stand-in: the real importlib.metadata takes its place, and answers.

    Dunder names are not looked up (the import system probes ``__path__`` and the like)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    if "importlib.metadata" in sys.modules and sys.modules["importlib.metadata"].__dict__.get(
        "__getattr__"
    ) is _real_metadata:
        del sys.modules["importlib.metadata"]
    if _standing_in is not None and _standing_in.fell_back is None:
        _standing_in.fell_back = attr
    import importlib.metadata

    return getattr(importlib.metadata, attr)


_standing_in: _StandIn | None = None


@contextlib.contextmanager
def _version_only() -> Iterator[_StandIn]:
    """While the block runs (pyfuse3 being imported), a stand-in for importlib.metadata that answers
    version() itself; yields the record of what it was asked.

    Loading importlib.metadata (with the email package it parses METADATA with) and searching
    sys.path for the distribution costs 12-19 ms, a tenth of the FUSE server's start-up, for a
    string unionfs never reads.  trio is imported before, so what loads meanwhile is pyfuse3's own
    modules and the standard library's; should one of them ask the stand-in for anything but
    version(), the real module is loaded and answers.  The stand-in is gone from sys.modules
    afterwards: a later ``import importlib.metadata`` gets the real one.  When the real one is
    loaded already, it is used.
    """
    global _standing_in
    record = _StandIn()
    if "importlib.metadata" in sys.modules:
        record.preloaded = True
        yield record
        return

    def version(name: str) -> str:
        try:
            found = _dist_info_version(name)
        except _NotFound:
            record.answered[name] = None
            raise
        record.answered[name] = found
        return found

    standin = ModuleType("importlib.metadata", "unionfs.server.compat's stand-in: version() alone")
    vars(standin).update(PackageNotFoundError=_NotFound, version=version, __getattr__=_real_metadata)
    sys.modules["importlib.metadata"] = standin
    _standing_in = record
    try:
        yield record
    finally:
        _standing_in = None
        if sys.modules.get("importlib.metadata") is standin:
            del sys.modules["importlib.metadata"]
        import importlib

        if vars(importlib).get("metadata") is standin:
            del importlib.metadata


# ------------------------------------------------------------------ st_ino in replies

def _find_shown_ino_offset(cls: type) -> int | None:
    """Where, inside a *cls* (pyfuse3's EntryAttributes), the st_ino of the reply's stat lives;
    None unless the probe finds exactly one such place.

    The kernel shows ``attr.ino`` as st_ino and uses the entry's node id as identity; pyfuse3 sets
    both from `st_ino`.  To show a lower file's real inode number (hard links of it then agree, as on
    overlayfs) while giving each name its own node, we write ``attr.st_ino`` directly.  The offset is
    found by probing, and verified; if the layout is not the one expected, st_ino stays the node id.
    """
    marker, other = 0x5A5A_1234_ABCD_7777, 0x0123_4567_89AB_CDEF
    probe = cls()
    probe.st_ino = marker
    raw = ctypes.string_at(id(probe), sys.getsizeof(probe))
    hits = [i for i in range(0, len(raw) - 7, 8) if struct.unpack_from("=Q", raw, i)[0] == marker]
    # fuse_entry_param: ino, generation, then struct stat {st_dev, st_ino, ...}
    if len(hits) != 2 or hits[1] - hits[0] != 24:
        return None
    ctypes.c_uint64.from_address(id(probe) + hits[1]).value = other
    raw = ctypes.string_at(id(probe), sys.getsizeof(probe))
    if struct.unpack_from("=Q", raw, hits[0])[0] != marker or probe.st_ino != marker:
        return None
    if struct.unpack_from("=Q", raw, hits[1])[0] != other:
        return None
    return hits[1]


def set_shown_ino(attr: object, ino: int) -> None:
    """Make stat show *ino* for *attr* (a pyfuse3 EntryAttributes), whose node id stays
    ``attr.st_ino``.  Nothing when pyfuse3's layout was not recognised."""
    if _SHOWN_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(attr) + _SHOWN_INO_OFFSET).value = ino


#: What builds a reply's attributes in C: (packed stat, node id, shown st_ino, st_nlink or -1 for
#: the stat's own, timeout) -> EntryAttributes.
AttrBuilder = Callable[[bytes, int, int, int, float], "pyfuse3.EntryAttributes"]


def attr_builder() -> AttrBuilder | None:
    """The shim's `entry_attributes`, which fills a reply's fuse_entry_param in one call instead
    of one pyfuse3 property per field; None (set the properties) without the shim, without the
    st_ino offset, or unless a probe built through it reads back through pyfuse3's own properties
    as built."""
    if _shim is None or _SHOWN_INO_OFFSET is None or not hasattr(_shim, "entry_attributes"):
        return None
    from unionfs.core.attrs import Stat

    fields = (2049, 77, 3, 0x0102, 123_456_789, 241, 4096, -1_500_000_001, 1_700_000_000_123_456_789,
              5, 0o104755, 1000, 100)
    packed = Stat(struct.pack("=QQIQqqIqqqIII", *fields))
    try:
        _shim.attr_layout(pyfuse3.EntryAttributes, _SHOWN_INO_OFFSET)
        a = _shim.entry_attributes(packed, 7, 9, -1, 2.5)
        merged = _shim.entry_attributes(packed, 7, 7, 1, 0.0)
    except (TypeError, ValueError, RuntimeError) as e:
        log.debug("reply attributes in C: %s", e)
        return None
    _dev, _ino, nlink, rdev, size, blocks, blksize, atime, mtime, ctime, mode, uid, gid = fields
    want = (7, 0, nlink, rdev, size, blocks, blksize, atime, mtime, ctime, mode, uid, gid, 2.5, 2.5)
    got = (a.st_ino, a.generation, a.st_nlink, a.st_rdev, a.st_size, a.st_blocks, a.st_blksize,
           a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns, a.st_mode, a.st_uid, a.st_gid,
           a.attr_timeout, a.entry_timeout)
    shown = ctypes.c_uint64.from_address(id(a) + _SHOWN_INO_OFFSET).value
    if got != want or shown != 9 or merged.st_nlink != 1 or merged.entry_timeout != 0.0:
        log.debug("reply attributes in C: read back %r, st_ino %d: not as built", got, shown)
        return None
    builder: AttrBuilder = _shim.entry_attributes
    return builder


# ------------------------------------------------------------------ the start-up report

def _unverified(name: str, version: str) -> str | None:
    verified = VERIFIED[name]
    if any(version == v or version.startswith(v + ".") for v in verified):
        return None
    return f"{name} {version} ({', '.join(v + '.x' for v in verified)} verified)"


def problems() -> dict[str, str]:
    """The patches not in force in this process, with why (valid once a FUSE session has read a
    request)."""
    found = {}
    shim = _shim_problem(_shim, _shim_not_loaded)
    if shim is not None:
        found[SHIM] = f"{shim}: {_WITHOUT_SHIM}"
    if _SHOWN_INO_OFFSET is None:
        found[SHOWN_INO] = ("pyfuse3's EntryAttributes layout not recognised: hard links of a lower "
                            "file show one inode number per name")
    if _quick_wanted() and not _quick_in_place(pyfuse3):
        found[QUICK_LOOP] = ("not in place (no shim, or pyfuse3 without _wait_fuse_readable): each "
                             "request waits through trio's epoll")
    standin = _standin.problem("pyfuse3", pyfuse3.__version__)
    if standin is not None:
        found[STANDIN] = f"{standin} (12-19 ms more per start-up)"
    return found


def report() -> dict[str, str]:
    """Log the start-up report (see the module's docstring); return `problems()`.

    Call it once the session has read a request (the server's init handler)."""
    versions = {"pyfuse3": pyfuse3.__version__, "libfuse": libfuse_version()}
    unverified = [u for u in (_unverified(k, v) for k, v in versions.items()) if u is not None]
    bypassed = problems()
    if unverified:
        log.warning("unverified %s: the patches to them are used as far as their self-checks pass",
                    " and ".join(unverified))
    for name, why in bypassed.items():
        log.warning("patch bypassed: %s: %s", name, why)
    active = [name for name in (SHIM, SHOWN_INO, QUICK_LOOP, STANDIN) if name not in bypassed]
    if _standin.preloaded:
        active.remove(STANDIN)
    if _shim is not None and SHIM not in bypassed and not _shim.dont_mask():
        log.warning("the kernel applies the umask itself: new objects under a default ACL get both")
    log.info("pyfuse3 %s on libfuse %s, patched: %s; FUSE passthrough %s", versions["pyfuse3"],
             versions["libfuse"], ", ".join(active) or "nothing", _passthrough_state())
    return bypassed


_shim, _shim_not_loaded = _load_shim()

import trio  # noqa: E402, F401 - pyfuse3 imports it: outside the stand-in's window

with _version_only() as _standin:
    import pyfuse3  # noqa: E402 - must come after the shim

_SHOWN_INO_OFFSET = _find_shown_ino_offset(pyfuse3.EntryAttributes)

__all__ = ["VERIFIED", "AttrBuilder", "attr_builder", "backing_close", "backing_open", "configure_session",
           "libfuse_version",
           "no_capability", "pass_through", "passthrough_asked", "passthrough_offered", "problems", "pyfuse3",
           "before_next_read", "let_go_at_session_end", "let_go_early", "quicken_session_loop",
           "release_on_session_end", "reply_err", "report", "session_exited",
           "set_shown_ino"]
