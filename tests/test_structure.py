"""One home per concept: one ranking, light imports, a backbone or a strategy added as one entry, the schema, lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

# -- one ranking: metric val_loss, goal minimize, everywhere ------------------------------------------


def test_one_ranking_picks_the_lowest_loss_everywhere(loss_search) -> None:
    import json

    from tune_inat.settings import read_settings_text, settings_of_row

    folder, search_out, analyze_out = loss_search
    trials = pd.read_parquet(folder / "trials.parquet")
    lowest = trials.loc[trials["best_score"].idxmin()]
    highest_accuracy = trials.loc[trials["best_val_acc"].idxmax()]
    assert (trials["best_score"] == trials.groupby("trial_id")["best_score"].transform("min")).all()
    # the search summary and best_config.yaml
    assert f"Best: trial {lowest['trial_id']}" in search_out
    best_config = read_settings_text((folder / "best_config.yaml").read_text(), "best_config.yaml")
    assert best_config == settings_of_row(lowest, "lowest").to_dict()
    # analyze's leaderboard: first row
    board = analyze_out.split("Leaderboard:", 1)[1].split("Best per backbone:", 1)[0]
    first_row = next(line for line in board.splitlines() if line.strip().startswith("1 "))
    assert lowest["trial_id"] in first_row and "best_val_loss" in board
    # final: its one candidate
    assert json.loads((folder / "final" / "summary.json").read_text())["winner_trial"] == lowest["trial_id"]
    if lowest["trial_id"] != highest_accuracy["trial_id"]:  # the case that used to disagree
        assert highest_accuracy["trial_id"] not in first_row


# -- imports: the light modules stay light -------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("tune_inat.settings", ["torch", "ray"]),
        ("tune_inat.space", ["torch", "ray"]),
        ("tune_inat.spec", ["torch", "ray"]),
        ("tune_inat.plan", ["torch", "ray"]),
        ("tune_inat.results", ["torch", "ray"]),
        ("tune_inat.analyze", ["torch", "ray"]),
        ("tune_inat.final", ["ray"]),
        ("tune_inat.search", ["torch", "ray"]),  # Ray comes after its console is set quiet (a notebook's cell)
    ],
)
def test_light_modules_do_not_load_heavy_ones(module: str, absent: list[str]) -> None:
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]", (module, loaded.stdout)


# -- one entry: a new backbone, a new strategy --------------------------------------------------------


def test_a_backbone_the_project_does_not_ship_is_one_entry(tmp_path: Path) -> None:
    """RegNetY-400MF: torchvision has it, tune-inat does not ship it. One registry entry, and it trains."""
    import torch

    from tune_inat.backbones import BACKBONES, Backbone, features_classifier_stages, register
    from tune_inat.data.dataset import DataConfig, prepare_train_val
    from tune_inat.data.demo import make_demo
    from tune_inat.engine import FineTuning
    from tune_inat.settings import TrainConfig

    def regnet_stages(net):  # stem, trunk stages, pooling, head
        return [net.stem, *net.trunk_output, net.avgpool, torch.nn.Flatten(1), net.fc]

    assert "regnet_y_400mf" not in BACKBONES
    register(Backbone("regnet_y_400mf", 224, head="fc", stages=regnet_stages))
    try:
        data = prepare_train_val(DataConfig(make_demo(tmp_path / "demo", 4, 1), tmp_path / "cache", progress=False), 32)
        for freeze, augment in ((0.5, True), (0.9, False)):  # the frozen-feature path uses the stage list
            run = FineTuning(
                TrainConfig(
                    backbone="regnet_y_400mf",
                    weights="none",
                    image_size=32,
                    epochs=1,
                    freeze_fraction=freeze,
                    augment=augment,
                    batch_size=8,
                ),
                data,
                torch.device("cpu"),
            )
            metrics = run.run_epoch()
            assert metrics["train_loss"] == metrics["train_loss"] and 0 <= metrics["val_acc"] <= 1
        assert features_classifier_stages  # the shipped helpers are there to reuse
    finally:
        BACKBONES.pop("regnet_y_400mf", None)


def test_a_scheduler_is_one_entry_with_its_own_options(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    """Ray's median stopping rule, added as one entry with one option, validated and run by the search."""
    from tune_inat.data.dataset import DataConfig
    from tune_inat.errors import UserError
    from tune_inat.job import prepare_data
    from tune_inat.space import load_space, with_fixed, with_overrides
    from tune_inat.strategies import SCHEDULERS, Option, Scheduler, register_scheduler
    from tune_inat.tuner import run_search

    def build_median(spec):
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(time_attr="epoch", grace_period=spec.options.scheduler_options["grace_period"])

    register_scheduler(
        Scheduler(
            "median",
            "stop a trial below the median of the others",
            build_median,
            {"grace_period": Option(int, 1, 1, "epochs before a trial can be stopped")},
            reproducible=False,
        )
    )
    try:
        spec = with_fixed(load_space("demo"), {"backbone": "resnet18", "image_size": 32})
        with pytest.raises(UserError, match="scheduler median takes no option reduction_factor"):
            with_overrides(spec, scheduler="median", reproducible=False, scheduler_options={"reduction_factor": 2})
        with pytest.raises(UserError, match="cannot decide in trial order"):
            with_overrides(spec, scheduler="median")  # the demo space asks for the reproducible mode
        spec = with_overrides(
            spec,
            scheduler="median",
            reproducible=False,
            num_samples=2,
            max_epochs=2,
            scheduler_options={"grace_period": 1},
        )
        data_config = DataConfig(demo_root, tmp_path / "cache", progress=False)
        outcome = run_search(spec, data_config, prepare_data(spec, data_config), str(tmp_path), "median", verbose=0)
        assert len(outcome.grid) == 2 and not outcome.grid.errors
    finally:
        SCHEDULERS.pop("median", None)


