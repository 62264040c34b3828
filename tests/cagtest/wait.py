"""Waiting for a study to reach a journal state, for tests that run a Node in-process (e2e, web).

The root conftest puts ``tests/`` on ``sys.path`` (as each folder's conftest does for its own
helpers), so ``from cagtest.wait import wait_state`` works from any test folder."""

from __future__ import annotations

import time


def wait_state(node, study_uid: str, states=("sent", "failed"), timeout: float = 300, poll: float = 0.3):
    """The study's journal row once its state is one of ``states``; AssertionError (naming the
    state it was left in and its last error) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = node.journal.get_study(study_uid)
        if st is not None and st.state in states:
            return st
        time.sleep(poll)
    raise AssertionError(f"study {study_uid} did not reach {states}: {getattr(st, 'state', None)} "
                         f"{getattr(st, 'error', '')}")
