"""Containers in the image store: a writable layer over an image, a name, and a state.

Layout below the store's root::

    containers/<id>/container.json   Id, Name, Image (id), ImageName, Command, Created, AutoRemove
    containers/<id>/state.json       Status (created, running, exited), ExitCode, StartedAt, FinishedAt, Pid
    containers/<id>/upper/           the container layer: the union's writable branch (AUFS style: the
                                     server's work files live in it under ``.wh..wh.*``, which diff and
                                     commit leave out)
    locks/containers.lock            held (exclusive) while a container is made or removed: names stay unique

Both JSON files are replaced atomically.  While ``unionfs run`` runs a container it holds an
exclusive ``flock`` on the container's directory: a container is Up exactly while that lock is held,
so one whose launcher was SIGKILLed shows as exited (137, the signal its command got through the
launcher's parent-death signal) even though its state file still says running.  The init layer is
never here: it lives in the run's own tmpfs.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Store, hexof, normalize_name, write_atomic
from .unpack import ImageError, remove_tree

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KILLED = 128 + signal.SIGKILL
STOP_WAIT = 10.0  # seconds `rm -f` waits for a killed launcher to let go of its container

# As docker's and podman's generated names: adjective_noun.
ADJECTIVES = ("admiring", "adoring", "affectionate", "amazing", "awesome", "blissful", "bold", "brave",
              "charming", "clever", "cool", "dazzling", "determined", "eager", "ecstatic", "elegant",
              "epic", "fervent", "festive", "focused", "friendly", "gallant", "gifted", "happy", "hopeful",
              "jolly", "keen", "kind", "loving", "lucid", "modest", "nice", "optimistic", "peaceful",
              "quirky", "relaxed", "serene", "sharp", "stoic", "sweet", "tender", "upbeat", "vibrant",
              "wizardly", "youthful", "zealous")
NOUNS = ("agnesi", "babbage", "bohr", "curie", "darwin", "dijkstra", "einstein", "euler", "fermat",
         "feynman", "galileo", "gauss", "goldberg", "hamilton", "hopper", "hypatia", "kepler", "knuth",
         "lamarr", "lovelace", "mccarthy", "meitner", "newton", "noether", "pascal", "pike", "ritchie",
         "shannon", "thompson", "torvalds", "turing", "wozniak")


@dataclass
class Container:
    """A container's record (container.json) and where it lives."""

    id: str
    name: str
    image: str          # the image id
    image_name: str     # the name it was run by (or the short id)
    command: list[str]
    created: float
    auto_remove: bool
    path: Path

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.path / "state.json").read_bytes())
        except (OSError, ValueError):
            return {"Status": "created"}
        return data

    def running(self) -> bool:
        """Whether a launcher holds the container now (its flock on the directory)."""
        try:
            fd = os.open(self.path, DIR_FLAGS)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def status(self, now: float | None = None) -> str:
        """As `docker ps` says it: ``Up 3 seconds``, ``Exited (0) 2 minutes ago``, ``Created``."""
        now = time.time() if now is None else now
        state = self.state()
        if self.running():
            return f"Up {_duration(now - float(state.get('StartedAt', now)))}"
        if state.get("Status") == "created":
            return "Created"
        if state.get("Status") == "running":    # its launcher was killed: no exit was recorded
            return f"Exited ({KILLED})"
        return f"Exited ({state.get('ExitCode', 0)}) {ago(now - float(state.get('FinishedAt', now)))}"


