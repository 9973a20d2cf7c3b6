"""The command line, read like its documentation: commands, exit codes and messages."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from helpers import grey_image
from typer.testing import CliRunner

from cxrbatch.cli import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_every_command_has_help() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"run", "ledger", "train", "export", "evaluate", "probe", "quantize", "half"} <= set(commands)
    for name in commands:
        code, out, _ = _run(name, "--help")
        assert code == 0, name
        assert f"Example: cxrbatch {name}" in out, name


def test_every_subcommand_has_help_with_an_example() -> None:
    groups = {n: c for n, c in typer.main.get_command(app).commands.items() if hasattr(c, "commands")}  # type: ignore[attr-defined]
    assert {"data", "lungs"} <= set(groups)
    for group, command in groups.items():
        for name in command.commands:
            code, out, _ = _run(group, name, "--help")
            assert code == 0, (group, name)
            assert f"Example: cxrbatch {group} {name}" in " ".join(out.split()), (group, name)


def test_every_option_has_help_text_and_shows_its_default() -> None:
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} {param.opts[0]} has no help text"
                if param.default not in (None, False) and not param.required:
                    assert param.show_default, f"{name} {param.opts[0]} hides its default"


def test_train_help_states_the_defaults_of_each_role() -> None:
    from cxrbatch.extras import export_module

    defaults = export_module("config").DEFAULTS  # no TensorFlow needed to read them
    gate, classifier = defaults["gate"], defaults["classifier"]
    _, out, _ = _run("train", "--help")
    text = " ".join(out.split())
    assert f"(default: gate {gate.size}, classifier {classifier.size})" in text
    assert f"(default: gate {gate.views}, classifier {classifier.views})" in text
    assert f"(default: {gate.epochs1})" in text and gate.epochs1 == classifier.epochs1
    assert f"(default: gate {gate.epochs2}, classifier {classifier.epochs2})" in text
    assert f"(default: gate {gate.zoom_out:g}, classifier {classifier.zoom_out:g})" in text
    assert f"(default: gate {gate.lr2:g}, classifier {classifier.lr2:g})" in text
    assert f"(default: {classifier.label_smoothing:g})" in text
    assert f"(default: {classifier.crop_area:g})" in text and gate.crop_area == classifier.crop_area
    assert f"(default: {classifier.negative_label})" in text
    assert "[default: 1234]" in text and "ROLE which model to train: gate or classifier" in text


def test_run_help_documents_exit_codes() -> None:
    _, out, _ = _run("run", "--help")
    text = " ".join(out.split())
    assert "3 finished, but some files could not be read" in text
    assert "run [OPTIONS] {INPUT...}" in text  # one or more inputs
    workers_help = "--workers <int range> threads that decode and screen batches side by side"
    assert f"{workers_help} (default: one per usable core, or one per decoding process if --decoders is more;" in text
    assert "--decoders <int range> processes that decode the files" in text


def test_run_writes_csv_and_json_and_exits_3_on_bad_file(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    report, doc = tmp_path / "r.csv", tmp_path / "r.json"
    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--out", str(report), "--json", str(doc))
    assert code == 3
    assert "6 files: 4 classified, 1 rejected, 1 error" in err
    rows = list(csv.DictReader(report.open(encoding="utf-8")))
    assert len(rows) == 6
    assert {r["status"] for r in rows} == {"classified", "rejected", "error"}
    data = json.loads(doc.read_text(encoding="utf-8"))
    assert data["summary"]["files"] == 6 and len(data["results"]) == 6


def test_clean_folder_exits_0_and_csv_to_stdout(tiny_models: Path, incoming: Path) -> None:
    (incoming / "f_broken.jpg").unlink()
    code, out, err = _run("run", str(incoming), "--models", str(tiny_models), "--quiet")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [Path(r["path"]).name for r in rows] == [
        "a_dark.png",
        "b_mid.jpg",
        "e_photo.png",
        "c_light.PNG",
        "d_white.jpeg",
    ]
    assert "5 files: 4 classified, 1 rejected, 0 error" in err


def test_reports_are_byte_identical_across_runs(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    outputs = []
    for i, batch in enumerate(("1", "32")):
        target = tmp_path / f"r{i}.csv"
        _run("run", str(incoming), "--models", str(tiny_models), "--out", str(target), "--batch-size", batch)
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]


def test_missing_input_is_usage_error_2(tiny_models: Path, tmp_path: Path) -> None:
    code, _, err = _run("run", str(tmp_path / "nowhere"), "--models", str(tiny_models))
    assert code == 2
    assert "[error] Input not found:" in err
    assert "Traceback" not in err


def test_missing_models_is_fatal_1(incoming: Path, tmp_path: Path) -> None:
    code, _, err = _run("run", str(incoming), "--models", str(tmp_path))
    assert code == 1
    assert "[error] Gate model not found:" in err


def test_unwritable_output_is_fatal_1_before_screening(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "no" / "r.csv"))
    assert code == 1
    assert "Cannot write report" in err


def test_cuda_without_cuda_is_fatal_1(tiny_models: Path, incoming: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--device", "cuda")
    assert code == 1 and "CUDA was requested" in err


def test_bad_option_values_are_usage_errors(tiny_models: Path, incoming: Path) -> None:
    assert _run("run", str(incoming), "--device", "tpu")[0] == 2
    assert _run("run", str(incoming), "--batch-size", "0")[0] == 2


def test_run_does_not_import_tensorflow_or_ray(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cxrbatch.cli import app\n"
        "try:\n"
        f'    app(["run", {str(incoming)!r}, "--models", {str(tiny_models)!r}, "--quiet",\n'
        f'         "--out", {str(tmp_path / "r.csv")!r}])\n'
        "except SystemExit as e:\n"
        "    assert e.code == 3, e.code\n"
        "heavy = ('tensorflow', 'keras', 'tf2onnx', 'export', 'cxrbatch_export', 'ray', 'pyarrow')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print('IMPORTED:' + ','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED:\n" in proc.stdout
    assert (tmp_path / "r.csv").is_file()


def test_framing_options_refuse_values_out_of_range(tiny_models: Path, tmp_path: Path) -> None:
    code, _, err = _run("train", "classifier", str(tmp_path), "--out", str(tmp_path / "c.keras"), "--zoom-out", "1.5")
    assert code == 2 and "--zoom-out" in err
    code, _, err = _run("train", "gate", str(tmp_path), "--out", str(tmp_path / "g.keras"), "--crop-area", "0.05")
    assert code == 2 and "--crop-area" in err
    code, _, err = _run("evaluate", str(tmp_path), "--models", str(tiny_models), "--frame", "0.3")
    assert code == 2 and "--frame" in err


def test_referral_columns_in_both_reports_and_the_summary(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    report, doc, ledger = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "l.db"
    args = ["run", str(incoming), "--models", str(tiny_models), "--out", str(report), "--json", str(doc)]
    code, _, err = _run(*args, "--ledger", str(ledger))
    assert code == 3 and "(1 COVID19, 1 NORMAL, 1 PNEUMONIA, 1 TUBERCULOSIS); 3 referred, 1 cleared" in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(report.open(encoding="utf-8"))}
    assert list(rows["a_dark.png"])[-4:] == ["referral_score", "refer", "familiarity", "unfamiliar"]
    assert rows["b_mid.jpg"]["refer"] == "false" and rows["a_dark.png"]["refer"] == "true"
    assert float(rows["b_mid.jpg"]["referral_score"]) == pytest.approx(
        1 - float(rows["b_mid.jpg"]["p_NORMAL"]), abs=2e-6
    )
    assert rows["e_photo.png"]["referral_score"] == "" and rows["f_broken.jpg"]["refer"] == ""
    data = json.loads(doc.read_text(encoding="utf-8"))
    assert data["summary"]["referral"] == {"referred": 3, "cleared": 1, "unfamiliar": 0}
    assert {r["refer"] for r in data["results"]} == {True, False, None}
    again = tmp_path / "again.csv"  # re-delivered from the ledger: the same referral cells
    code, _, _ = _run(*args[:4], "--ledger", str(ledger), "--report-all", "--out", str(again))
    assert code == 3  # the unreadable film is still in the folder
    assert again.read_text(encoding="utf-8").splitlines()[1:] == report.read_text(encoding="utf-8").splitlines()[1:]


# The console script ends without the interpreter's teardown once a command is done
# (`cxrbatch.cli._end_without_teardown`). Each script below runs `main()` as the console script
# does, with an object whose finaliser writes TEARDOWN only if the teardown happens.
_ENTRY = (
    "import atexit, sys, threading, time\n"
    "from cxrbatch.cli import main\n"
    "class Witness:\n"
    "    def __del__(self):\n"
    "        sys.stderr.write('TEARDOWN\\n')\n"
    "witness = Witness()\n"
    "atexit.register(lambda: print('EXIT-HANDLER'))\n"
)


def _entry(tmp_path: Path, before_main: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = _ENTRY + before_main + f"sys.argv = ['cxrbatch', *{list(args)!r}]\nmain()\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_console_script_skips_the_teardown_but_not_the_exit_handlers_or_the_exit_code(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    done = _entry(tmp_path, "", "run", str(incoming), "--models", str(tiny_models), "--out", "-", "-q")
    assert done.returncode == 3, done.stderr  # f_broken.jpg
    assert "TEARDOWN" not in done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout.replace("EXIT-HANDLER\n", ""))))
    assert sorted(Path(r["path"]).name for r in rows) == [
        "a_dark.png",
        "b_mid.jpg",
        "c_light.PNG",
        "d_white.jpeg",
        "e_photo.png",
        "f_broken.jpg",
    ]
    assert done.stdout.endswith("EXIT-HANDLER\n")  # the handlers ran after the report was flushed
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, code in (((str(empty),), 5), (("--batch-size", "0", str(incoming)), 2)):
        done = _entry(tmp_path, "", "run", *args, "--models", str(tiny_models), "-q")
        assert done.returncode == code, done.stderr
        assert "TEARDOWN" not in done.stderr


def test_console_script_waits_for_a_running_thread_and_keeps_an_exit_message(tmp_path: Path) -> None:
    late = "threading.Thread(target=lambda: (time.sleep(0.3), print('THREAD-DONE'))).start()\n"
    done = _entry(tmp_path, late, "--version")
    assert done.returncode == 0, done.stderr
    assert "THREAD-DONE" in done.stdout and "EXIT-HANDLER" in done.stdout
    assert "TEARDOWN" in done.stderr  # the normal exit, which waits for the thread
    plain = _entry(tmp_path, "", "--version")
    assert plain.returncode == 0 and plain.stdout.startswith("cxrbatch ") and "TEARDOWN" not in plain.stderr
    message = _entry(tmp_path, "import typer\ntyper.Typer.__call__ = lambda *a, **k: sys.exit('stopped: why')\n")
    assert message.returncode == 1 and "stopped: why" in message.stderr


@pytest.mark.parametrize("closed", [">&-", "2>&-"])
def test_console_script_with_a_closed_stream_keeps_its_exit_code(closed: str) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", f'"$0" -m cxrbatch.cli --version {closed}; echo "rc=$?" >&2', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr.splitlines()[-1] == "rc=0", done.stderr  # the shell's own stderr is open


def test_console_script_under_a_profiler_lets_it_write_its_results(tmp_path: Path) -> None:
    profile = tmp_path / "run.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "cxrbatch.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert profile.is_file() and profile.stat().st_size > 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is new in Python 3.12")
def test_console_script_under_a_monitoring_tool_takes_the_normal_exit(tmp_path: Path) -> None:
    # From Python 3.12 cProfile, and coverage's sysmon core, watch through sys.monitoring, which
    # sys.getprofile() and sys.gettrace() do not show: the script skipped the teardown in which
    # they write their results (cProfile's -o file was never written).
    watch = "sys.monitoring.use_tool_id(sys.monitoring.COVERAGE_ID, 'a coverage tool')\n"
    done = _entry(tmp_path, watch, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cxrbatch ") and "TEARDOWN" in done.stderr


def test_the_study_commands_json_on_stdout_is_stdout_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `loco --json -` printed the JSON and then the table on stdout, `probe --json -` its JSON twice.
    import json
    import types

    from cxrbatch.cli import modelling
    from cxrbatch.extras import export_module

    fakes = {
        "loco": types.SimpleNamespace(study=lambda *args: {"folds": 1}, format_study=lambda record: "THE TABLE"),
        "probe": types.SimpleNamespace(probe=lambda *args: {"accuracy": 0.5}),
    }
    monkeypatch.setattr(modelling, "export_module", lambda name: fakes.get(name) or export_module(name))
    (tmp_path / "tree").mkdir()
    checkpoint = tmp_path / "c.keras"
    checkpoint.write_bytes(b"")
    for args, record in (
        (["loco", str(tmp_path / "tree"), "--json", "-"], {"folds": 1}),
        (["probe", str(checkpoint), str(tmp_path / "tree"), "--json", "-"], {"accuracy": 0.5}),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout) == record, result.stdout
        assert ("THE TABLE" in result.stderr) == (args[0] == "loco")  # loco's table, shown on stderr


def test_run_with_stderr_closed_writes_its_report(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    # `--version 2>&-` is covered (test_cli); `run` without -q looks at sys.stderr.isatty(), and
    # sys.stderr is None when descriptor 2 is closed.
    out = tmp_path / "r.csv"
    done = subprocess.run(
        [
            "/bin/sh",
            "-c",
            '"$0" -m cxrbatch.cli run "$1" --models "$2" --out "$3" 2>&-; echo "rc=$?"',
            sys.executable,
            *(str(incoming), str(tiny_models), str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip().splitlines()[-1] == "rc=3" and out.is_file(), done.stdout


@pytest.mark.parametrize(("signum", "code", "name"), [(15, 143, "SIGTERM"), (2, 130, "SIGINT"), (1, 129, "SIGHUP")])
def test_a_stopped_run_says_so_in_its_log(
    signum: int, code: int, name: str, tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    # cron's `timeout` (SIGTERM) or Ctrl-C stopped the run with the right code, but the log's last
    # line was `screened 6/6`: no summary and no word of why, as if the run were still going.
    out = tmp_path / "r.csv"
    env = {**os.environ, "CXRBATCH_CRASH_AT": "writing r.csv", "CXRBATCH_CRASH_SIGNAL": str(signum)}
    args = ["run", str(incoming), "--models", str(tiny_models), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        # as a shell starts it: the tests themselves may run with the signal ignored (under nohup,
        # or in a script's background job, which ignores SIGINT), and a run keeps an ignored signal
        preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL),
    )
    assert done.returncode == code and not out.exists(), done.stderr
    last = done.stderr.splitlines()[-1]
    assert f"[error] stopped by {name} (exit {code})" in last, done.stderr


def test_a_run_started_with_nohup_goes_on_after_a_hangup(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    # SIGHUP (the terminal or ssh session that started the run closing) ends a run as SIGTERM does,
    # with its clean-up, unless the run was started not to hear it (nohup): then it finishes.
    out = tmp_path / "r.csv"
    env = {**os.environ, "CXRBATCH_CRASH_AT": "writing r.csv", "CXRBATCH_CRASH_SIGNAL": str(signal.SIGHUP.value)}
    args = ["run", str(incoming), "--models", str(tiny_models), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert done.returncode == 3 and out.exists(), done.stderr  # 3: the incoming folder holds a broken file
    assert "stopped by" not in done.stderr


@pytest.mark.parametrize("option", ["--out", "--json", "--html"])
def test_a_report_on_stdout_is_utf8_whatever_the_locale(
    option: str, tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    # The report files are UTF-8; on stdout the report went out in the locale's encoding: under
    # an ASCII or Latin-1 locale a film named in another script ended the run after screening in
    # a traceback (UnicodeEncodeError, exit 1, no report), and a Latin-1 one gave Latin-1 bytes.
    (incoming / "f_broken.jpg").unlink()
    grey_image(incoming / "胸部 ü.png", 90)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    args = ["run", str(incoming), "--models", str(tiny_models), option, "-", "-q"]
    done = subprocess.run([sys.executable, "-m", "cxrbatch.cli", *args], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert "胸部 ü.png" in done.stdout.decode("utf-8")
    if option == "--out":
        assert {Path(r["path"]).name for r in csv.DictReader(io.StringIO(done.stdout.decode("utf-8")))} >= {
            "胸部 ü.png"
        }


@pytest.mark.parametrize("option", ["--out", "--json"])
def test_run_with_stdout_closed_refuses_a_report_on_stdout_before_screening(
    option: str, tiny_models: Path, incoming: Path
) -> None:
    # sys.stdout is None when descriptor 1 is closed (`>&-`): the run screened everything, then
    # ended in a traceback (AttributeError: 'NoneType' object has no attribute 'write').
    done = subprocess.run(
        [
            "/bin/sh",
            "-c",
            f'"$0" -m cxrbatch.cli run "$1" --models "$2" {option} - >&-; echo "rc=$?" >&2',
            sys.executable,
            *(str(incoming), str(tiny_models)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr.splitlines()[-1] == "rc=1", done.stderr
    assert "Traceback" not in done.stderr
    assert "[error] Cannot write the report to stdout: it is closed" in done.stderr
    assert "screened" not in done.stderr  # refused before screening, as an unwritable report file is


def test_a_named_film_the_run_may_not_read_is_an_error_row_not_a_refused_run(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # typer's Path check refused the whole run for it (exit 2, no report: a code the exit-code
    # table's monitoring advice does not alert on); in a folder the same film is one error row.
    # Tests run as root in CI: simulate what access() and open() say to another user.
    good, locked = grey_image(tmp_path / "a.png", 110), grey_image(tmp_path / "locked.png", 110)
    real_access, real_open = os.access, open

    def deny(file: object, *args: object, **kwargs: object) -> object:
        if file == locked:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    monkeypatch.setattr("builtins.open", deny)
    out = tmp_path / "r.csv"
    code, _, err = _run("run", str(good), str(locked), "--models", str(tiny_models), "--out", str(out))
    assert code == 3, err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["a.png"]["status"] == "classified" and rows["locked.png"]["error"] == "permission denied"


def test_an_empty_input_is_refused_not_taken_for_the_current_folder(
    tiny_models: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an unset variable in a cron line (cxrbatch run "$INCOMING") screened the folder it ran in
    monkeypatch.chdir(incoming)
    code, out, err = _run("run", "", "--models", str(tiny_models))
    assert code == 2 and "an empty name names no file or folder" in err and out == ""


def _out_of_memory_in_onnxruntime(*args: object, **kwargs: object) -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    raise Fail(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Status Message: "
        "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) "
        "Failed to allocate memory for requested buffer of size 38535168"
    )


def test_out_of_memory_in_another_command_names_that_command_not_screening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every command's MemoryError became "Out of memory while screening …: lower --batch-size or
    # --workers", options `train`, `evaluate` or `ledger` do not have
    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr("cxrbatch.ledger_view.inspect", no_memory)
    (tmp_path / "l.db").write_bytes(b"")
    code, _, err = _run("ledger", str(tmp_path / "l.db"))
    assert code == 1 and "[error] Out of memory in cxrbatch ledger (an allocation failed)" in err, err
    assert "--batch-size" not in err and "screening" not in err


def test_an_unexpected_failure_is_an_error_line_before_its_traceback(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault of cxrbatch itself (a bug) printed a traceback and nothing else: a cron log grepped for
    # [error], or read for its last timestamped line, showed the night's progress and no failure.
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "ok.csv"))
    assert code == 3 and "[error]" not in err  # the end of a run (typer.Exit) is no failure
    for usage in (["run"], ["run", str(incoming), "--batch-size", "0"], ["no-such-command"]):
        assert "unexpected failure" not in _run(*usage)[2], usage  # nor a usage error (exit 2)
    monkeypatch.setattr("cxrbatch.pipeline.Screener.gate_scores", boom)
    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv"))
    assert code == 1 and not (tmp_path / "r.csv").exists()
    assert "[error] unexpected failure (RuntimeError: boom): a fault of cxrbatch, not of a film" in err, err


def _out_of_memory_in_numpy(*args: object, **kwargs: object) -> None:
    raise MemoryError("Unable to allocate 1.53 MiB for an array with shape (8, 224, 224, 1) and data type float32")


@pytest.mark.parametrize(
    ("target", "fault"),
    [
        ("onnxruntime.InferenceSession.run", _out_of_memory_in_onnxruntime),
        ("cxrbatch.pipeline.Screener.gate_scores", _out_of_memory_in_numpy),
    ],
)
def test_a_run_out_of_memory_ends_in_a_line_that_says_so_not_a_traceback(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, fault: object
) -> None:
    """`ulimit -v` or a container's memory limit: the cron mail gets one [error] line and exit 1."""
    monkeypatch.setattr(target, fault)
    code, _, err = _run("run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv"))
    assert code == 1
    assert "[error] Out of memory" in err
    assert "--batch-size" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.csv").exists()
