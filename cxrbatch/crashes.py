"""Crash-test hooks: a process that dies at a named point, as `kill -9` (or cron's `timeout`) would.

`CXRBATCH_CRASH_AT=<point>` names the point; `CXRBATCH_CRASH_SIGNAL` the signal (default 9,
SIGKILL; 15 is SIGTERM, what `timeout` sends). Only the crash tests set them.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    """Send this process the crash signal here when CXRBATCH_CRASH_AT names this point (its whole
    process group where CXRBATCH_CRASH_GROUP is set: a closed terminal's hangup reaches them all)."""
    if os.environ.get("CXRBATCH_CRASH_AT") == name:
        signum = int(os.environ.get("CXRBATCH_CRASH_SIGNAL", "9"))
        if os.environ.get("CXRBATCH_CRASH_GROUP"):
            os.killpg(os.getpgrp(), signum)
        else:
            os.kill(os.getpid(), signum)
