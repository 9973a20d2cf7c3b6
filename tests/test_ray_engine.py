"""`cxrbatch run --engine ray`: the same rows as the local engine, a lost worker costs one file,
a killed driver loses nothing, and every failure to start says what to do.

One local Ray instance (2 CPUs, loopback) serves the whole module; the tests that need a fresh
process (a driver killed, an address nobody answers) join it or need none.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, grey_image, halves_site, make_dicom, make_halves_classifier, ramp
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.cores import usable_cores
from cxrbatch.errors import EngineError, UsageError
from cxrbatch.models import load_models
from cxrbatch.pipeline import Result
from cxrbatch.ray_cluster import actor_count, actor_cpus, check_reachable
from cxrbatch.ray_engine import BLOCK_BATCHES, LOST, RayScreener, _same_bytes, batch_items

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's own, at import
runner = CliRunner()
CRASH_FILE = "crash-me.png"  # the actors of this module's cluster die on a file of this name
CRASH_SCRIPT = "import sys\nfrom cxrbatch.cli import app\napp(sys.argv[1:])\n"


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """The address of one local Ray instance for this module; its workers die on CRASH_FILE."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback only; the drivers started below need no token
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"CXRBATCH_CRASH_AT": f"screening {CRASH_FILE}"}},
    )
    yield context.address_info["address"]
    ray.shutdown()
    if before is None:
        del os.environ["RAY_AUTH_MODE"]
    else:
        os.environ["RAY_AUTH_MODE"] = before


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", *args])
    return result.exit_code, result.stderr


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


def _both(inputs: Path, models: Path, out: Path, *extra: str) -> tuple[dict[str, object], dict[str, object]]:
    """Run both engines over the same inputs; the CSV reports must be the same bytes."""
    docs = {}
    for engine in ("local", "ray"):
        code, err = _run(
            str(inputs), "--models", str(models), "--engine", engine, "--batch-size", "3",
            "--out", str(out / f"{engine}.csv"), "--json", str(out / f"{engine}.json"), *extra,
        )  # fmt: skip
        assert code in (0, 3), err
        docs[engine] = json.loads((out / f"{engine}.json").read_text(encoding="utf-8"))
    assert (out / "ray.csv").read_bytes() == (out / "local.csv").read_bytes()
    return docs["local"], docs["ray"]


def test_ray_writes_the_local_engines_rows_with_the_bundled_models(ray_address: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(REPO / "samples", inputs / "samples")
    grey_image(inputs / "grey.png", 110)
    (inputs / "zero.jpg").write_bytes(b"")
    local, ray = _both(inputs, REPO / "models", tmp_path)
    assert ray["results"] == local["results"] and ray["summary"]["by_status"] == local["summary"]["by_status"]
    assert ray["engine"] == {"name": "ray", "actors": 1, "gpus_per_actor": 0.0}  # 8 files, one block: one actor ran
    assert local["engine"] == {"name": "local", "threads": usable_cores()}  # one per usable core
    statuses = [r["status"] for r in ray["results"]]
    assert statuses.count("classified") >= 2 and statuses.count("rejected") >= 2 and statuses.count("error") == 1


def test_ray_reports_a_site_heads_referral_score_as_the_local_engine_does(
    ray_address: str, tiny_models: Path, tmp_path: Path
) -> None:
    films = halves_site(tmp_path / "site")
    make_halves_classifier(tiny_models / "classifier.onnx")
    args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(tmp_path / "headed"), "--site-head"]
    assert runner.invoke(app, [*args, "--target-sensitivity", "0.9"]).exit_code == 0
    local, ray = _both(films, tmp_path / "headed", tmp_path)  # the same CSV bytes from both engines
    rows = _csv(tmp_path / "ray.csv")
    assert len(rows) == 80 and all(abs(float(r["referral_score"]) - (1 - float(r["p_NORMAL"]))) > 1e-3 for r in rows)
    assert ray["models"]["classifier"]["referral_from"] == "site head" == local["models"]["classifier"]["referral_from"]


