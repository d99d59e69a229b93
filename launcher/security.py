"""What the container's processes may do, as Docker limits it by default.

- Capabilities: the bounding set is cut to Docker's default fourteen (``DEFAULT_CAPS``),
  changed by ``--cap-add``/``--cap-drop``; ``--privileged`` keeps them all.  Root's
  permitted and effective sets follow the bounding set at exec; a ``--user`` has none.
- ``--security-opt no-new-privileges``: PR_SET_NO_NEW_PRIVS, so setuid bits and file
  capabilities no longer raise privileges.
- Seccomp: the essence of Docker's default profile as a deny list (``seccomp_program``):
  the kernel keyring, module loading, kexec, bpf, perf, userfaultfd, clock and swap
  changes, file handles, foreign system call ABIs; and, unless CAP_SYS_ADMIN was added,
  mounting and new namespaces (clone with CLONE_NEW* flags, unshare, setns; clone3 says
  ENOSYS so that libc falls back to clone, as under Docker).  Denied calls fail EPERM.

Everything is applied by ``apply()`` in the container's PID 1 after the root is set up
and before the user switch and exec.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

from launcher import syscalls

log = logging.getLogger(__name__)

CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
"""Capability names by number, without the CAP_ prefix (<linux/capability.h>)."""
CAP = {name: i for i, name in enumerate(CAP_NAMES)}
DEFAULT_CAPS = frozenset(CAP[n] for n in (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
))
"""Docker's (and podman's, less NET_RAW, MKNOD and AUDIT_WRITE) default capabilities."""


class Policy(NamedTuple):
    """The container's limits: capabilities kept, no-new-privileges, seccomp on or off, and
    *privileged* (no masked or read-only paths, /sys writable)."""

    caps: frozenset[int] = DEFAULT_CAPS
    no_new_privs: bool = False
    seccomp: bool = True
    privileged: bool = False


def cap_number(name: str) -> int | None:
    """The number of capability *name* (``SYS_ADMIN``, ``cap_sys_admin``); None for ``ALL``.

    Raises ValueError for a name the kernel does not know.
    """
    key = name.strip().upper().removeprefix("CAP_")
    if key == "ALL":
        return None
    if key not in CAP:
        raise ValueError(f"unknown capability {name!r}")
    return CAP[key]


def policy(cap_add: Iterable[str] = (), cap_drop: Iterable[str] = (), security_opt: Iterable[str] = (),
           privileged: bool = False) -> Policy:
    """The policy for docker run's ``--cap-add``, ``--cap-drop``, ``--security-opt`` and ``--privileged``.

    As Docker: drops apply to the default set first, then adds (so ``--cap-drop ALL
    --cap-add CHOWN`` keeps only CHOWN).  Security options: ``no-new-privileges[:true|false]``
    and ``seccomp=unconfined``.  Raises ValueError for anything else.
    """
    everything = frozenset(range(len(CAP_NAMES)))
    caps = set(everything if privileged else DEFAULT_CAPS)
    for name in cap_drop:
        num = cap_number(name)
        caps = set() if num is None else caps - {num}
    for name in cap_add:
        num = cap_number(name)
        caps = set(everything) if num is None else caps | {num}
    no_new_privs, seccomp = False, not privileged
    for opt in security_opt:
        key, _, value = opt.replace("=", ":", 1).partition(":")
        if key == "no-new-privileges" and value in ("", "true", "false"):
            no_new_privs = value != "false"
        elif key == "seccomp" and value == "unconfined":
            seccomp = False
        else:
            raise ValueError(f"unsupported --security-opt {opt!r} (known: no-new-privileges, "
                             "seccomp=unconfined)")
    return Policy(frozenset(caps), no_new_privs, seccomp, privileged)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:  # bytes: no codec after the pivot
            return int(f.read())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def apply(pol: Policy) -> None:
    """Cut the bounding and ambient sets and load the seccomp filter, in the calling process.

    Call in the container's PID 1 before it switches user: the filter needs CAP_SYS_ADMIN
    (or no-new-privileges) to load, and switching user needs CAP_SETUID.  Dropping a
    capability from the bounding set takes it from what exec grants, not from this process.
    """
    log.debug("capabilities %s; seccomp %s", describe_caps(pol.caps), "on" if pol.seccomp else "off")
    for cap in range(_last_cap() + 1):
        if cap not in pol.caps:
            try:
                syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a capability this kernel lacks
                    raise OSError(exc.errno, "drop capability", f"CAP_{CAP_NAMES[cap]}") from None
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    if pol.seccomp:
        program = seccomp_program(allow_sys_admin=CAP["SYS_ADMIN"] in pol.caps)
        if program is None:
            log.warning("no seccomp filter for %s: the container runs without one", os.uname().machine)
        else:
            syscalls.seccomp_filter(program)


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: from here on, exec never raises privileges (setuid bits, file capabilities)."""
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


