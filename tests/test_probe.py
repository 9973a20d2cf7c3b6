"""The source probe (`cxrbatch probe`): how well a classifier's features name an image's source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import blob_dataset
from typer.testing import CliRunner

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")

from cxrbatch.cli import app

pytestmark = pytest.mark.export
runner = CliRunner()


def test_probe_reports_source_accuracy_against_the_majority_baseline(exported: dict[str, Path], tmp_path: Path) -> None:
    data = blob_dataset(
        tmp_path / "cxr", {"DARK": (False, False), "LIGHT": (True, False)}, per_class=20, split_ids=True
    )
    rows = ["id,source"] + [
        f"{s}-{c}_{i},src{i % 2}" for s in ("train", "val") for c in ("DARK", "LIGHT") for i in range(20)
    ]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ckpt, out = exported["work"] / "classifier.keras", tmp_path / "probe.json"
    result = runner.invoke(app, ["probe", str(ckpt), str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(result.stdout) == report and list(report) == ["trained"]
    trained = report["trained"]
    assert trained["class"] == "DARK"  # the checkpoint's negative label, by default
    assert trained["sources"] == ["src0", "src1"] and trained["train_images"] == trained["val_images"] == 20
    assert trained["majority_baseline"] == 0.5  # 10 val films of each source
    recalls = trained["recall_per_source"]
    assert set(recalls) == {"src0", "src1"}  # with as many films per source, accuracy is their mean recall
    assert trained["probe_val_accuracy"] == pytest.approx((recalls["src0"] + recalls["src1"]) / 2, abs=1e-4)


def test_probe_refuses_what_it_cannot_measure(exported: dict[str, Path], tmp_path: Path) -> None:
    ckpt = exported["work"] / "classifier.keras"
    result = runner.invoke(app, ["probe", str(ckpt), str(exported["cxr"])])  # no MANIFEST.csv: no sources
    assert result.exit_code == 2 and "[error] the probe needs two or more MANIFEST.csv sources" in result.stderr
    result = runner.invoke(app, ["probe", str(ckpt), str(exported["cxr"]), "--base-weights", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "[error] Base weights not found:" in result.stderr
    result = runner.invoke(app, ["probe", str(ckpt), str(exported["cxr"]), "--label", "NORMAL"])
    assert result.exit_code == 2 and "name the class to probe, one of ['DARK', 'LIGHT']" in result.stderr
