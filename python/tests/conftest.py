"""What the client's test modules share: a region name a test, and the check that the test left
nothing in /dev/shm."""

from __future__ import annotations

import os
import stat
from typing import Iterator

import pytest

from eplb_client import region as R


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """``pytest{pid}-{module}-{test}``; after the test, every ``/dev/shm/eplb-NAME-*`` it left is
    removed and the test fails (a FIFO planted there is opened first, so a hung open returns)."""
    module = request.module.__name__.removeprefix("test_")[:6]
    n = f"pytest{os.getpid()}-{module}-{request.node.name[:20].replace('[', '_').replace(']', '_')}"
    yield n
    leftovers = [f for f in os.listdir(R.SHM_DIR) if f"eplb-{n}-" in f]
    for f in leftovers:
        p = os.path.join(R.SHM_DIR, f)
        if stat.S_ISFIFO(os.lstat(p).st_mode):
            try:  # unblock an open that hangs on it (the code under test is broken then)
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        os.unlink(p)
    assert not leftovers, f"left in /dev/shm: {leftovers}"
