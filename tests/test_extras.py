"""The export side is found from a checkout or a wheel, and a missing extra says how to install it."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from typer.testing import CliRunner

from cxrbatch import extras
from cxrbatch.cli import app
from cxrbatch.errors import ExtraMissing

runner = CliRunner()


def test_a_checkout_runs_its_own_export_folder() -> None:
    assert extras.checkout_export() == REPO / "export"
    config = extras.export_module("config")
    assert config.__name__ == "cxrbatch_export.config"
    assert Path(config.__file__).resolve() == REPO / "export" / "config.py"  # not a copy in site-packages


def test_missing_extra_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    hidden, present = ("tensorflow", "keras"), ("tf2onnx", "onnx")  # the rest of `export`'s needs, found or not

    def find_spec(name: str, *args: object) -> object:
        return None if name in hidden else (real(name, *args) or name) if name in present else real(name, *args)

    # tensorflow and keras hidden, tf2onnx and onnx there: the message is the same whatever is installed
    monkeypatch.setattr(extras.importlib.util, "find_spec", find_spec)
    with pytest.raises(ExtraMissing, match=r"tensorflow, keras not installed\): pip install \"cxrbatch\[export\]\""):
        extras.export_module("training")
    for args in (
        ["train", "gate", str(tmp_path), "--out", str(tmp_path / "g.keras")],
        ["export", str(tmp_path / "g.keras"), "--out", str(tmp_path / "g.onnx"), "--check-images", str(tmp_path)],
        ["probe", str(tmp_path / "c.keras"), str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, args
        needs = "[error] this command needs the export extra (tensorflow, keras not installed)"
        assert needs + ': pip install "cxrbatch[export]"' in result.stderr
        assert 'pip install -e ".[export]"' in result.stderr and "Traceback" not in result.stderr
        assert runner.invoke(app, [args[0], "--help"]).exit_code == 0  # help needs no extra


# Modules the runtime (`pip install cxrbatch`, no extra) does not install: present here through the
# extras or the tests' own packages (click comes with ray; Typer 0.28 carries a copy of its own).
NOT_IN_THE_RUNTIME = ("click", "tensorflow", "keras", "tf2onnx", "ray", "pydicom", "hypothesis")
WITHOUT = """
import sys
class Without:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ImportError(f"{{name}} is not installed (hidden by the test)")
sys.meta_path.insert(0, Without())
from cxrbatch.cli import main
sys.argv = ["cxrbatch", *sys.argv[1:]]
main()
"""


def test_a_run_needs_no_module_outside_the_runtime_dependencies(tmp_path: Path) -> None:
    # `import click` in the command line's module passed every test here (ray brings click) and
    # would have stopped every run of a plain install at its start.
    out = tmp_path / "r.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT.format(names=NOT_IN_THE_RUNTIME),
            "run",
            str(REPO / "samples"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr  # the DICOM sample needs the dicom extra: its row says so
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows.pop("CT_small.dcm")["error"].startswith("DICOM file, but pydicom is not installed")
    assert len(rows) == 4 and all(r["status"] in ("classified", "rejected") for r in rows.values())
