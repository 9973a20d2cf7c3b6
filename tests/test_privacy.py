"""cxrbatch keeps to itself: onnxruntime's telemetry is off unless a user turns it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys
import cxrbatch
import onnxruntime as ort
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(os.environ.get("ORT_DISABLE_TELEMETRY"))
"""


def _session_in_a_fresh_process(model: Path, home: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        env={**clean, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_onnxruntime_telemetry_is_off_and_writes_nothing(tiny_models: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert _session_in_a_fresh_process(tiny_models / "gate.onnx", home) == "1"
    assert list(home.rglob("*")) == []  # no device id, no event cache


def test_a_user_may_turn_it_on(tiny_models: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert _session_in_a_fresh_process(tiny_models / "gate.onnx", home, ORT_DISABLE_TELEMETRY="0") == "0"


def test_a_program_that_imported_onnxruntime_first_is_warned(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run(
        [sys.executable, "-c", "import onnxruntime, cxrbatch"],
        env={**clean, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "onnxruntime was imported before cxrbatch, so its telemetry is on in this process" in done.stderr
