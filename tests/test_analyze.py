"""`python -m tune_inat.analyze` on a real demo search: tables, importance, PNGs, report.md."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import run_cli
from PIL import Image

from tune_inat.analyze import PLOTS, best_per_backbone, compute_saved, importance, load_search


def test_analyze_writes_every_plot_and_the_report(demo_search, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(demo_search.folder, folder, ignore=shutil.ignore_patterns("trial_*"))
    result = run_cli("tune_inat.analyze", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    for title in ("Leaderboard", "Best per backbone", "Compute", "Hyperparameter importance"):
        assert title in result.stdout
    for name in PLOTS.values():
        with Image.open(folder / name) as image:
            image.verify()
        with Image.open(folder / name) as image:
            assert image.size[0] > 400 and image.size[1] > 300
            assert len(set(image.convert("L").getdata())) > 10  # something drawn, not a blank canvas
    report = (folder / "report.md").read_text()
    assert all(f"]({name})" in report for name in PLOTS.values())
    assert "| trial_id |" in report and "% saved" in report


def test_several_searches_are_compared(demo_search, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for target in (first, second):
        shutil.copytree(demo_search.folder, target, ignore=shutil.ignore_patterns("trial_*"))
    result = run_cli("tune_inat.analyze", str(first), str(second), "--comparison-dir", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Compared" in result.stdout
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    assert "| search |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_tables_from_the_demo_search(demo_search) -> None:
    search = load_search(demo_search.folder)
    per_backbone = best_per_backbone(search)
    assert set(per_backbone["backbone"]) == set(search.trials["backbone"])
    trials = search.trials
    for _, row in per_backbone.iterrows():
        assert row["best_val_acc"] == trials[trials["backbone"] == row["backbone"]]["best_val_acc"].max()
    saved = compute_saved(search)
    assert saved["trial_epochs_run"] == len(search.epochs) < saved["trial_epochs_budget"]
    scores, note = importance(search)
    completed = (trials["status"] == "completed").sum()
    if scores is not None:
        assert set(scores.index) <= set(search.searched) and abs(scores.sum() - 1) < 1e-6
    assert "too few" in note or completed >= 10 or scores is None


def test_bad_results_dir_is_one_line(tmp_path: Path) -> None:
    result = run_cli("tune_inat.analyze", str(tmp_path))
    assert result.returncode == 2 and "holds no search results" in result.stderr
    assert "Traceback" not in result.stderr
