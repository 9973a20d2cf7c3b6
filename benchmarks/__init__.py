"""Benchmarks: each prints a table and writes JSON (benchmarks/README.md); `run_main` runs one."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

from cxrbatch.errors import CxrBatchError


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's `main`: what a wrong input raises (a missing folder or model, too few
    films, an optional module not installed, a git revision that does not exist) ends it with
    one `[error]` line and an exit code, not a traceback. SIGTERM (a `timeout`) ends it as an
    exception does, so its temporary folders (20,000 synthetic films) are removed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except CxrBatchError as exc:
        print(f"[error] {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except FileNotFoundError as exc:
        print(f"[error] not found: {exc.filename or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError as exc:
        print(f"[error] {exc.name} is not installed: this benchmark needs it", file=sys.stderr)
        raise SystemExit(1) from None
    except subprocess.CalledProcessError as exc:
        command = " ".join(map(str, exc.cmd)) if isinstance(exc.cmd, list) else str(exc.cmd)
        print(f"[error] {command} failed (exit {exc.returncode})", file=sys.stderr)
        raise SystemExit(1) from None
