"""The export side is found from a checkout or a wheel, and a missing extra says how to install it."""

from __future__ import annotations

import importlib.util
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
    monkeypatch.setattr(
        extras.importlib.util, "find_spec", lambda name, *a: None if name in ("tensorflow", "keras") else real(name, *a)
    )  # both hidden: the message is the same whether keras is installed or not
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
