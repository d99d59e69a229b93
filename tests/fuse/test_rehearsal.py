"""The spare worker's rehearsal (unionfs.server.rehearsal): it answers every request it plays as a
mount would, and leaves nothing behind: no file in the state directory, no fd, the logging as it was.
A rehearsal that quietly stopped working would only cost time, so this is where it is seen."""

from __future__ import annotations

import logging
import os

import pytest

from unionfs.server.rehearsal import rehearse
from unionfs.server.statedir import state_dir


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_rehearsal_answers_all_and_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("root's state directory")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.makedirs(state_dir(), mode=0o700, exist_ok=True)
    before_files, before_fds = set(os.listdir(state_dir())), _fds()
    assert rehearse() == [], "a handler failed in the rehearsal"
    assert rehearse() == [], "a second rehearsal in the same process failed"
    after = set(os.listdir(state_dir()))
    assert not {n for n in after - before_files if "rehearsal" in n}, after - before_files
    assert _fds() == before_fds, "the rehearsal left an fd open"
    assert root.handlers == handlers and root.level == level
