"""From search to model on a real demo search: confirm, re-train, test once, export, predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, write_image
from PIL import Image

from tune_inat.data.cache import cache_key
from tune_inat.data.decode import stored_size_for
from tune_inat.data.folders import discover


@pytest.fixture(scope="module")
def final_run(demo_search, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("final") / "demo"
    shutil.copytree(demo_search.folder, folder, ignore=shutil.ignore_patterns("trial_*"))
    info = json.loads((folder / "search.json").read_text())
    _, test_files = discover(Path(info["data_root"]))
    test_cache = Path(info["cache_dir"]) / cache_key(test_files, stored_size_for(48))
    searched_without_test = test_cache.name not in demo_search.caches_after_search  # other tests run final too
    result = run_cli(
        "tune_inat.final", str(folder), "--top-k", "2", "--seeds", "2", "--max-epochs", "2", "--device", "cpu"
    )
    return folder, result, test_cache, searched_without_test


def test_final_runs_end_to_end(final_run) -> None:
    folder, result, _, _ = final_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout and "evaluated once" in result.stdout
    confirmation = pd.read_csv(folder / "final" / "confirmation.csv")
    assert len(confirmation) == 2 and (confirmation["seeds"] == 2).all()
    assert confirmation["val_acc_mean"].is_monotonic_decreasing
    summary = json.loads((folder / "final" / "summary.json").read_text())
    assert summary["winner_trial"] == confirmation["trial_id"].iloc[0]
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_the_test_set_is_read_once_and_never_by_the_search(final_run) -> None:
    folder, _, test_cache, searched_without_test = final_run
    assert searched_without_test  # the search built no cache of the test images: it never read them
    assert test_cache.exists()  # final did, once
    summary = json.loads((folder / "final" / "summary.json").read_text())
    predictions = pd.read_csv(folder / "final" / "test_predictions.csv")
    assert summary["test_set_evaluations"] == 1 and summary["test_images"] == len(predictions) == 100
    assert predictions["file"].is_unique
    accuracy = (predictions["true"] == predictions["predicted"]).mean()
    assert accuracy == pytest.approx(summary["test_accuracy"])


def test_reports_and_plots(final_run) -> None:
    folder, _, _, _ = final_run
    per_class = pd.read_csv(folder / "final" / "per_class.csv")
    assert len(per_class) == 10 and per_class["support"].sum() == 100
    assert per_class[["precision", "recall", "f1"]].apply(lambda c: c.between(0, 1)).all().all()
    for name in ("confusion_matrix.png", "test_predictions.png"):
        with Image.open(folder / "final" / name) as image:
            image.verify()
        with Image.open(folder / "final" / name) as image:
            assert image.size[0] > 400 and len(set(image.convert("L").getdata())) > 10
    report = (folder / "report.md").read_text()
    assert "## Final model" in report and "Test accuracy" in report and "final/confusion_matrix.png" in report


def test_predict_agrees_with_the_final_evaluation(final_run, demo_root: Path) -> None:
    folder, _, _, _ = final_run
    predictions = pd.read_csv(folder / "final" / "test_predictions.csv")
    right = predictions[predictions["true"] == predictions["predicted"]].head(3)
    assert len(right) == 3
    paths = [str(demo_root / "val" / f) for f in right["file"]]
    result = run_cli("tune_inat.predict", str(folder / "final" / "model.pt"), *paths, "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout)
    assert "ms per image" in result.stderr and "the model alone" in result.stderr
    assert [a["predictions"][0]["label"] for a in answers] == right["true"].tolist()
    assert all(
        len(a["predictions"]) == 2 and a["predictions"][0]["probability"] >= a["predictions"][1]["probability"]
        for a in answers
    )
    lines = run_cli("tune_inat.predict", str(folder / "final" / "model.pt"), str(demo_root / "val" / "Aves"))
    assert lines.returncode == 0 and len(lines.stdout.strip().splitlines()) == 10


def test_bad_inputs_are_one_line(final_run, tmp_path: Path) -> None:
    folder, _, _, _ = final_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder, unfinished, ignore=shutil.ignore_patterns("final", "trials.parquet"))  # no trial has ended
    result = run_cli("tune_inat.final", str(unfinished))
    assert result.returncode == 2 and "no finished trials" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "not_a_model.pt").write_bytes(b"\x00" * 100)
    image = write_image(tmp_path / "ok.jpg", size=(60, 60))
    result = run_cli("tune_inat.predict", str(tmp_path / "not_a_model.pt"), str(image))
    assert (
        result.returncode == 2 and "is not a tune-inat model file" in result.stderr and "Traceback" not in result.stderr
    )

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_cli("tune_inat.predict", str(folder / "final" / "model.pt"), str(image), str(broken))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot read image" in errors[0] and str(broken) in errors[0]
    assert str(image) in result.stdout  # the readable image is still classified
