"""The readers of `cxrbatch data build`: a git mirror read with `git cat-file`, a wheel."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from helpers import make_repo

from cxrbatch.databuild.readers import GitFiles, find_git_dir


def test_closing_a_git_reader_interrupted_inside_a_read_does_not_hang(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM inside `read`, after the request: cat-file is blocked writing a blob
    larger than the pipe holds, which nobody will read; `close` must still return."""
    blob = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    commit = make_repo(tmp_path, "a/big", {"big.png": blob})
    git_dir = find_git_dir(tmp_path, "a/big")
    assert git_dir is not None
    files = GitFiles(git_dir, commit)
    cat = files._cat
    assert cat.stdin is not None and cat.stdout is not None
    cat.stdin.write(files._blobs["big.png"].encode() + b"\n")
    cat.stdin.flush()
    assert cat.stdout.readline().split()[2] == str(len(blob)).encode()  # interrupted here
    closing = threading.Thread(target=files.close, daemon=True)
    closing.start()
    closing.join(timeout=10)
    hung = closing.is_alive()
    if hung:
        cat.kill()  # let the test end
    assert not hung and cat.poll() is not None
