"""Site calibration: the threshold search, its refusals, and calibrate -> run end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import colour_image, grey_image, halves_image, halves_models, make_gate
from typer.testing import CliRunner

from cxrbatch.calibration import MIN_FILMS, choose_threshold, min_abnormal
from cxrbatch.cli import app
from cxrbatch.errors import UsageError
from cxrbatch.models import load_models, read_metadata

runner = CliRunner()


def test_threshold_reaches_the_target_with_95_percent_confidence() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 200)
    exact = np.sort(scores)[::-1][math.ceil(0.9 * 200) - 1]  # the point estimate: 180 of 200 at or above
    chosen = choose_threshold(scores, 0.9)
    assert chosen < exact  # the margin: a lower threshold than the sample alone would give
    assert (scores >= chosen).mean() >= 0.9
    assert chosen == math.floor(chosen * 1e6) / 1e6  # six decimals, rounded down
    hits = 0
    for _ in range(400):  # coverage: on uniform scores, the true sensitivity of t is 1 - t
        hits += 1 - choose_threshold(rng.uniform(0, 1, 60), 0.95) >= 0.95
    assert hits / 400 >= 0.93  # 95 % by construction, less the simulation's own noise
    with pytest.raises(UsageError):
        choose_threshold(scores, 1.0)


def test_too_few_abnormal_films_for_the_target_are_refused() -> None:
    assert min_abnormal(0.95) == 59 and min_abnormal(0.90) == 29 and min_abnormal(0.5) == MIN_FILMS
    with pytest.raises(UsageError, match=r"58 abnormal films cannot show a sensitivity of 0\.95 .* at least 59"):
        choose_threshold(np.linspace(0, 1, 58), 0.95)
    assert choose_threshold(np.linspace(0, 1, 59), 0.95) == 0.0  # with 59, only the lowest score will do


def _site(root: Path, normal: int = 24, abnormal: int = 30) -> Path:
    """Labelled films for the tiny classifier: mid-grey NORMALs, dark COVID19s and light PNEUMONIAs."""
    for label, levels in (
        ("NORMAL", np.linspace(82, 112, normal)),
        ("COVID19", np.linspace(20, 72, abnormal // 2)),
        ("PNEUMONIA", np.linspace(124, 200, abnormal - abnormal // 2)),
    ):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, level in enumerate(levels):
            grey_image(root / label / f"{label.lower()}{i:02d}.png", int(level))
    return root


def test_calibrate_then_run_with_the_site_models(tiny_models: Path, tmp_path: Path) -> None:
    films, out = _site(tmp_path / "site"), tmp_path / "site-models"
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out),
                                 "--target-sensitivity", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "calibration films: COVID19 15, NORMAL 24, PNEUMONIA 15" in result.stdout
    meta = read_metadata(out / "classifier.onnx")
    record = meta["calibration"]
    assert meta["referral_threshold"] == record["threshold"] and record["target"] == 0.9
    assert record["sensitivity"] >= 0.9 and record["counts"] == {"COVID19": 15, "NORMAL": 24, "PNEUMONIA": 15}
    assert record["sensitivity_ci"][0] <= record["sensitivity"] <= record["sensitivity_ci"][1]
    assert f"referral threshold {record['threshold']:.6f}" in result.stdout
    assert (out / "gate.onnx").read_bytes() == (tiny_models / "gate.onnx").read_bytes()
    _, calibrated = load_models(out, "cpu")
    report = tmp_path / "r.csv"
    code = runner.invoke(app, ["run", str(films), "--models", str(out), "--out", str(report)]).exit_code
    assert code == 0
    rows = list(csv.DictReader(report.open(encoding="utf-8")))
    assert {r["classifier_model"] for r in rows} == {calibrated.short_hash}
    for row in rows:
        assert row["refer"] == ("true" if float(row["referral_score"]) >= record["threshold"] else "false")
    abnormal = [r for r in rows if "normal" not in Path(r["path"]).name]
    assert sum(r["refer"] == "true" for r in abnormal) / len(abnormal) == pytest.approx(record["sensitivity"])


def test_a_site_with_normal_and_abnormal_reads_only_calibrates(tiny_models: Path, tmp_path: Path) -> None:
    films, out = _site(tmp_path / "site"), tmp_path / "site-models"
    (films / "COVID19").rename(films / "ABNORMAL")  # the reads name no class
    for level in np.linspace(124, 200, 15):  # and the PNEUMONIA films join them
        grey_image(films / "ABNORMAL" / f"light{int(level)}.png", int(level))
    for p in (films / "PNEUMONIA").iterdir():
        p.unlink()
    (films / "PNEUMONIA").rmdir()
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out),
                                 "--target-sensitivity", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "calibration films: ABNORMAL 30, NORMAL 24" in result.stdout
    record = read_metadata(out / "classifier.onnx")["calibration"]
    assert record["counts"] == {"ABNORMAL": 30, "NORMAL": 24} and record["sensitivity"] >= 0.9
    assert record["specificity"] == 1.0  # the tiny model's mid-grey NORMALs all score below dark and light films


def test_calibration_refusals_write_nothing(tiny_models: Path, tmp_path: Path) -> None:
    def calibrate(films: Path, out: Path, *extra: str) -> tuple[int, str]:
        args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out), "--target-sensitivity", "0.9"]
        result = runner.invoke(app, [*args, *extra])
        return result.exit_code, result.stderr

    few = _site(tmp_path / "few", normal=MIN_FILMS - 1)
    code, err = calibrate(few, tmp_path / "o1")
    assert code == 2 and f"needs at least 29 abnormal and {MIN_FILMS} NORMAL films, found 30 abnormal and 19" in err
    unknown = _site(tmp_path / "unknown")
    (unknown / "EFFUSION").mkdir()
    code, err = calibrate(unknown, tmp_path / "o2")
    assert code == 2 and "folder(s) ['EFFUSION'] are not labels of the classifier" in err
    photo = _site(tmp_path / "photo")
    colour_image(photo / "NORMAL" / "holiday.png")
    code, err = calibrate(photo, tmp_path / "o3")
    assert code == 2 and "1 film(s) cannot be used for calibration: NORMAL/holiday.png: rejected by the gate" in err
    copied = _site(tmp_path / "copied")
    (copied / "PNEUMONIA" / "again.png").write_bytes((copied / "PNEUMONIA" / "pneumonia00.png").read_bytes())
    code, err = calibrate(copied, tmp_path / "o4")
    assert code == 2 and "the same film is there twice (PNEUMONIA/again.png and PNEUMONIA/pneumonia00.png)" in err
    linked = _site(tmp_path / "linked")
    (linked / "NORMAL" / "more").symlink_to(linked / "COVID19")  # a folder of one label linked into another
    code, err = calibrate(linked, tmp_path / "o5")
    assert code == 2 and "COVID19/covid1900.png and NORMAL/more/covid1900.png" in err and "and 10 more" in err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5"))
    good, existing = _site(tmp_path / "good"), tmp_path / "existing"
    existing.mkdir()
    code, err = calibrate(good, existing)
    assert code == 2 and "exists; choose another folder or pass --force" in err and not list(existing.iterdir())
    code, _ = calibrate(good, existing, "--force")
    assert code == 0 and sorted(p.name for p in existing.iterdir()) == ["classifier.onnx", "gate.onnx"]


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from cxrbatch.cli import app
app(sys.argv[2:])
"""


