"""The few Linux system calls the standard library lacks, through ctypes.

Python 3.11 has no ``os.unshare``, ``os.setns``, ``mount``, ``umount2``,
``pivot_root`` or ``prctl``.  Each wrapper here checks the return value and raises
``OSError(errno, step, path)`` so that a failure names what was being done and
on which path; ``launcher.supervisor.describe()`` renders it as one line:
"mount proc /tmp/x/proc: Operation not permitted".  Nothing else in
the launcher touches ctypes.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24

MNT_FORCE = 1
MNT_DETACH = 2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

SYS_pivot_root = 155  # x86_64; resolved per machine below

# Not ctypes.util.find_library: on Linux it runs ldconfig, milliseconds on the launch path.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

# pivot_root has no glibc wrapper; its number differs between architectures.
_PIVOT_ROOT_NR = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "s390x": 217,
    "i686": 217,
    "i386": 217,
    "armv7l": 218,
}.get(os.uname().machine, SYS_pivot_root)


def _check(ret: int, step: str, path: str | os.PathLike[str] | None) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, step, None if path is None else os.fspath(path))


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """unshare(2).  CLONE_NEWUSER and CLONE_NEWNS need a single-threaded caller."""
    _check(_libc.unshare(flags), "unshare", None)


def setns(fd: int, nstype: int, path: str | None = None) -> None:
    """setns(2): join the namespace *fd* refers to; a failure names *path* (where *fd* was opened).

    Joining a user or mount namespace needs a single-threaded caller.
    """
    _check(_libc.setns(fd, nstype), "setns", path)


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
    *,
    step: str = "mount",
) -> None:
    """mount(2); a failure names *step* and *target*."""
    ret = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    _check(ret, step, target)


def umount2(target: str | os.PathLike[str], flags: int = 0, *, step: str = "umount") -> None:
    """umount2(2); a failure names *step* and *target*."""
    _check(_libc.umount2(_b(target), flags), step, target)


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """pivot_root(2), by syscall number (glibc has no wrapper)."""
    ret = _libc.syscall(ctypes.c_long(_PIVOT_ROOT_NR), _b(new_root), _b(put_old))
    _check(ret, "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer arguments."""
    ret = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(ret, f"prctl({option})", None)
    return int(ret)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(program: bytes) -> None:
    """Load a classic BPF seccomp filter (packed ``struct sock_filter`` entries) for this thread and
    its children: prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog)."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    ret = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    _check(ret, "load seccomp filter", None)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send *sig* to this process when its parent thread dies."""
    prctl(PR_SET_PDEATHSIG, sig)
