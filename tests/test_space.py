"""W&B-sweep-style search spaces: parsing, mapping, and one clear line for every bad key or value."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tune_inat.search import main as search_main
from tune_inat.space import (
    SPACES_DIR,
    load_space,
    parse_duration,
    parse_space,
    to_tune_space,
    with_fixed,
    with_overrides,
)


@pytest.mark.parametrize("name", ["default", "quick", "seed_sweep", "demo"])
def test_shipped_spaces_load(name: str) -> None:
    spec = load_space(name)
    assert spec.metric == "val_acc" and spec.mode == "max"
    assert spec.parameters


def test_seed_sweep_is_the_seeds_grid() -> None:
    spec = load_space("seed_sweep")
    assert spec.searcher == "grid"
    assert spec.parameters["freeze_fraction"].values == (0.7, 0.8, 0.9)  # written as `freeze`
    assert spec.parameters["epochs"].values == (5, 7)
    assert spec.parameters["batch_size"].values == (32, 64)
    space = to_tune_space(spec)
    grid_sizes = [len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v]
    assert math.prod(grid_sizes) == 12


def test_wandb_distributions_map_to_tune_domains() -> None:
    spec = parse_space(
        {
            "method": "random",
            "run_cap": 5,
            "parameters": {
                "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
                "freeze": {"distribution": "uniform", "min": 0.1, "max": 0.9},
                "epochs": {"distribution": "int_uniform", "min": 2, "max": 4},
                "crop_scale_min": {"distribution": "q_uniform", "min": 0.2, "max": 0.6, "q": 0.1},
                "weight_decay": {"distribution": "log_uniform", "min": -9, "max": -3},
                "backbone": {"values": ["resnet18", "resnet34"]},
                "batch_size": {"value": 16},
            },
        },
        "inline",
    )
    space = to_tune_space(spec)
    assert space["batch_size"] == 16
    assert space["lr"].lower == 1e-5 and space["lr"].upper == 1e-2
    assert space["epochs"].lower == 2 and space["epochs"].upper == 5  # W&B max is inclusive
    assert space["crop_scale_min"].sampler.q == 0.1
    assert space["weight_decay"].lower == pytest.approx(math.exp(-9))
    assert space["backbone"].categories == ["resnet18", "resnet34"]
    assert spec.options.num_samples == 5 and spec.searcher == "random"


def test_hyperband_maps_to_wandbs_bands_and_tune_inat_block_to_options() -> None:
    spec = parse_space(
        {
            "parameters": {"backbone": {"value": "resnet18"}, "epochs": {"value": 9}},
            "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 4},
            "tune_inat": {"resources": {"gpus_per_trial": 0.5, "cpus_per_trial": 3}, "time_budget": "1h30m", "seed": 7},
        },
        "inline",
    )
    o = spec.options
    assert (o.scheduler, o.scheduler_options) == (
        "hyperband",
        {"min_iter": 2, "max_iter": 0, "s": 0, "eta": 4.0, "strict": 1},
    )
    assert (o.gpus_per_trial, o.cpus_per_trial, o.time_budget_s, o.seed) == (0.5, 3, 5400, 7)
    assert spec.max_epochs == 9 and spec.searcher == "optuna"


def test_command_line_overrides_and_fixed_settings() -> None:
    spec = with_overrides(load_space("demo"), num_samples=3, max_epochs=2, scheduler="fifo", seed=None)
    assert spec.options.num_samples == 3 and spec.max_epochs == 2 and spec.options.scheduler == "fifo"
    fixed = with_fixed(load_space("seed_sweep"), {"weights": "none", "image_size": 32})
    assert fixed.parameters["weights"].values == ("none",) and fixed.image_sizes() == {32}


def test_image_sizes_follow_the_backbones_native_size() -> None:
    spec = parse_space({"parameters": {"backbone": {"values": ["resnet18", "inception_v3"]}}}, "inline")
    assert spec.image_sizes() == {224, 299}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("parameters:\n  lr: {value: 0.1\n", r"YAML syntax error at line \d+"),
        ("paramters:\n  lr: {value: 0.1}\n", r"paramters: unknown top-level key \(nearest: parameters\)"),
        (
            "parameters:\n  learning_rat: {value: 0.1}\n",
            r"parameters.learning_rat: unknown setting \(nearest: learning_rate\)",
        ),
        ("parameters:\n  lr: {value: 0.1, typo: 1}\n", "parameters.lr: unknown key.*typo"),
        ("parameters:\n  backbone: {values: [resnet50, resnet5]}\n", "parameters.backbone: unknown backbone 'resnet5'"),
        (
            "parameters:\n  lr: {distribution: uniform, min: 0.1, max: 0.01}\n",
            r"parameters.lr: min \(0.1\) must be smaller than max \(0.01\)",
        ),
        ("parameters:\n  lr: {value: -0.001}\n", "parameters.lr: lr must be a positive number"),
        (
            "parameters:\n  freeze: {values: [0.5, 1.5]}\n",
            r"parameters.freeze \(freeze_fraction\): freeze_fraction must be a number in \[0, 1\]",
        ),
        ("parameters:\n  lr: {distribution: normal, min: 0, max: 1}\n", "distribution 'normal' is not supported"),
        (
            "method: grid\nparameters:\n  lr: {distribution: uniform, min: 0.1, max: 0.2}\n",
            "grid search needs value or values",
        ),
        ("method: annealing\nparameters:\n  lr: {value: 0.1}\n", "method: 'annealing' is not one of"),
        (
            "metric: {name: f1, goal: maximize}\nparameters:\n  lr: {value: 0.1}\n",
            "metric.name: 'f1' is not a metric the trials report; use one of val_acc",
        ),
        ("parameters:\n  epochs: {distribution: uniform, min: 1, max: 5.5}\n", "epochs is a whole number"),
        (
            "parameters:\n  image_size: {distribution: int_uniform, min: 64, max: 128}\n",
            "parameters.image_size: must be a value or a list",
        ),
        (
            "parameters:\n  backbone: {value: inception_v3}\n  image_size: {value: 32}\n",
            "inception_v3 needs image_size >= 75",
        ),
        (
            "parameters:\n  lr: {value: 0.1}\ntune_inat:\n  gpus_per_trail: 1\n",
            "tune_inat: unknown key.*gpus_per_trail",
        ),
        (
            "parameters:\n  lr: {value: 0.1}\ntune_inat:\n  gpus_per_trial: -1\n",
            "gpus_per_trial: must be a number >= 0",
        ),
        ("parameters:\n  lr: {value: 0.1}\ntune_inat:\n  time_budget: soon\n", "is not a duration"),
        ("parameters:\n  lr: {value: 0.1}\nearly_terminate: {type: envelope}\n", "only {type: hyperband"),
        ("- just\n- a list\n", "expected a W&B sweep mapping"),
    ],
    ids=[
        "yaml-syntax",
        "top-key",
        "setting",
        "param-key",
        "backbone",
        "min-max",
        "negative-lr",
        "freeze-range",
        "distribution",
        "grid-range",
        "method",
        "metric",
        "int-uniform",
        "image-size-range",
        "min-size",
        "option-key",
        "option-value",
        "duration",
        "early-terminate",
        "not-a-mapping",
    ],
)
def test_bad_space_file_is_one_line_with_exit_2(tmp_path: Path, capsys, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    code = search_main(["--space", str(path), "--demo", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}") or "YAML" in err
    assert re.search(message, err), err


def test_missing_space_file(tmp_path: Path, capsys) -> None:
    assert search_main(["--space", str(tmp_path / "nope.yaml"), "--demo"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_command_line_values(tmp_path: Path, capsys) -> None:
    assert search_main(["--demo", "--num-samples", "0"]) == 2
    assert "num_samples: must be an integer >= 1" in capsys.readouterr().err
    assert search_main(["--demo", "--set", "lr=-1"]) == 2
    assert "lr must be a positive number" in capsys.readouterr().err
    assert search_main(["--demo", "--time-budget", "tomorrow"]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_durations() -> None:
    assert parse_duration("2h") == 7200 and parse_duration("90m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("1h30m") == 5400 and parse_duration(600) == 600


def test_every_shipped_space_is_documented() -> None:
    readme = (SPACES_DIR.parent / "docs" / "spaces.md").read_text()
    for path in SPACES_DIR.glob("*.yaml"):
        assert f"search_spaces/{path.name}" in readme or f"`{path.stem}`" in readme