def test_a_calibration_that_fails_while_writing_leaves_the_old_models_whole(tiny_models: Path, tmp_path: Path) -> None:
    films, out = _site(tmp_path / "site"), tmp_path / "site-models"
    args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out), "--target-sensitivity", "0.9"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other-models"  # another gate: the pair left behind was the new gate beside the old classifier
    shutil.copytree(tiny_models, other)
    make_gate(other / "gate.onnx", threshold=0.45)
    assert (other / "gate.onnx").read_bytes() != before["gate.onnx"]
    limit = (other / "gate.onnx").stat().st_size + 8  # the gate fits, the calibrated classifier does not
    assert len(before["classifier.onnx"]) > limit
    args[args.index("--models") + 1] = str(other)
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), *args, "--force"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 1 and "File too large" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file, no truncated model


def test_an_out_that_cannot_take_the_models_is_refused_before_screening(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch import calibration

    films, a_file = _site(tmp_path / "site"), tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    screened: list[Path] = []
    monkeypatch.setattr(calibration, "calibrate", lambda folder, *rest: screened.append(folder))
    for out, message in ((a_file, "is a file, not a folder"), (tiny_models, "holds the models being calibrated")):
        args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out), "--force"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr
    assert screened == [] and a_file.read_text(encoding="utf-8") == "mine"