class Containers:
    """The containers of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root / "containers"

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Container]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(os.listdir(self.root)):
            c = self._load(entry)
            if c is not None:
                out.append(c)
        return sorted(out, key=lambda c: -c.created)

    def _load(self, entry: str) -> Container | None:
        path = self.root / entry
        try:
            doc = json.loads((path / "container.json").read_bytes())
        except (OSError, ValueError):
            return None     # being made or removed
        return Container(id=doc["Id"], name=doc["Name"], image=doc["Image"], image_name=doc["ImageName"],
                         command=list(doc["Command"]), created=float(doc["Created"]),
                         auto_remove=bool(doc.get("AutoRemove")), path=path)

    def get(self, ref: str) -> Container:
        """The container *ref* names: its name, its id, or an unambiguous id prefix."""
        every = self.list()
        for c in every:
            if ref in (c.name, c.id):
                return c
        if len(ref) >= 3:
            found = [c for c in every if c.id.startswith(ref)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ImageError(f"{ref}: ambiguous container id prefix")
        raise ImageError(f"no such container: {ref}")

    def used_images(self) -> dict[str, Container]:
        """Image id -> a container made from it."""
        return {c.image: c for c in self.list()}

    # ------------------------------------------------------------------ life

    @contextmanager
    def create(self, image_ref: str, name: str | None, command: Sequence[str],
               auto_remove: bool = False) -> Iterator[Container]:
        """A new container of *image_ref*, held (its directory flock'ed) for the block: write its
        state with ``started()`` and ``finished()``.  With *auto_remove* it is removed afterwards."""
        store = self.store
        with store.lock("store.lock", exclusive=False), store.lock("containers.lock", exclusive=True):
            image = store.image(image_ref)    # under the store lock: no image rm between here and the record
            taken = {c.name for c in self.list()}
            if name is not None:
                _check_name(name)
                if name in taken:
                    raise ImageError(f"the container name {name!r} is already in use; remove that container "
                                     f"or choose another name")
            else:
                name = _generate_name(taken)
            cid = secrets.token_hex(32)
            path = self.root / cid
            self.root.mkdir(mode=0o700, exist_ok=True)
            tmp = self.root / f".new-{cid}"
            tmp.mkdir(mode=0o700)
            (tmp / "upper").mkdir(mode=0o755)
            shown = next((n for n in (image_ref, normalize_name(image_ref)) if n in image.names),
                         hexof(image.id)[:12])
            doc = {"Id": cid, "Name": name, "Image": image.id, "ImageName": shown, "Command": list(command),
                   "Created": time.time(), "AutoRemove": auto_remove}
            write_atomic(tmp / "state.json", json.dumps({"Status": "created"}).encode())
            write_atomic(tmp / "container.json", json.dumps(doc, indent=1).encode())
            fd = os.open(tmp, DIR_FLAGS)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(tmp, path)
        container = self._load(cid)
        assert container is not None
        try:
            yield container
        finally:
            try:
                if auto_remove:
                    self._remove_held(container)
            finally:
                os.close(fd)

    def started(self, c: Container) -> None:
        _write_state(c, {"Status": "running", "StartedAt": time.time(), "Pid": os.getpid()})

    def finished(self, c: Container, code: int) -> None:
        state = c.state()
        state.update({"Status": "exited", "ExitCode": code, "FinishedAt": time.time()})
        state.pop("Pid", None)
        _write_state(c, state)

    def remove(self, ref: str, force: bool = False) -> Container:
        """Remove the container *ref* and its layer; a running one only with *force* (its launcher
        is killed, as `podman rm -f` stops it first)."""
        with self.store.lock("containers.lock", exclusive=True):
            c = self.get(ref)
            fd = os.open(c.path, DIR_FLAGS)
            try:
                if not _try_lock(fd):
                    if not force:
                        raise ImageError(f"cannot remove container {c.name} as it is running "
                                         "(stop it first, or use rm -f)")
                    self._kill(c, fd)
                self._remove_held(c)
            finally:
                os.close(fd)
        return c

    def _kill(self, c: Container, fd: int) -> None:
        pid = c.state().get("Pid")
        if isinstance(pid, int) and pid > 1:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_WAIT
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                raise ImageError(f"container {c.name} is still running {STOP_WAIT:.0f} s after its launcher "
                                 f"(pid {pid}) was killed")
            time.sleep(0.02)

    def _remove_held(self, c: Container) -> None:
        """Remove *c*, which we hold: first out of sight (renamed into tmp/), then its tree."""
        self.store.ensure()
        gone = self.store.root / "tmp" / f"rm-{c.id}"
        try:
            os.rename(c.path, gone)
        except FileNotFoundError:
            return
        pfd = os.open(gone.parent, DIR_FLAGS)
        try:
            remove_tree(pfd, gone.name)
        finally:
            os.close(pfd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_state(c: Container, state: dict[str, Any]) -> None:
    write_atomic(c.path / "state.json", json.dumps(state).encode())


def _check_name(name: str) -> None:
    ok = name[:1].isalnum() and all(ch.isalnum() or ch in "_.-" for ch in name) and name.isascii()
    if not ok:
        raise ImageError(f"invalid container name {name!r}: letters, digits, '_', '.' and '-', "
                         "starting with a letter or digit")


def _generate_name(taken: set[str]) -> str:
    for attempt in range(100):
        name = f"{secrets.choice(ADJECTIVES)}_{secrets.choice(NOUNS)}"
        if attempt >= 10:
            name += str(secrets.randbelow(100))
        if name not in taken:
            return name
    raise ImageError("could not find a free container name; give one with --name")


# ------------------------------------------------------------------ what `run IMAGE` runs


def command_for(config: dict[str, Any], args: Sequence[str], entrypoint: str | None) -> list[str]:
    """The argv of a container of an image with *config* (its ``config`` object), as docker makes it:
    ENTRYPOINT + CMD, where *args* replace the image's Cmd, and ``--entrypoint`` (a string, or a
    JSON array as podman takes it; ``""`` clears it) replaces the image's Entrypoint and drops its Cmd."""
    if entrypoint is not None:
        entry = _entrypoint_list(entrypoint)
        cmd = list(args)
    else:
        entry = list(config.get("Entrypoint") or [])
        cmd = list(args) if args else list(config.get("Cmd") or [])
    argv = entry + cmd
    if not argv:
        raise ImageError("no command specified: the image has no Entrypoint or Cmd; give one after the image")
    return argv


def _entrypoint_list(value: str) -> list[str]:
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return [value] if value else []


def read_env_file(path: str) -> list[str]:
    """``--env-file``: KEY=VALUE or KEY (passed from our environment) per line; blank lines and lines
    starting with ``#`` skipped, as docker reads it."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ImageError(f"--env-file {path}: {os.strerror(exc.errno or errno.EIO)}") from None
    for line in lines:
        text = line.lstrip()
        if not text or text.startswith("#"):
            continue
        key = text.partition("=")[0]
        if not key or any(ch.isspace() for ch in key):
            raise ImageError(f"--env-file {path}: bad line {line!r} (want KEY=VALUE)")
        out.append(text)
    return out


# ------------------------------------------------------------------ how `ps` says times


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return f"{s} second{'s' if s != 1 else ''}"
    if s < 120:
        return "About a minute"
    if s < 3600:
        return f"{s // 60} minutes"
    if s < 7200:
        return "About an hour"
    if s < 48 * 3600:
        return f"{s // 3600} hours"
    return f"{s // 86400} days"


def ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"