# -- what a trial reports is what the tables hold ------------------------------------------------------


def test_every_reported_metric_lands_in_a_table(demo_search) -> None:
    from tune_inat.results import EPOCHS_SCHEMA, REPORTED_TIME_KEY, REPORTED_TRIAL_KEYS, TRIALS_SCHEMA

    ray_keys = {
        "timestamp",
        "checkpoint_dir_name",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "time_this_iter_s",
        "time_total_s",
        "pid",
        "hostname",
        "node_ip",
        "config",
        "time_since_restore",
        "iterations_since_restore",
        "experiment_tag",
        "should_checkpoint",  # Ray's own flag, added to a result that carries a checkpoint
    }
    reported = set()
    for result in demo_search.grid:
        reported |= set(result.metrics) - ray_keys
    unmapped = reported - set(EPOCHS_SCHEMA.names) - set(REPORTED_TRIAL_KEYS) - {REPORTED_TIME_KEY}
    assert not unmapped, f"reported but in no table: {sorted(unmapped)}"
    assert set(REPORTED_TRIAL_KEYS) <= set(TRIALS_SCHEMA.names)


# -- lint -------------------------------------------------------------------------------------------------


def test_the_code_is_lint_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff), "check", "tune_inat", "tests", "benchmarks"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _imports_of(path: Path) -> set[str]:
    """The tune_inat modules a module imports, at its top or inside a function (not under TYPE_CHECKING)."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tune_inat"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tune_inat"))
    return found


def test_no_module_imports_itself_round_a_circle() -> None:
    """One module, one job, in one direction: a circle of imports (even inside functions) is two modules in one."""
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (REPO / "tune_inat").rglob("*.py")
    }
    graph = {name: {m for m in _imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    graph = {name: targets - {"tune_inat"} for name, targets in graph.items()}
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in trail:
                circle = trail[trail.index(target) :] + [target]
                if min(circle[:-1]) == circle[0]:  # each circle once, from its smallest name
                    circles.append(" -> ".join(circle))
            elif len(trail) < 12:
                visit(target, trail + [target])

    for module in sorted(graph):
        visit(module, [module])
    assert not circles, "import circles: " + "; ".join(sorted(set(circles)))