def test_calibrating_into_the_models_own_folder_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    films = _site(tmp_path / "site")
    before = (tiny_models / "classifier.onnx").read_bytes()
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(tiny_models),
                                 "--force", "--target-sensitivity", "0.9"])  # fmt: skip
    assert result.exit_code == 2 and "holds the models being calibrated" in result.stderr
    assert (tiny_models / "classifier.onnx").read_bytes() == before


def test_a_calibrated_model_checks_a_night_against_its_calibration_films(tiny_models: Path, tmp_path: Path) -> None:
    models = halves_models(tmp_path, tiny_models / "gate.onnx")
    site = tmp_path / "site"  # half of the site's films are unlike the flat training films (split halves)
    for label, levels in (("NORMAL", np.linspace(82, 112, 24)), ("PNEUMONIA", np.linspace(150, 200, 30))):
        (site / label).mkdir(parents=True)
        for i, level in enumerate(levels):
            spread = 30 if i % 2 else 0
            halves_image(site / label / f"{label.lower()}{i:02d}.png", int(level) + spread, int(level) - spread)
    out = tmp_path / "site-models"
    result = runner.invoke(app, ["calibrate", str(site), "--models", str(models), "--out", str(out),
                                 "--target-sensitivity", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "unfamiliar films: 27 of 54" in result.stdout
    assert read_metadata(out / "classifier.onnx")["calibration"]["unfamiliar"] == 27
    split = tmp_path / "split-night"
    split.mkdir()
    for i in range(20):
        halves_image(split / f"s{i:02d}.png", 120 + 2 * i, 60)
    stderr = {}
    for night, folder, warned in (("site", site, False), ("split", split, True)):
        for models_dir, expect in ((out, warned), (models, True)):  # the uncalibrated model warns on both
            report = tmp_path / f"{night}-{models_dir.name}.json"
            result = runner.invoke(app, ["run", str(folder), "--models", str(models_dir), "--json", str(report)])
            assert result.exit_code == 0, result.stderr
            check = json.loads(report.read_text(encoding="utf-8"))["summary"]["site_check"]
            assert check["unlike_reference"] is expect and ("[warning]" in result.stderr) is expect
            assert check["against"] == ("calibration films" if models_dir == out else "validation films")
            stderr[night, models_dir.name] = result.stderr
    calibrated = "20 of 20 classified films (100.0%) are unfamiliar, against 27 of the 54 calibration films"
    assert calibrated in stderr["split", out.name]
    val = read_metadata(models / "classifier.onnx")["familiarity"]["val_unfamiliar"]
    site_text = f"27 of 54 classified films (50.0%) are unfamiliar, against {val} of the 60 validation films"
    assert site_text in stderr["site", models.name]
    assert (
        read_metadata(out / "classifier.onnx")["calibration"]["familiarity_threshold"]
        == (read_metadata(out / "classifier.onnx")["familiarity_threshold"])
    )


def test_intervals_are_exact_binomial_ones_and_all_hits_are_not_certainty() -> None:
    from cxrbatch.metrics import proportion_ci

    low, high = proportion_ci(np.ones(60, dtype=bool))  # a bootstrap gave [1, 1]
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 60), abs=1e-6)  # Clopper-Pearson's closed form
    low, high = proportion_ci(np.zeros(10, dtype=bool))
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6)
    low, high = proportion_ci(np.arange(10) < 5)  # 5 of 10: the textbook interval, symmetric about 0.5
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129) and low + high == pytest.approx(1.0, abs=1e-6)


def test_a_target_of_nan_is_a_usage_error(tiny_models: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["calibrate", str(tmp_path / "films"), "--models", str(tiny_models), "--out",
                                 str(tmp_path / "o"), "--target-sensitivity", "nan"])  # fmt: skip
    assert result.exit_code == 2 and "between 0 and 1, not nan" in result.stderr


def test_the_specificity_the_rule_gives_at_a_target() -> None:
    from cxrbatch.calibration import specificity_at_target

    truth = np.arange(120) < 60  # 60 abnormal films, then 60 normal ones
    bundled = np.where(truth, 0.9, 0.1)  # every abnormal film above every normal one
    head = np.where(truth, np.linspace(0.2, 1.0, 120), 0.5)  # its lowest abnormal score, 0.2, sits under
    head[60:70] = 0.1  # fifty of the normals: at 0.95 the rule takes it as the threshold, which clears ten
    assert specificity_at_target(bundled, truth, 0.95) == 1.0
    assert specificity_at_target(head, truth, 0.95) == pytest.approx(10 / 60)


