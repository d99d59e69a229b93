"""How a forked server is told what to serve, and how it answers: the one protocol between a
process that starts a server and the server (`unionfs mount`'s background daemon, `unionfs run`'s
server forked before the launcher knows its union).

- The order, on a pipe the starter writes whole and closes: the `MountConfig`'s fields with where to
  log and at what level, as a Python literal in ASCII (paths of any bytes survive: their surrogate
  escapes are written as ``\\udcXX``; `ast`, unlike json, both sides have imported already).  No
  bytes at all: no order, the server is not needed.
- The answer, on the ready fd the server writes once and closes: ``ready`` once the kernel has the
  mount and it is served, or ``error: MESSAGE`` (one line).  EOF without either: the server died.

Light to import (no trio, no pyfuse3): the starter's side runs on the launcher's critical path.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import os
from typing import Any, NamedTuple

from unionfs.core.config import MountConfig
from unionfs.core.errors import QuietError, describe

READY = b"ready"
ERROR = b"error: "
DIED = "the daemon exited before the mount was ready"


class Order(NamedTuple):
    """What a server is to serve, and where it logs (None: where it was started) at which level."""

    config: MountConfig
    log_file: str | None = None
    log_level: int = logging.INFO


def encode_order(order: Order) -> bytes:
    data = {"config": order.config.fields(), "log_file": order.log_file, "log_level": order.log_level}
    return ascii(data).encode("ascii")


def decode_order(data: bytes) -> Order:
    """The order in *data*, as `encode_order` wrote it."""
    raw: dict[str, Any] = ast.literal_eval(data.decode("ascii"))
    return Order(MountConfig.from_fields(raw["config"]), raw["log_file"], raw["log_level"])


def send_order(fd: int, order: Order | None) -> None:
    """Write *order* (None: no order) to the pipe *fd* and close it.  A server already gone is no
    error here: its answer (EOF) says so."""
    try:
        if order is not None:
            os.write(fd, encode_order(order))  # a blocking pipe: all of it, as the reader reads to EOF
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def read_order(fd: int) -> Order | None:
    """The order on the pipe *fd*, read to EOF and closed; None when the starter sent none."""
    data = _read_all(fd)
    return decode_order(data) if data else None


def report_ready(fd: int) -> None:
    """Answer ``ready`` on *fd* and close it."""
    _answer(fd, READY)


def report_error(fd: int, failure: BaseException | str) -> None:
    """Answer ``error: MESSAGE`` on *fd* and close it; never raises (the starter may be gone)."""
    message = failure if isinstance(failure, str) else describe(failure)
    _answer(fd, ERROR + os.fsencode(message))  # a path in it may hold any bytes


def wait_ready(fd: int) -> None:
    """Wait for the server's answer on *fd* (closed here); a `QuietError` with its message when it
    failed, or died before answering."""
    answer = _read_all(fd)
    if answer != READY:
        raise QuietError(os.fsdecode(answer.removeprefix(ERROR)) or DIED)


def _answer(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
