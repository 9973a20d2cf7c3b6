"""The benchmarks' shared entry point: a wrong input ends a benchmark with one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from benchmarks import run_main
from cxrbatch.errors import UsageError


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (UsageError("too few films"), 2, "[error] too few films"),
        (FileNotFoundError(2, "No such file or directory", "nowhere/x.png"), 2, "[error] not found: nowhere/x.png"),
        (ModuleNotFoundError("no ray", name="ray"), 1, "[error] ray is not installed"),
        (subprocess.CalledProcessError(128, ["git", "worktree"]), 1, "[error] git worktree failed (exit 128)"),
    ],
)
def test_a_wrong_input_ends_a_benchmark_with_one_line(
    error: Exception, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as ended:
        run_main(main)
    assert ended.value.code == code and capsys.readouterr().err.startswith(line)


def test_the_decoder_benchmark_measures_a_folder_without_pngs(tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "jpegs"  # it divided by zero where a format had no file
    folder.mkdir()
    shutil.copy(REPO / "samples" / "rocket.jpg", folder / "rocket.jpg")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.decoders", str(folder), "--repeats", "1", "--json", str(tmp_path / "j")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "j").read_text(encoding="utf-8"))
    assert record["png"] == {"images": 0, "decoders": {}} and record["jpeg"]["images"] == 1
    assert record["jpeg"]["decoders"]["pillow (draft)"]["per_s"] > 0


def test_familiarity_folds_leave_the_left_out_collections_copies_out_of_the_fit() -> None:
    # Copies of the left-out collection's films kept under another collection's name made the
    # collection look familiar to a statistic fitted on them (the Kermany and curated-Kaggle folds).
    from benchmarks.familiarity_loco import fold

    rng = np.random.default_rng(3)
    first, last = np.r_[np.ones(40), np.zeros(40)], np.r_[np.zeros(40), np.ones(40)]
    held = rng.normal(scale=0.5, size=(60, 80)) + 2 * last  # collection C, away from the others
    seen = {g: rng.normal(scale=0.5, size=(230, 80)) + 2 * first for g in ("A", "B")}
    features = np.concatenate([seen["A"], seen["B"], held, held])  # B's train also holds C's films
    group = np.array(["A"] * 230 + ["B"] * 230 + ["C"] * 60 + ["B"] * 60)
    split = np.array((["train"] * 150 + ["val"] * 40 + ["test"] * 40) * 2 + ["test"] * 60 + ["train"] * 60)
    by_name = fold(features, split, group, "C", group == "C")
    by_cluster = fold(features, split, group, "C", np.r_[group[:520] == "C", np.ones(60, bool)])
    for statistic in ("global Mahalanobis (1.3.0)", "10th-nearest film, cosine"):
        assert by_cluster[statistic]["flagged"] == 1.0  # type: ignore[index]
        assert by_name[statistic]["flagged"] < 0.5  # type: ignore[index]
