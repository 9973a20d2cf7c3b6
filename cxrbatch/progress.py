"""How far a run has got: a count of results for a progress bar, or a plain log line under cron."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cxrbatch.pipeline import Result

log = logging.getLogger(__name__)

# Told (done, total) after each result: the command line's progress bar on a terminal.
Progress = Callable[[int, int], None]


def progress_hook(total: int, reporter: Progress | None) -> Callable[[Result], None]:
    """Count results; tell the reporter, or log a plain line every tenth of the way (cron-friendly)."""
    done = 0
    step = max(1, total // 10)

    def hook(result: Result) -> None:
        nonlocal done
        done += 1
        if reporter is not None:
            reporter(done, total)
        elif done % step == 0 or done == total:
            log.info("screened %d/%d", done, total)

    return hook
