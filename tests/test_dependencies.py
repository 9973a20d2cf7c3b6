"""The lowest versions pyproject.toml accepts can be installed together and have what cxrbatch uses."""

from __future__ import annotations

import sys
from importlib import metadata

from helpers import REPO
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _floor(name: str, extra: str | None = None) -> Version:
    """The lowest version of `name` that the runtime dependencies (or `extra`'s) accept (its `>=` bound)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"] if extra is None else project["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if requirement.name == name:
            return min(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
    raise AssertionError(f"{name} is not a dependency of {extra or 'the runtime'}")


def test_the_onnxruntime_floor_takes_enable_fallback() -> None:
    # models.py asks for no fallback with InferenceSession(..., enable_fallback=0); onnxruntime
    # before 1.23 ignores that argument, falls back to the CPU itself and prints its "EP Error"
    # banner into a CSV report on stdout where onnxruntime-gpu cannot start CUDA.
    assert _floor("onnxruntime") >= Version("1.23")


def test_the_pillow_floor_draws_heatmap_captions_at_a_size() -> None:
    # heatmaps.py calls ImageFont.load_default(size=...), which Pillow 10.1 introduced: on 10.0
    # a run with --heatmaps screened every film, then ended in a TypeError with no report
    assert _floor("pillow") >= Version("10.1")


def test_the_rich_floor_is_one_the_pinned_typer_accepts() -> None:
    # typer 0.28 needs rich>=13.8.0: a lower floor here is one pip can never install
    typer_needs = [Requirement(line) for line in metadata.requires("typer") or [] if line.startswith("rich")]
    assert typer_needs, "typer no longer depends on rich"
    for requirement in typer_needs:
        assert all(spec.contains(_floor("rich")) for spec in requirement.specifier), requirement


def test_the_pydicom_floor_reads_films_without_the_network() -> None:
    # pydicom 3.0.0's `import pydicom` fetches five example files from GitHub (pydicom.examples):
    # offline, the first DICOM film of a run took 106.6 s of retries and logged a "download failure"
    # warning per file; online, the machine reached out. 3.0.1 ships the files in its wheel.
    for extra in ("dicom", "test"):
        assert _floor("pydicom", extra) >= Version("3.0.1"), extra
