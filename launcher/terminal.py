"""A terminal for the container, as ``docker run -t`` gives: a pty of the container's own devpts.

The container's PID 1 opens the pty inside the container (``/dev/ptmx`` of the devpts instance
mounted on its ``/dev/pts``, so ``tty`` says ``/dev/pts/0``), sets its window size to the
launcher's, hands the master to the launcher over a socket (SCM_RIGHTS) and, in the process that
execs the command, makes the slave its controlling terminal in a new session and its stdin,
stdout and stderr.  The launcher (``Relay``) puts its own terminal in raw mode (restored at
exit), copies bytes both ways between it and the master, and passes window-size changes on
(SIGWINCH on the launcher: TIOCSWINSZ on the master, which signals the container's foreground
process group).  Ctrl-C and Ctrl-Z are bytes like any other: the container's line discipline
turns them into signals for its own foreground job.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import termios
import threading
import tty
from typing import Any

log = logging.getLogger(__name__)

_WINSIZE = b"\0" * 8  # struct winsize: rows, cols, xpixel, ypixel (unsigned short each)


def window_size(fd: int) -> bytes | None:
    """The window size of the terminal *fd* (a packed struct winsize), None when it is no terminal."""
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, _WINSIZE)
    except OSError:
        return None


def open_pty(console: socket.socket, winsize: bytes | None, owner: int | None) -> int:
    """In the container, after its root is in place: open a pty of its devpts, send the master
    through *console* and return the slave.  *owner* (a ``--user`` uid) gets the slave, as
    ``docker run -t -u`` gives it."""
    try:
        master, slave = os.openpty()
    except OSError as exc:
        raise OSError(exc.errno, "open a pty in the container's devpts", "/dev/ptmx") from None
    if winsize is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
    if owner is not None:
        os.fchown(slave, owner, -1)
    socket.send_fds(console, [b"m"], [master])
    os.close(master)
    console.close()
    return slave


def become_controlling(slave: int) -> None:
    """Make *slave* the controlling terminal of a new session and this process's stdin, stdout and
    stderr (in the process about to exec the command)."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def receive_master(console: socket.socket) -> int | None:
    """The pty master the container's PID 1 sent; None when it ended (or failed) before sending one."""
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(console, 1, 1)
    except OSError as exc:
        log.debug("no pty master from the container: %s", os.strerror(exc.errno or 0))
        return None
    finally:
        console.close()
    return fds[0] if fds else None


class Relay:
    """Copies between the launcher's stdin/stdout and the pty master, in a thread.

    The thread is started before the launcher unshares its PID namespace (after that the
    kernel refuses new threads) and waits for ``attach()``.  Raw mode on the launcher's
    terminal (when stdin is one) from ``attach()`` until ``finish()``; ``finish()`` waits
    (boundedly) until the container's side is closed and everything it wrote has been passed
    on, then restores the terminal.
    """

    def __init__(self, stdin: int = 0, stdout: int = 1) -> None:
        self.master = -1
        self.stdin = stdin
        self.stdout = stdout
        self._saved: list[Any] | None = None
        self._attached = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pty-relay", daemon=True)
        self._thread.start()

    def attach(self, master: int) -> None:
        """Start relaying to and from *master* (the container's pty)."""
        self.master = master
        if os.isatty(self.stdin):
            self._saved = termios.tcgetattr(self.stdin)
            tty.setraw(self.stdin, termios.TCSANOW)
        self._attached.set()

    def resize(self) -> None:
        """SIGWINCH on the launcher: give the pty the launcher's terminal's size."""
        size = window_size(self.stdin) or window_size(self.stdout)
        if size is not None and self.master >= 0:
            try:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
            except OSError as exc:
                log.debug("TIOCSWINSZ on the pty: %s", os.strerror(exc.errno or 0))

    def finish(self, timeout: float = 5.0) -> None:
        """Wait for the relay to drain, restore the terminal, close the master."""
        self._attached.set()  # a relay never attached ends at once
        try:
            self._thread.join(timeout)
        finally:
            if self._saved is not None:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, self._saved)
            if self.master >= 0:
                os.close(self.master)

    def _run(self) -> None:
        self._attached.wait()
        if self.master >= 0:
            self._copy()

    def _copy(self) -> None:
        inputs = [self.master, self.stdin]
        output_open = True
        while True:
            try:
                ready, _, _ = select.select(inputs, [], [])
            except OSError as exc:  # stdin closed under us
                log.debug("pty relay: select: %s", os.strerror(exc.errno or 0))
                return
            if self.master in ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: every holder of the slave is gone
                        log.debug("pty relay: read: %s", os.strerror(exc.errno or 0))
                    return
                if not data:
                    return
                if output_open:
                    output_open = _write_all(self.stdout, data)
            if self.stdin in ready:
                try:
                    data = os.read(self.stdin, 65536)
                except OSError:
                    data = b""
                if not data:  # end of input: the container keeps running, as under docker run -t
                    inputs.remove(self.stdin)
                elif not _write_all(self.master, data):
                    return


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of *data*; False once *fd* refuses (a closed pipe, a gone pty)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError as exc:
            log.debug("pty relay: write: %s", os.strerror(exc.errno or 0))
            return False
    return True