def test_ray_writes_the_same_error_rows_for_every_bad_file(
    ray_address: str, corpus: tuple[Path, dict[str, str]], tiny_models: Path, tmp_path: Path
) -> None:
    root, expect = corpus
    local, ray = _both(root, tiny_models, tmp_path)
    assert len(ray["results"]) == len(expect)
    assert [r["error"] for r in ray["results"]] == [r["error"] for r in local["results"]]


def test_a_worker_that_dies_on_a_file_costs_that_file_only(ray_address: str, tiny_models: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170, 250, 60, 90)):
        grey_image(inbox / f"img{i}.png", level)
    grey_image(inbox / CRASH_FILE, 110)
    code, err = _run(str(inbox), "--models", str(tiny_models), "--engine", "ray", "--out", str(tmp_path / "r.csv"))
    assert code == 3, err
    rows = _csv(tmp_path / "r.csv")
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in inbox.iterdir())
    lost = [r for r in rows if r["status"] == "error"]
    assert [Path(r["path"]).name for r in lost] == [CRASH_FILE] and lost[0]["error"] == LOST
    assert all(r["status"] == "classified" for r in rows if r not in lost)
    assert "screening them again one by one" in err


def test_what_ray_prints_of_a_dead_worker_stays_out_of_a_report_on_stdout(
    ray_address: str, tiny_models: Path, tmp_path: Path
) -> None:
    # Its "(raylet) A worker died ..." lines went to stdout, into the CSV being written there.
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170)):
        grey_image(inbox / f"img{i}.png", level)
    grey_image(inbox / CRASH_FILE, 110)
    result = runner.invoke(app, ["run", str(inbox), "--models", str(tiny_models), "--engine", "ray"])
    assert result.exit_code == 3, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][0] == "path" and len(rows) == 5 and {len(r) for r in rows} == {len(rows[0])}, result.stdout


def test_a_killed_driver_loses_no_file_and_the_rerun_delivers_each_once(
    ray_address: str, tiny_models: Path, tmp_path: Path
) -> None:
    inbox, ledger = tmp_path / "in", tmp_path / "l.db"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170, 250, 60)):
        grey_image(inbox / f"img{i}.png", level)
    args = ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--batch-size", "2"]
    ray_args = ["--engine", "ray", "--ray-address", ray_address]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "batch_committed"}
    first = tmp_path / "first.csv"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, *args, *ray_args, "--out", str(first), "-q"],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()
    assert not first.exists()
    code, err = _run(*args[1:], *ray_args, "--out", str(tmp_path / "second.csv"))
    assert code == 0, err
    assert "2 already screened, 3 to screen" in err  # the first run's committed batch is kept
    code, err = _run(str(inbox), "--models", str(tiny_models), "--out", str(tmp_path / "fresh.csv"))
    assert code == 0, err
    assert (tmp_path / "second.csv").read_bytes() == (tmp_path / "fresh.csv").read_bytes()  # each file once


