"""The benchmarks stay runnable: the GPU check's plan, checked on a machine without a GPU (CI runs it)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_dry_run_finds_every_step() -> None:
    dry = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    minutes = float(re.search(r"at most ([\d.]+) min", dry.stdout).group(1))
    assert minutes <= 10  # inside one 10-minute call of a lent GPU machine
    for step in ("pytest -m gpu", "bench_train", "bench_packing", "bench_data", "memory probes", "0.25 GPU per trial"):
        assert step in dry.stdout
    assert "--gpus-per-trial auto" in dry.stdout and "--junitxml=" in dry.stdout
    assert "every step's command is there" in dry.stdout


def test_the_strategy_replay_runs_at_reduced_seeds_on_the_recorded_curves(tmp_path) -> None:
    import json

    import pandas as pd

    curves = REPO / "benchmarks" / "data" / "curves_digits.parquet"
    recorded = pd.read_parquet(curves)
    settings = ["backbone", "freeze_fraction", "lr", "batch_size", "augment"]
    assert recorded.groupby(settings).ngroups >= 100 and recorded["epoch"].max() >= 8  # the recording the issue asks
    strategies = ["random+fifo", "tpe+asha", "one-epoch-top-k"]
    replay = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_strategies.py",
            "--seeds",
            "2",
            "--samples",
            "12",
            "--strategies",
            *strategies,
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]
    rows = {row["strategy"]: row for row in json.loads((tmp_path / "bench_strategies.json").read_text())["rows"]}
    assert list(rows) == strategies and all(row["seeds"] == 2 for row in rows.values())
    assert rows["random+fifo"]["trial_epochs_used"] == 12 * recorded["epoch"].max()  # every trial to the end
    assert rows["tpe+asha"]["trial_epochs_used"] < rows["random+fifo"]["trial_epochs_used"]  # ASHA stops some
    assert all(0 <= row["final_regret_mean"] <= 100 for row in rows.values())
    assert (tmp_path / "bench_strategies.png").stat().st_size > 20_000


def test_the_docs_budget_table_is_the_committed_replay() -> None:
    """docs/search.md's budget table is the committed 20-seed replay, and the default meets the bar."""
    import json
    import math

    replay = json.loads((REPO / "benchmarks" / "results" / "bench_strategies.json").read_text())
    rows = replay["rows"]
    readme = (REPO / "docs" / "search.md").read_text()
    table = readme.split("<!-- bench_strategies: table -->\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(table) == len(rows) and all(row["seeds"] == 20 for row in rows)
    for line, row in zip(table, rows):
        cells = [cell.strip(" *") for cell in line.strip("|").split("|")]
        assert cells[1] == f"{row['final_regret_mean']:.2f}", (cells, row)
        assert cells[2] == f"{row['seeds_within_1pt']} of 20"
        assert cells[3] == f"{row['trial_epochs_used']:.0f} ({100 * row['vs_random_fifo']:.0f}%)"
        within = row["within_1pt_median_trial_epochs"]
        share = row["within_1pt_median_vs_random_fifo"]
        expected = "never (median seed)" if math.isinf(within) else f"{within:.0f} ({100 * share:.0f}%)"
        assert cells[4] == expected, (cells, row)
    default = next(row for row in rows if row["strategy"] == "tpe+asha")
    assert "(the default)" in table[[row["strategy"] for row in rows].index("tpe+asha")]
    assert default["within_1pt_median_vs_random_fifo"] <= 0.30  # the bar: within 1 point at <= 30%