# -- seccomp ----------------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
CLONE_NEW_FLAGS = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
                   | syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNET
                   | syscalls.CLONE_NEWCGROUP)

# x86_64 system call numbers (<asm/unistd_64.h>)
X86_64_DENIED = {
    "acct": 163, "add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "create_module": 174, "get_kernel_syms": 177, "query_module": 178,
    "lookup_dcookie": 212, "nfsservctl": 180, "uselib": 134, "ustat": 136, "sysfs": 139, "_sysctl": 156,
    "ioperm": 173, "iopl": 172, "swapon": 167, "swapoff": 168, "reboot": 169, "settimeofday": 164,
    "clock_settime": 227, "clock_adjtime": 305, "quotactl": 179, "open_by_handle_at": 304,
    "name_to_handle_at": 303,
}
X86_64_SYS_ADMIN = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
X86_64_CLONE, X86_64_CLONE3 = 56, 435

# classic BPF (<linux/filter.h>)
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


_Insn = tuple[int, int | str, int | str, int]
"""A BPF instruction: code, jump if true, jump if false (offsets, or labels resolved when the program
is assembled), k.  A plain tuple: a NamedTuple class costs the launcher's start time."""


def seccomp_program(*, allow_sys_admin: bool, machine: str | None = None) -> bytes | None:
    """The filter as a packed array of ``struct sock_filter``; None on an architecture without a table."""
    if (machine or os.uname().machine) != "x86_64":
        return None
    denied = sorted({*X86_64_DENIED.values(), *(() if allow_sys_admin else X86_64_SYS_ADMIN.values())})
    code: list[_Insn] = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 0, "deny", AUDIT_ARCH_X86_64),
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE_K, "deny", 0, X32_SYSCALL_BIT),
        *((_JEQ_K, "deny", 0, nr) for nr in denied),
    ]
    if not allow_sys_admin:
        code += [(_JEQ_K, "enosys", 0, X86_64_CLONE3), (_JEQ_K, 0, "allow", X86_64_CLONE),
                 (_LD_W_ABS, 0, 0, 16),  # the low half of seccomp_data.args[0]: clone's flags
                 (_JSET_K, "deny", 0, CLONE_NEW_FLAGS)]
    labels = {"allow": len(code), "deny": len(code) + 1, "enosys": len(code) + 2}
    code += [(_RET_K, 0, 0, SECCOMP_RET_ALLOW), (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
             (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]

    def target(at: int, jump: int | str) -> int:
        return jump if isinstance(jump, int) else labels[jump] - at - 1

    return b"".join(struct.pack("=HBBI", op, target(n, jt), target(n, jf), k)
                    for n, (op, jt, jf, k) in enumerate(code))


def describe_caps(caps: Iterable[int]) -> str:
    """``CAP_CHOWN,CAP_KILL,...`` in number order, for logs."""
    return ",".join(f"CAP_{CAP_NAMES[c]}" for c in sorted(caps))


def bounding_mask(caps: Iterable[int]) -> int:
    """The bit mask /proc/PID/status shows as CapBnd for *caps*."""
    return sum(1 << c for c in caps)

