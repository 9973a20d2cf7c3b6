"""The cores a process may use: affinity, capped by a cgroup v2 quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrbatch.cores import cgroup_quota, usable_cores


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # one and a half CPUs: the half still runs a thread
        ("50000 100000", 1),
        ("max 100000\n", None),
        ("", None),
        ("lots 100000", None),
        ("0 100000", None),
    ],
)
def test_cgroup_quota_reads_cpu_max(tmp_path: Path, text: str, cpus: int | None) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text, encoding="ascii")
    assert cgroup_quota(cpu_max) == cpus


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path / "absent") is None


def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == 8  # no cgroup file: the affinity
    cpu_max.write_text("200000 100000\n", encoding="ascii")
    assert usable_cores(cpu_max) == 2  # a container given 2 CPUs of 8
    cpu_max.write_text("1600000 100000\n", encoding="ascii")
    assert usable_cores(cpu_max) == 8  # a quota above the affinity does not add cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert usable_cores(cpu_max) == 1  # pinned to one core (taskset)