def test_ray_not_installed_names_the_extra(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    code, err = _run(str(incoming), "--models", str(tiny_models), "--engine", "ray", "--out", str(tmp_path / "r.csv"))
    assert code == 1
    assert "the ray extra" in err and 'pip install "cxrbatch[ray]"' in err
    assert not (tmp_path / "r.csv").exists()


def test_an_address_nobody_answers_is_a_clear_error(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again before the run: nothing listens there
    args = [str(incoming), "--models", str(tiny_models), "--engine", "ray", "--out", str(tmp_path / "r.csv")]
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, "run", *args, "--ray-address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"[error] cannot reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "r.csv").exists()
    code, err = _run(*args, "--ray-address", "head-without-port")
    assert code == 2 and "expected HOST:PORT" in err
    code, err = _run(*args, "--ray-address", "ray://127.0.0.1:10001")  # Ray Client: Ray Data fails through it
    assert code == 2 and "Ray Client addresses cannot run" in err


def test_ray_options_need_the_ray_engine(tiny_models: Path, incoming: Path) -> None:
    for option in (["--actors", "2"], ["--ray-address", "127.0.0.1:6379"], ["--gpus-per-actor", "1"]):
        code, err = _run(str(incoming), "--models", str(tiny_models), *option)
        assert code == 2 and f"{option[0]} needs --engine ray" in err
    code, err = _run(str(incoming), "--models", str(tiny_models), "--engine", "ray", "--device", "cuda")
    assert code == 2 and "--gpus-per-actor" in err


def test_more_actors_than_the_cluster_holds_is_refused(ray_address: str, tiny_models: Path, incoming: Path) -> None:
    code, err = _run(str(incoming), "--models", str(tiny_models), "--engine", "ray", "--actors", "3")
    assert code == 2 and "--actors 3: the Ray cluster has room for 2 (2 CPUs, 0 GPUs)" in err
    code, err = _run(str(incoming), "--models", str(tiny_models), "--engine", "ray", "--gpus-per-actor", "0.5")
    assert code == 1 and "--gpus-per-actor 0.5: the Ray cluster has 0 GPUs" in err


def test_actor_count_follows_the_clusters_cpus_and_gpus() -> None:
    assert actor_count({"CPU": 16.0}, None, 0.0, 1) == 16
    assert actor_count({"CPU": 16.0, "GPU": 1.0}, None, 0.25, 1) == 4
    assert actor_count({"CPU": 2.0, "GPU": 1.0}, None, 0.25, 1) == 2  # each GPU actor needs a CPU too
    assert actor_count({"CPU": 4.0, "GPU": 1.0}, None, 0.25, actor_cpus(0.25, 2)) == 2  # two worker threads each
    assert actor_count({"CPU": 16.0}, 3, 0.0, actor_cpus(0.0, 4)) == 3  # a CPU actor takes one CPU
    with pytest.raises(UsageError):
        actor_count({"CPU": 2.0}, 3, 0.0, 1)
    with pytest.raises(EngineError):
        actor_count({"CPU": 0.0}, None, 0.0, 1)


def test_results_after_a_lost_block_are_passed_on_before_its_files_are_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a ledger, what is passed on is what gets committed: results waiting behind a lost block
    # until the retries ended were all lost with a driver killed meanwhile.
    paths = [Path(f"/in/{i}.png") for i in range(6)]
    screener = object.__new__(RayScreener)
    screener.batch_size = 1
    passed_on: list[Path] = []
    at_retry: list[int] = []

    def results(self: RayScreener, ps: list[Path], items: list[dict], per_block: int) -> Iterator[tuple[int, Result]]:
        if per_block == BLOCK_BATCHES:  # the first pass: the block holding file 0 was lost, file 3's came twice
            for i in (1, 2, 3, 3, 4, 5):
                yield i, Result(ps[i], "classified")
        else:
            at_retry.append(len(passed_on))
            for item in items:
                yield item["first"], Result(ps[item["first"]], "rejected")

    monkeypatch.setattr(RayScreener, "_results", results)
    out = list(screener.screen(paths, lambda r: passed_on.append(r.path)))
    assert at_retry == [5]  # every result of the first pass was passed on before the retry
    assert [r.path for r in out] == [*paths[1:], paths[0]] == passed_on  # each once, the lost file last
    assert [r.status for r in out] == ["classified"] * 5 + ["rejected"]


def test_actors_get_the_model_bytes_the_reports_name(tiny_models: Path) -> None:
    gate, _ = load_models(tiny_models, "cpu")
    assert _same_bytes(gate) == (tiny_models / "gate.onnx").read_bytes()
    (tiny_models / "gate.onnx").write_bytes(b"replaced after loading")
    with pytest.raises(EngineError, match="changed since this run loaded it"):
        _same_bytes(gate)


def test_each_ray_item_is_one_local_batch_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray split the files into even blocks (10, 12, 10 ...) that actors cut into batches from
    # their own start: batches unlike the local engine's moved a referral score in its sixth
    # decimal; and a relative path was opened from the actor's working folder, not the driver's.
    monkeypatch.chdir(tmp_path)
    paths = [Path(f"in/f{i}.png") for i in range(7)]
    items = batch_items(paths, range(7), 3)
    assert [item["first"] for item in items] == [0, 3, 6]
    assert items[1]["paths"].split(b"\0") == [os.fsencode(tmp_path / f"in/f{i}.png") for i in (3, 4, 5)]
    assert [len(item["paths"].split(b"\0")) for item in items] == [3, 3, 1]
    assert [item["first"] for item in batch_items(paths, [2, 5], 1)] == [2, 5]  # files sent again, one each
    with pytest.raises(ValueError, match="consecutive"):
        batch_items(paths, [2, 5], 2)


def test_ray_rows_match_the_local_engines_over_several_blocks_from_a_relative_folder(
    ray_address: str, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    for i in range(29):  # batch size 2, four batches a block: four blocks, the last one short
        grey_image(tmp_path / "in" / f"f{i:02d}.png", 40 + 7 * i)
    (tmp_path / "in" / "f07.png").write_bytes(b"not a png")  # an error row inside a batch
    monkeypatch.chdir(tmp_path)
    docs = {}
    for engine in ("local", "ray"):
        code, err = _run(
            "in", "--models", str(tiny_models), "--engine", engine, "--batch-size", "2", "--out", f"{engine}.csv",
        )  # fmt: skip
        assert code == 3, err
        docs[engine] = (tmp_path / f"{engine}.csv").read_bytes()
    assert docs["ray"] == docs["local"]
    assert docs["ray"].count(b"\n") == 30 and b"in/f07.png,error" in docs["ray"]


def test_an_address_that_is_no_ray_cluster_is_refused_at_once(tmp_path: Path) -> None:
    # A web server (the dashboard's port, say) accepted the connection, and ray.init then
    # retried it for ever: a cron run hung until `timeout` killed it.
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EngineError, match=r"answers, but not as a Ray cluster: give the head's GCS port"):
            check_reachable("127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()


def test_a_path_through_a_link_and_dotdot_is_the_file_the_local_engine_reads(
    ray_address: str, tiny_models: Path, tmp_path: Path
) -> None:
    # top/link -> real/sub: the kernel reads top/link/../incoming/film.png as real/incoming/film.png;
    # os.path.abspath makes it top/incoming/film.png, another film.
    for folder in ("real/sub", "real/incoming", "top/incoming"):
        (tmp_path / folder).mkdir(parents=True)
    grey_image(tmp_path / "real" / "incoming" / "film.png", 20)
    grey_image(tmp_path / "top" / "incoming" / "film.png", 250)
    (tmp_path / "top" / "link").symlink_to(tmp_path / "real" / "sub")
    inputs = str(tmp_path / "top" / "link" / ".." / "incoming")
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.csv"
        code, err = _run(inputs, "--models", str(tiny_models), "--engine", engine, "--out", str(out))
        assert code == 0, err
    assert _csv(tmp_path / "ray.csv") == _csv(tmp_path / "local.csv")


def test_a_decoders_warning_reaches_the_runs_log_under_ray(ray_address: str, tiny_models: Path, tmp_path: Path) -> None:
    # The local engine logs it from its threads and from its decoding processes (test_dicom.py);
    # the actors' lines were dropped.
    folder = tmp_path / "incoming"
    folder.mkdir()
    make_dicom(folder / "mf.dcm", np.stack([ramp(), ramp()[::-1]]))
    code, err = _run(str(folder), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv"), "--engine", "ray")
    assert code == 0, err
    assert "mf.dcm: multi-frame DICOM (2 frames): screening the first frame only" in err


def test_the_json_engine_record_names_the_actors_that_ran(
    ray_address: str, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.data

    sizes: list[int] = []
    real = ray.data.ActorPoolStrategy

    def recording(*args: object, **kwargs: object) -> object:
        sizes.append(int(kwargs["size"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)

    monkeypatch.setattr(ray.data, "ActorPoolStrategy", recording)
    (tmp_path / "in").mkdir()
    for i in range(3):
        grey_image(tmp_path / "in" / f"f{i}.png", 40 + 50 * i)
    out = tmp_path / "r.json"
    code, err = _run(str(tmp_path / "in"), "--models", str(tiny_models), "--engine", "ray", "--json", str(out))
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["engine"]
    assert record["actors"] == max(sizes), (record, sizes)
