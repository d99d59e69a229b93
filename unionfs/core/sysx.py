"""The few system calls the stdlib lacks, through ctypes; each raises OSError naming its step."""
from __future__ import annotations

import ctypes
import errno
import os

AT_FDCWD = -100  # a dirfd meaning "relative to the working directory" (not in the os module)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

def _load_libc() -> ctypes.CDLL:
    # By its soname first: find_library runs ldconfig in a subprocess, on the server's start-up path.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # (shutil, subprocess, tempfile: not on every start-up)

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(src_dirfd: int, src: bytes, dst_dirfd: int, dst: bytes, flags: int) -> None:
    if _renameat2(src_dirfd, src, dst_dirfd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2: {os.strerror(err)}", os.fsdecode(src))

AT_SYMLINK_NOFOLLOW = 0x100
_SYS_FCHMODAT2 = 452    # Linux 6.6+, x86-64 and the generic table alike
_syscall = _libc.syscall     # used for fchmodat2 alone: its arguments' types are set here
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_int]
_syscall.restype = ctypes.c_long


def fchmodat2(dirfd: int, name: bytes, mode: int, flags: int) -> None:
    """fchmodat2(2) (Linux 6.6+): with AT_SYMLINK_NOFOLLOW, a symlink is refused (EOPNOTSUPP)
    instead of followed; ENOSYS before 6.6."""
    if _syscall(_SYS_FCHMODAT2, dirfd, name, mode, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fchmodat2: {os.strerror(err)}", os.fsdecode(name))

_SYS_LISTXATTRAT = 465  # Linux 6.13+: every architecture's table since 424 but alpha's and mips'
_listxattrat = _libc["syscall"]    # a function object of its own: its argument types differ
_listxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p,
                         ctypes.c_size_t]
_listxattrat.restype = ctypes.c_long
XATTR_LIST_MAX = 65536


def _probe_listxattrat() -> bool:
    # Once, on "/": a kernel without the call says ENOSYS, a seccomp filter may say EPERM or
    # anything; only a success makes it the way.
    if os.uname().machine.startswith(("alpha", "mips")):
        return False
    return bool(_listxattrat(_SYS_LISTXATTRAT, AT_FDCWD, b"/", AT_SYMLINK_NOFOLLOW, None, 0) >= 0)


_has_listxattrat = _probe_listxattrat()


def listxattrat(dirfd: int, name: bytes, flags: int) -> list[bytes] | None:
    """listxattrat(2) (Linux 6.13+): the xattr names of *name* in *dirfd* (with AT_SYMLINK_NOFOLLOW,
    of a symlink itself), in one call instead of an O_PATH open and a listxattr through /proc;
    None where the kernel has no such call."""
    global _has_listxattrat
    if not _has_listxattrat:
        return None
    size = 1024
    while True:
        buf = ctypes.create_string_buffer(size)
        got = _listxattrat(_SYS_LISTXATTRAT, dirfd, name, flags, buf, size)
        if got >= 0:
            return buf.raw[:got].split(b"\0")[:-1]
        err = ctypes.get_errno()
        if err == errno.ENOSYS:   # (the probe said otherwise: a filter changed its mind)
            _has_listxattrat = False
            return None
        if err != errno.ERANGE or size >= XATTR_LIST_MAX:
            raise OSError(err, f"listxattrat: {os.strerror(err)}", os.fsdecode(name))
        size = XATTR_LIST_MAX


_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate: {os.strerror(err)}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME, MS_NOSYMFOLLOW = 1024, 2048, 1 << 21, 1 << 24, 256
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_mount.restype = ctypes.c_int


# mountinfo's per-mount words and the flags they stand for (a remount keeps them; a new mount asks for them).
FLAG_WORDS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "nosymfollow": MS_NOSYMFOLLOW,
}


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None,
          step: str = "mount") -> None:
    """mount(2): a new filesystem (a FUSE mount over an open /dev/fuse fd, as libfuse does it)."""
    if _mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{step}: {os.strerror(err)}", os.fsdecode(target))


def remount(target: bytes, flags: int) -> None:
    """mount(2) with MS_REMOUNT: the per-mount and superblock flags of the mount at *target*."""
    mount(None, target, None, MS_REMOUNT | flags, None, step="remount")


MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


def umount2(target: bytes, flags: int) -> None:
    if _umount2(target, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount: {os.strerror(err)}", os.fsdecode(target))
