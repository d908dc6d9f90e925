"""What a model costs: measured once per backbone and size, in the tables, on the Pareto front, limits in final."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from torchvision.models import ResNet50_Weights

from tune_inat.costs import cost_of, forward_gflop
from tune_inat.models import build_model
from tune_inat.results import COST_KEYS


def test_the_flop_count_of_resnet50_is_torchvisions_published_one() -> None:
    model = build_model("resnet50", 1000, "none", 224).eval()
    published_multiply_adds = ResNet50_Weights.DEFAULT.meta["_ops"]  # 4.089 GFLOPS, counting multiply-adds
    assert forward_gflop(model, 224) / 2 == pytest.approx(published_multiply_adds, rel=0.02)


def test_the_cost_is_measured_once_and_then_read_from_the_cache(tmp_path: Path) -> None:
    first = cost_of("resnet18", 32, 10, None, tmp_path)
    (cached,) = list((tmp_path / "costs").glob("resnet18-32px-10cls-*.json"))
    written = cached.stat().st_mtime_ns
    second = cost_of("resnet18", 32, 10, None, tmp_path)
    assert second == first  # the same timings to the last digit: read, not measured again
    assert cached.stat().st_mtime_ns == written
    assert first.total_parameters > 1e6 and first.forward_gflop > 0 and first.model_mb > 1
    assert 0 < first.cpu_latency_ms_b1 < first.cpu_latency_ms_b64 and "threads" in first.latency_cpu
    assert first.gpu_latency_ms_b1 is None and first.latency_gpu is None  # measured without a GPU
    assert cost_of("resnet18", 48, 10, None, tmp_path) != first  # another size: its own entry
    hidden = cost_of("resnet18", 32, 10, None, tmp_path, head_hidden=64)  # a hidden layer: its own entry
    assert hidden.total_parameters - first.total_parameters == (512 * 64 + 64 + 64 * 10 + 10) - (512 * 10 + 10)
    assert len(list((tmp_path / "costs").glob("*.json"))) == 3


def test_every_trial_of_the_demo_search_has_its_cost(demo_search) -> None:
    trials = pd.read_parquet(demo_search.folder / "trials.parquet")
    measured = [
        "total_parameters",
        "forward_gflop",
        "model_mb",
        "cpu_latency_ms_b1",
        "cpu_latency_ms_b64",
        "latency_cpu",
    ]
    assert trials[measured].notna().all().all()
    assert trials["gpu_latency_ms_b1"].isna().all()  # CPU trials
    for _, rows in trials.groupby("backbone"):  # one measurement per backbone and size, shared by its trials
        assert rows["cpu_latency_ms_b1"].nunique() == 1 and rows["total_parameters"].nunique() == 1
    entries = list(Path(demo_search.data_config.cache_dir, "costs").glob("*.json"))
    assert len(entries) == trials["backbone"].nunique()
    assert set(COST_KEYS) <= set(trials.columns)


@pytest.fixture(scope="module")
def analysed(demo_search, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("costs") / "demo"
    shutil.copytree(demo_search.folder, folder, ignore=shutil.ignore_patterns("trial_*"))
    result = run_cli("tune_inat.analyze", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, result.stdout


def test_analyze_draws_the_pareto_front(analysed) -> None:
    folder, out = analysed
    assert (folder / "pareto_front.png").stat().st_size > 20_000
    assert "Accuracy against latency (the Pareto front)" in out and "Best trial under each CPU latency budget" in out
    report = (folder / "report.md").read_text()
    assert "](pareto_front.png)" in report
    from tune_inat.analyze import pareto_front

    trials = pd.read_parquet(folder / "trials.parquet")
    front = pareto_front(trials, "cpu_latency_ms_b1")
    assert front["best_val_acc"].is_monotonic_increasing and front["cpu_latency_ms_b1"].is_monotonic_increasing
    best = trials.loc[trials["best_val_acc"].idxmax()]
    assert best["trial_id"] in set(front["trial_id"])  # the most accurate is always on the front


def test_final_chooses_under_a_parameter_limit_or_says_none_fits(analysed, tmp_path: Path) -> None:
    folder, _ = analysed
    trials = pd.read_parquet(folder / "trials.parquet")
    small = trials["total_parameters"].min()
    limit = int(small * 1.01)
    result = run_cli(
        "tune_inat.final",
        str(folder),
        "--top-k",
        "1",
        "--seeds",
        "1",
        "--max-epochs",
        "1",
        "--device",
        "cpu",
        "--max-params",
        str(limit),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "final" / "summary.json").read_text())
    allowed = trials[(trials["total_parameters"] <= limit) & (trials["status"] == "completed")]
    best_allowed = allowed.sort_values(["best_score", "best_epoch"], ascending=[False, True]).iloc[0]
    assert summary["winner_trial"] == best_allowed["trial_id"]
    assert summary["cost"]["total_parameters"] <= limit and summary["constraints"] == {"--max-params": limit}
    if (trials["total_parameters"] > limit).any():
        assert f"--max-params {limit} removed" in result.stderr
    assert "parameters" in (folder / "final" / "summary.md").read_text()
    none = run_cli("tune_inat.final", str(folder), "--max-params", "1000", "--device", "cpu")
    errors = [line for line in none.stderr.splitlines() if line.startswith("error:")]
    assert none.returncode == 2 and len(errors) == 1 and "no completed trial meets --max-params 1000" in errors[0]
