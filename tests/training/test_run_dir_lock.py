"""The run-dir lock: one trainer at a time, and checks of "is it being trained?" that never refuse each other."""

from __future__ import annotations

import pytest

from dpdiff.errors import UserError
from dpdiff.runtime import RunDirLock, refuse_if_running


def test_exclusive_lock_refuses_a_second_holder_and_shared_checks_coexist(tmp_path):
    trainer = RunDirLock(tmp_path)
    assert trainer.acquire()
    assert not RunDirLock(tmp_path).acquire()  # a second trainer or prober
    with pytest.raises(UserError, match="being trained"):
        refuse_if_running(tmp_path)  # resuming a run that is still training
    trainer.release()
    # the ranks of one resuming run check together: shared checks do not refuse each other
    a, b = RunDirLock(tmp_path), RunDirLock(tmp_path)
    assert a.acquire(shared=True) and b.acquire(shared=True)
    assert not RunDirLock(tmp_path).acquire()  # while they look, nobody trains into it
    a.release()
    b.release()
    refuse_if_running(tmp_path)
    assert RunDirLock(tmp_path).acquire()