def test_the_record_names_a_folder_given_as_dot_dot_by_its_own_name(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    films, out = _site(tmp_path / "site"), tmp_path / "site-models"
    monkeypatch.chdir(films / "NORMAL")  # `..` is the site's folder: its record said ".."
    args = ["calibrate", "..", "--models", str(tiny_models), "--out", str(out), "--target-sensitivity", "0.9"]
    assert runner.invoke(app, args).exit_code == 0
    assert read_metadata(out / "classifier.onnx")["calibration"]["films"] == "site"


def test_films_beside_the_label_folders_are_refused_as_evaluate_refuses_them(tiny_models: Path, tmp_path: Path) -> None:
    # calibrate left them out without a word, where evaluate refuses the same folder.
    films, out = _site(tmp_path / "site"), tmp_path / "site-models"
    grey_image(films / "loose.png", 120)
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out)])
    assert result.exit_code == 2 and "images beside them, of no class: loose.png" in result.stderr
    assert not out.exists()


def test_calibrated_models_go_to_an_out_given_through_link_dotdot(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    films = _site(tmp_path / "site")
    (tmp_path / "srv" / "current").mkdir(parents=True)
    (tmp_path / "cxr").symlink_to(tmp_path / "srv" / "current")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", "cxr/../site-models",
                                 "--target-sensitivity", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "srv" / "site-models").iterdir()) == ["classifier.onnx", "gate.onnx"]


def test_an_out_whose_folder_cannot_be_made_is_refused_before_screening(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an --out under a file, or a link to nothing, failed with exit 1 after every film was screened
    from cxrbatch import calibration

    films, a_file = _site(tmp_path / "site"), tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    screened: list[Path] = []
    monkeypatch.setattr(calibration, "calibrate", lambda folder, *rest: screened.append(folder))
    for out in (a_file / "site-models", tmp_path / "dangling"):
        result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out)])
        assert result.exit_code == 2 and "cannot be made" in result.stderr and "is not a folder" in result.stderr
    assert screened == [] and a_file.read_text(encoding="utf-8") == "mine"


def test_an_out_that_is_a_file_is_refused_without_advice_to_force_it(tiny_models: Path, tmp_path: Path) -> None:
    # it said "pass --force to replace its models", and --force was then refused as a file
    films, a_file = _site(tmp_path / "site"), tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(a_file)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr and "--force" not in result.stderr


def test_an_out_inside_the_labelled_folder_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    # it was written there, and the next calibration of the same films was refused for its folder
    films = _site(tmp_path / "site")
    for out in (films / "site-models", films / "NORMAL" / "site-models"):
        args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out), "--target-sensitivity", "0.9"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and f"--out {out} lies inside {films}" in result.stderr
        assert not out.exists()


def test_a_calibration_stopped_while_writing_leaves_no_out_folder_in_the_way(tiny_models: Path, tmp_path: Path) -> None:
    # the folder it had made stayed, empty, and the same command again was refused: "exists ... pass --force"
    films, out = _site(tmp_path / "site"), tmp_path / "new" / "site-models"
    args = ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out), "--target-sensitivity", "0.9"]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "writing classifier.onnx", "CXRBATCH_CRASH_SIGNAL": "15"}
    cli = "from cxrbatch.cli import main; main()"  # the console script: argv after -c are its arguments
    proc = subprocess.run([sys.executable, "-c", cli, *args], env=env, capture_output=True, timeout=120, text=True)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["classifier.onnx", "gate.onnx"]


def test_films_with_no_label_folder_are_refused_asking_for_one(tiny_models: Path, tmp_path: Path) -> None:
    # a flat folder of films (as evaluate takes with a MANIFEST.csv) was said to hold "class folders ()"
    films, out = tmp_path / "site", tmp_path / "site-models"
    films.mkdir()
    for i, level in enumerate(np.linspace(20, 200, 6)):
        grey_image(films / f"film{i}.png", int(level))
    result = runner.invoke(app, ["calibrate", str(films), "--models", str(tiny_models), "--out", str(out)])
    assert result.exit_code == 2 and "()" not in result.stderr
    assert f"{films} holds no label folder: put each film in a folder named by its label" in result.stderr
    assert not out.exists()
