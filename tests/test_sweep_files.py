"""Users' own sweep files: every searched parameter read as its author meant, every problem told at once, --plan.

`tests/sweeps/` holds sweep files shaped like the W&B sweep configurations of public course
repositories that fine-tune ImageNet-pretrained models on iNaturalist 12K: their own names for the
backbone, epochs, image size, augmentation and freezing (as strategies, layers and counts), their
optimizers and head knobs, their metric names and plumbing keys, W&B's probabilities and hyperband.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from tune_inat.errors import UserError
from tune_inat.space import load_space, read_space_file, with_fixed
from tune_inat.strategies import wandb_bands

SWEEPS = Path(__file__).parent / "sweeps"

# file -> {our setting: the values the file's author meant}; metric too
MEANT = {
    "01_resnet_freeze_strategy.yaml": {
        "backbone": ("resnet50", "resnet18"),
        "freeze_form": ("head_only", "last_block", "all"),
        "batch_size": (32, 64),
        "epochs": (10,),
        "optimizer": ("adam", "sgd"),
        "lr": "log_uniform_values",
    },
    "02_strategy_counts.yaml": {
        "backbone": ("resnet50",),
        "freeze_form": ("head_only", "all", "frozen:5", "frozen:15"),
        "lr": (0.001, 0.0001),
        "epochs": (5,),
    },
    "03_unfreeze_from.yaml": {"backbone": ("resnet50",), "freeze_form": ("from:layer3", "from:layer4"), "epochs": (8,)},
    "04_freeze_layers_count.yaml": {
        "backbone": ("vgg16", "vgg16"),
        "freeze_form": ("frozen:5", "frozen:10"),
        "dropout": (0.2, 0.5),
        "head_hidden": (256, 512),
        "epochs": (4,),
        "optimizer": ("nadam",),
    },
    "05_k_layers.yaml": {
        "backbone": ("efficientnet_v2_s", "efficientnet_v2_s"),
        "freeze_form": ("trainable:1", "trainable:2", "trainable:3"),
        "image_size": (224,),
        "epochs": (6,),
        "lr": "uniform",
    },
    "06_fraction_trainable.yaml": {
        "backbone": ("googlenet", "inception_v3"),
        "freeze_fraction": (0.9, 0.7, 0.5),
        "augment": (True, False),
    },
    "07_vit_trainable_layers.yaml": {
        "backbone": ("vit_b_16",),
        "freeze_form": ("trainable:2", "trainable:4"),
        "optimizer": ("adam", "adamw"),
        "batch_size": (32,),
    },
    "08_layers_unfreeze.yaml": {
        "backbone": ("resnet18", "resnet34", "resnet50"),
        "freeze_form": ("trainable:0", "trainable:1", "trainable:2"),
        "augment": (True, False),
    },
    "09_unfreezed_from_last.yaml": {
        "freeze_form": ("trainable:1", "trainable:3", "trainable:5"),
        "grad_accum_steps": (1, 2),
        "batch_size": (64,),
    },
    "10_layers_to_freeze.yaml": {"freeze_form": tuple(f"frozen:{n}" for n in range(5))},
    "11_optimizers_all.yaml": {
        "optimizer": ("adam", "nadam", "rmsprop", "sgd", "adamw"),
        "weight_decay": (0.0, 0.0005),
        "momentum": (0.9,),
    },
    "12_head_knobs.yaml": {"dropout": "uniform", "head_hidden": (0, 128, 256), "freeze_fraction": (0.7,)},
    "13_aug_isDataAug.yaml": {"backbone": ("googlenet",), "augment": (True, False), "image_size": (224,)},
    "14_in_dims_aug.yaml": {"backbone": ("inception_v3",), "image_size": (299,), "augment": (False, True)},
    "15_probabilities.yaml": {"backbone": ("resnet50", "vgg16", "vit_b_16"), "optimizer": ("adam", "sgd")},
    "16_hyperband_max_iter.yaml": {"freeze_form": ("head_only", "partial"), "epochs": (30,)},
    "17_hyperband_min_iter.yaml": {"lr": (0.001, 0.01), "epochs": (10,)},
    "18_rename_ignore.yaml": {"backbone": ("resnet50", "vgg16"), "epochs": (2,)},
    "19_freeze_k_layers_densenet.yaml": {
        "backbone": ("densenet121", "densenet121", "convnext_tiny", "mobilenet_v2"),
        "freeze_form": ("trainable:1", "trainable:2"),
    },
    "20_minimal_loss.yaml": {"backbone": ("alexnet",), "batch_size": (64, 128), "epochs": (4,)},
}
METRICS = {"20_minimal_loss.yaml": ("val_loss", "min")}


def test_the_corpus_holds_at_least_20_runnable_files_and_every_one_is_checked() -> None:
    files = sorted(p.name for p in SWEEPS.glob("*.yaml"))
    assert len(MEANT) >= 20 and set(MEANT) <= set(files)
    assert set(files) - set(MEANT) == {"21_part_a_refused.yaml", "22_test_metric_refused.yaml"}


@pytest.mark.parametrize("name", sorted(MEANT))
def test_each_users_file_loads_with_every_searched_parameter_as_meant(name: str) -> None:
    spec = load_space(SWEEPS / name)
    assert (spec.metric, spec.mode) == METRICS.get(name, ("val_acc", "max"))
    for setting, meant in MEANT[name].items():
        parameter = spec.parameters[setting]
        if isinstance(meant, str):
            assert parameter.distribution == meant, (setting, parameter)
        else:
            assert (
                parameter.values == pytest.approx(meant) if setting == "freeze_fraction" else parameter.values == meant
            )
    searched_keys = len(MEANT[name])
    assert len(spec.parameters) >= searched_keys  # nothing the author searched was dropped


def test_plumbing_keys_fixed_to_one_value_are_ignored_with_a_reason() -> None:
    reading = read_space_file(SWEEPS / "01_resnet_freeze_strategy.yaml")
    ignored = {r.key: r.meaning for r in reading.readings if not r.setting}
    assert set(ignored) == {"data_dir", "wandb_project"}
    assert "--data" in ignored["data_dir"] and "--wandb-project" in ignored["wandb_project"]
    assert "data_dir" not in reading.spec.parameters


def test_a_plumbing_key_searched_over_several_values_is_refused() -> None:
    raw = {"parameters": {"backbone": {"value": "resnet18"}, "device": {"values": ["cuda", "cpu"]}}}
    with pytest.raises(UserError, match=r"parameters\.device: the search sets this itself"):
        from tune_inat.space import parse_space

        parse_space(raw, "inline")


def test_a_part_a_file_is_refused_with_every_unknown_key_in_one_message() -> None:
    with pytest.raises(UserError) as caught:
        load_space(SWEEPS / "21_part_a_refused.yaml")
    message = str(caught.value)
    assert "\n" not in message and "8 problems" in message
    for key in ("num_filters", "filter_size", "activation", "filter_org", "batch_norm", "dense_neurons", "kernel_size"):
        assert f"parameters.{key}: unknown setting" in message, key
    assert "tune_inat: {rename:" in message and "learning_rate" not in message


def test_a_test_set_metric_is_refused_saying_why() -> None:
    with pytest.raises(UserError, match="never reads the test set"):
        load_space(SWEEPS / "22_test_metric_refused.yaml")


def test_unknown_names_come_with_the_nearest_known_ones() -> None:
    from tune_inat.space import parse_space

    raw = {
        "parameters": {"bach_size": {"value": 32}, "modelName": {"value": "resnt50"}, "optimizer": {"value": "adma"}}
    }
    with pytest.raises(UserError) as caught:
        parse_space(raw, "inline")
    message = str(caught.value)
    assert "3 problems" in message
    assert "bach_size: unknown setting (nearest: batch_size)" in message
    assert "unknown backbone 'resnt50'; nearest: resnet50" in message
    assert "unknown optimizer 'adma'" in message and "nearest: adam" in message


def test_a_numeric_range_on_an_unknown_key_names_the_key_not_a_range_hint() -> None:
    from tune_inat.space import parse_space

    with pytest.raises(UserError, match=r"parameters\.my_knob: unknown setting") as caught:
        parse_space({"parameters": {"my_knob": {"min": 1, "max": 4}}}, "inline")
    assert "numeric range" not in str(caught.value)


def test_ambiguous_family_names_resolve_to_their_documented_default_and_plan_says_so() -> None:
    reading = read_space_file(SWEEPS / "04_freeze_layers_count.yaml")
    note = next(r.note for r in reading.readings if r.setting == "backbone")
    assert "'VGG' means vgg16" in note


def test_trainable_share_is_one_minus_our_fraction_for_ranges_too() -> None:
    from tune_inat.space import parse_space

    spec = parse_space({"parameters": {"fraction_of_trainable_layers": {"min": 0.2, "max": 0.6}}}, "inline")
    parameter = spec.parameters["freeze_fraction"]
    assert (parameter.low, parameter.high) == pytest.approx((0.4, 0.8))


def test_two_ways_of_freezing_in_one_file_are_refused() -> None:
    from tune_inat.space import parse_space

    raw = {"parameters": {"freeze_fraction": {"value": 0.5}, "freeze_strategy": {"value": "fc_only"}}}
    with pytest.raises(UserError, match="freezing is given twice"):
        parse_space(raw, "inline")


def test_an_unfreeze_layer_the_backbone_lacks_names_its_layers() -> None:
    from tune_inat.space import parse_space

    raw = {"parameters": {"backbone": {"value": "resnet50"}, "unfreeze_from": {"value": "layer9"}}}
    with pytest.raises(UserError, match=r"resnet50 has no layer 'layer9'; its layers: conv1, bn1, .*layer4"):
        parse_space(raw, "inline")


def test_set_takes_the_users_names_and_freeze_forms() -> None:
    spec = with_fixed(load_space("demo"), {"freeze_strategy": "fc_only", "learning_rate": 0.01})
    assert spec.parameters["freeze_form"].values == ("head_only",) and "freeze_fraction" not in spec.parameters
    assert spec.parameters["lr"].values == (0.01,)


# -- W&B's semantics ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_sweeps(tmp_path_factory: pytest.TempPathFactory):
    """W&B's own sweep engine (the `sweeps` package), installed for this test alone: it pins numpy < 2, which the
    project's pandas cannot use, so it goes into a folder of its own without its dependencies (its hyperband
    code needs only numpy, jsonschema, jsonref and pydantic, all in the dev install)."""
    target = tmp_path_factory.mktemp("sweeps")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "sweeps==0.3.0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    sys.path.insert(0, str(target))
    try:
        yield importlib.import_module("sweeps.hyperband_stopping")
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "sweeps" or m.startswith("sweeps.")]:
            del sys.modules[name]


@pytest.mark.parametrize(
    "early",
    [
        {"min_iter": 1, "eta": 2},
        {"min_iter": 2, "eta": 3},
        {"min_iter": 1, "eta": 1.5},
        {"max_iter": 27, "s": 2, "eta": 3},
        {"max_iter": 10, "s": 3, "eta": 3},
        {"max_iter": 100, "s": 3, "eta": 3},
        {"max_iter": 81, "s": 4, "eta": 3},
        {"max_iter": 20, "s": 2},
    ],
)
def test_hyperband_bands_are_the_ones_wandbs_own_engine_gives(early: dict, wandb_sweeps) -> None:
    sweeps = wandb_sweeps
    config = {
        "method": "random",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {"lr": {"values": [0.1]}},
        "early_terminate": {"type": "hyperband", **early},
    }
    runs = [sweeps.SweepRun(name="a", state=sweeps.RunState.running, history=[{"val_acc": 0.5}] * 200)]
    sweeps.hyperband_stop_runs(runs, config)
    theirs = sorted(set(runs[0].early_terminate_info["bands"]))
    from tune_inat.space import parse_space

    options = parse_space({**config, "tune_inat": {"num_samples": 1}}, "inline").options.scheduler_options
    ours = wandb_bands(options["min_iter"], options["max_iter"], options["s"], options["eta"])
    assert [b for b in ours if b < 10_000] == [b for b in theirs if b < 10_000] and theirs


def test_max_iter_caps_no_trial_and_the_bands_sit_below_it() -> None:
    spec = load_space(SWEEPS / "16_hyperband_max_iter.yaml")
    from tune_inat.plan import rungs

    assert spec.max_epochs == 30 and rungs(spec) == [3, 9]


def test_random_search_draws_values_with_their_probabilities() -> None:
    from tune_inat.space import weighted_choices

    pool = weighted_choices(("adam", "sgd"), (0.75, 0.25))
    assert len(pool) == 1000 and pool.count("adam") == 750


def test_grid_search_refuses_probabilities_as_wandb_does() -> None:
    from tune_inat.space import parse_space

    raw = {"method": "grid", "parameters": {"optimizer": {"values": ["adam", "sgd"], "probabilities": [0.5, 0.5]}}}
    with pytest.raises(UserError, match="probabilities do not apply"):
        parse_space(raw, "inline")


# -- --plan ---------------------------------------------------------------------------------------


def test_plan_shows_how_each_key_was_read_line_by_line() -> None:
    result = run_cli("tune_inat.search", "--space", str(SWEEPS / "16_hyperband_max_iter.yaml"), "--plan")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"How {SWEEPS / '16_hyperband_max_iter.yaml'} was read:"
    assert lines[1].split() == ["model", "'resnet50'", "->", "backbone", "'resnet50'"]
    assert lines[2].split() == [
        "freeze_strategy",
        "['fc_only',",
        "'partial']",
        "->",
        "freeze_form",
        "['head_only',",
        "'partial']",
    ]
    assert lines[3].split()[:3] == ["learning_rate", "range", "[0.0001,"] and "-> lr range" in lines[3]
    assert lines[4].split() == ["epochs", "30", "->", "epochs", "30"]
    assert lines[5].startswith("Left at their defaults: weights 'imagenet'") and "freeze_fraction" not in lines[5]
    assert lines[6] == "Search: optuna, 8 trials, metric val_acc (maximize), each up to 30 epochs"
    assert lines[7] == "Scheduler: hyperband (asynchronous), may stop a trial after epoch 3, 9"
    assert lines[8].startswith("Resources: each trial ")
    assert lines[9] == "At most 240 trial-epochs (8 trials x 30 epochs, if none is stopped)"


def test_plan_of_a_family_name_and_a_count_of_trainable_blocks_line_by_line() -> None:
    result = run_cli("tune_inat.search", "--space", str(SWEEPS / "05_k_layers.yaml"), "--plan")
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[:6] == [
        f"How {SWEEPS / '05_k_layers.yaml'} was read:",
        "modelName ['EfficientNetV2', 'efficientnet_v2_s'] -> backbone ['efficientnet_v2_s', 'efficientnet_v2_s'] "
        "(the family 'EfficientNetV2' means efficientnet_v2_s here (name a size to choose another))",
        "k_layers [1, 2, 3] -> freeze_form ['trainable:1', 'trainable:2', 'trainable:3']",
        "img_size 224 -> image_size 224",
        "learning_rate range [0.0001, 0.01] -> lr range [0.0001, 0.01]",
        "max_epochs 6 -> epochs 6",
    ]
    assert lines[6].startswith("Left at their defaults: weights 'imagenet', optimizer 'adamw'")
    assert "freeze_fraction" not in lines[6]  # the freeze form decides: the fraction is not a default left
    assert lines[7:9] == [
        "Search: random, 8 trials, metric val_acc (maximize), each up to 6 epochs",
        "Scheduler: asha (asynchronous), may stop a trial after epoch 1, 3",
    ]
    assert re.fullmatch(r"Resources: each trial 1 CPUs \(no GPU\); \d+ trials at once", lines[9])  # the host's CPUs
    assert lines[10:] == ["At most 48 trial-epochs (8 trials x 6 epochs, if none is stopped)"]


def test_plan_of_a_file_with_ignored_keys_and_flags_applied() -> None:
    result = run_cli(
        "tune_inat.search", "--space", str(SWEEPS / "01_resnet_freeze_strategy.yaml"), "--plan", "--num-samples", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "  data_dir" in result.stdout and "-> ignored: the data come from --data" in result.stdout
    assert "Search: optuna, 3 trials, metric val_acc (maximize), each up to 10 epochs" in result.stdout


def test_plan_of_a_file_that_cannot_run_exits_2_with_every_problem() -> None:
    result = run_cli("tune_inat.search", "--space", str(SWEEPS / "21_part_a_refused.yaml"), "--plan")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "8 problems" in result.stderr


def test_a_flag_conflict_names_the_flag_that_resolves_it() -> None:
    result = run_cli("tune_inat.search", "--demo", "--scheduler", "pasha", "--plan")
    assert result.returncode == 2 and "--no-reproducible" in result.stderr


# -- freezing as users write it, on the backbone's own blocks ----------------------------------------


def trainable_blocks(name: str, form: str) -> list[str]:
    from tune_inat.models import build_model

    model = build_model(name, 10, "none", 64 if name != "vit_b_16" else 224, 0.0, freeze_form=form)
    return sorted({n.split(".")[1] + ("." + n.split(".")[2] if n.split(".")[1].startswith("layer") else "")
                   for n, p in model.named_parameters() if p.requires_grad})  # fmt: skip


def test_freeze_forms_map_onto_resnet50s_blocks_exactly() -> None:
    assert trainable_blocks("resnet50", "from:layer4") == ["fc", "layer4.0", "layer4.1", "layer4.2"]
    assert trainable_blocks("resnet50", "last_block") == ["fc", "layer4.0", "layer4.1", "layer4.2"]
    assert trainable_blocks("resnet50", "trainable:2") == ["fc", "layer4.1", "layer4.2"]
    assert trainable_blocks("resnet50", "head_only") == ["fc"]
    frozen5 = trainable_blocks("resnet50", "frozen:5")  # conv1, bn1, layer1.0-2 frozen: layer2 on trains
    assert "layer1.2" not in frozen5 and "layer2.0" in frozen5 and "conv1" not in frozen5
    assert "conv1" in trainable_blocks("resnet50", "all") and "layer1.0" in trainable_blocks("resnet50", "all")


def test_the_frozen_share_is_measured_and_grows_as_less_trains() -> None:
    from tune_inat.models import build_model

    shares = [
        build_model("resnet18", 10, "none", 64, 0.0, freeze_form=form).frozen_parameter_share()
        for form in ("all", "partial", "last_block", "trainable:1", "head_only")
    ]
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] > 0.99


def test_a_hidden_head_with_dropout_trains_and_round_trips_through_the_model_file(tmp_path: Path) -> None:
    import torch

    from tune_inat.models import HeadSpec, build_model, load_model_file, save_model_file

    model = build_model("resnet18", 10, "none", 32, 1.0, head=HeadSpec(0.3, 64))
    assert [type(m).__name__ for m in model.net.fc] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model.net.fc[1].out_features == 64 and model.num_trainable_parameters() == 512 * 64 + 64 + 64 * 10 + 10
    save_model_file(tmp_path / "m.pt", model, [str(i) for i in range(10)], 32, {"dropout": 0.3, "head_hidden": 64})
    loaded, _ = load_model_file(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_hyperband_without_a_band_is_refused_in_one_line() -> None:
    from tune_inat.space import parse_space

    for options in ({"scheduler": "hyperband"}, {"scheduler": {"type": "hyperband", "min_iter": 0}}):
        with pytest.raises(UserError, match="hyperband needs min_iter >= 1, or max_iter and s"):
            parse_space({"parameters": {"lr": {"value": 0.1}}, "tune_inat": options}, "inline")


def test_a_nan_at_a_band_ranks_last_and_the_threshold_stays_a_number() -> None:
    from types import SimpleNamespace

    from tune_inat.schedulers import BandBracket

    bracket = BandBracket([2], eta=2, strict=True)
    seen = [("a", 0.5), ("b", 0.4), ("d", float("nan")), ("e", 0.45)]
    decide = [bracket.on_result(SimpleNamespace(trial_id=t), 2, v) for t, v in seen]
    assert decide == ["CONTINUE", "CONTINUE", "STOP", "CONTINUE"]  # W&B's rule: below the int(n/2)-th best stops


def test_tables_written_before_the_new_settings_read_back_with_their_defaults(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from tune_inat.results import TRIALS_SCHEMA, read_part

    old_names = [
        n for n in TRIALS_SCHEMA.names if n not in ("freeze_form", "dropout", "head_hidden", "frozen_parameter_share")
    ]
    old = pa.table({n: pa.array([None], type=TRIALS_SCHEMA.field(n).type) for n in old_names})
    old = old.set_column(old_names.index("trial_id"), "trial_id", pa.array(["t1"]))
    pq.write_table(old, tmp_path / "part.parquet")
    table = read_part(pafs.LocalFileSystem(), str(tmp_path / "part.parquet"), TRIALS_SCHEMA).to_pylist()[0]
    assert (table["trial_id"], table["freeze_form"], table["dropout"], table["head_hidden"]) == ("t1", "", 0.0, 0)
    assert table["frozen_parameter_share"] is None


@pytest.mark.parametrize(
    "early",
    [
        {"min_iter": 1, "eta": 2},
        {"min_iter": 2, "eta": 3},
        {"min_iter": 1, "eta": 3, "strict": False},
        {"max_iter": 27, "s": 2, "eta": 3},
        {"max_iter": 12, "s": 2, "eta": 2, "strict": False},
    ],
)
@pytest.mark.parametrize("goal", ["maximize", "minimize"])
def test_hyperband_stops_what_wandbs_engine_stops_at_every_report(early: dict, goal: str, wandb_sweeps) -> None:
    """Sixteen noisy learning curves reported interleaved, as trials of different speeds do: after each report,
    W&B's own `hyperband_stop_runs` on every run's history so far and our bracket decide the same for it."""
    import random
    from types import SimpleNamespace

    from tune_inat.schedulers import BandBracket

    sweeps, epochs = wandb_sweeps, 12
    metric = "val_acc" if goal == "maximize" else "val_loss"
    config = {
        "method": "random",
        "metric": {"name": metric, "goal": goal},
        "parameters": {"lr": {"values": [0.1]}},
        "early_terminate": {"type": "hyperband", **early},
    }
    options = {"min_iter": 0, "max_iter": 0, "s": 0, "eta": 3, **early}
    bands = [
        b for b in wandb_bands(options["min_iter"], options["max_iter"], options["s"], options["eta"]) if b < epochs
    ]
    bracket = BandBracket(bands, eta=options["eta"], strict=early.get("strict", True))
    rng = random.Random(str(sorted(early.items())) + goal)
    curves, events = {}, []
    for index in range(16):
        name, level, speed, start = f"r{index:02d}", rng.uniform(0.2, 0.8), rng.uniform(0.5, 2.0), rng.uniform(0, 3)
        curves[name] = [level * (1 - 0.5**epoch) + rng.gauss(0, 0.05) for epoch in range(1, epochs + 1)]
        events += [(start + epoch * speed, name, epoch) for epoch in range(1, epochs + 1)]
    histories: dict[str, list] = {name: [] for name in curves}
    ended: set[str] = set()
    stops = 0
    for _, name, epoch in sorted(events):
        if name in ended:
            continue
        value = curves[name][epoch - 1] if goal == "maximize" else 1 - curves[name][epoch - 1]  # a loss falls
        histories[name].append({metric: value})
        ours = bracket.on_result(SimpleNamespace(trial_id=name), epoch, value if goal == "maximize" else -value)
        runs = [
            sweeps.SweepRun(
                name=n, state=sweeps.RunState.finished if n in ended else sweeps.RunState.running, history=h
            )
            for n, h in histories.items()
            if h
        ]
        theirs = name in {run.name for run in sweeps.hyperband_stop_runs(runs, config)}
        assert (ours == "STOP") == theirs, (name, epoch, ours)
        if ours == "STOP" or epoch == epochs:
            ended.add(name)
            stops += ours == "STOP"
    assert 0 < stops < len(curves)


def test_reports_name_the_freezing_that_decides() -> None:
    """A recipe whose freezing is a form reports the form, not the unused fraction (train, final)."""
    from tune_inat.settings import TrainConfig

    assert TrainConfig(freeze_form="last_block").describe_freezing() == "freeze last_block"
    assert TrainConfig(freeze_form="from:layer4", freeze_fraction=0.8).describe_freezing() == "freeze from:layer4"
    assert TrainConfig(freeze_fraction=0.5).describe_freezing() == "freeze 0.5"


@pytest.mark.parametrize(
    ("scheduler", "options", "epochs"),
    [
        ("asha", {"grace_period": 1, "reduction_factor": 2}, 10),
        ("asha", {"grace_period": 2, "reduction_factor": 3}, 30),
        ("asha", {"grace_period": 3, "reduction_factor": 4}, 7),
        ("asha", {"grace_period": 4, "reduction_factor": 2}, 5),
        ("pasha", {"grace_period": 1, "reduction_factor": 3}, 27),
        ("hyperband", {"max_iter": 27, "s": 2, "eta": 3}, 30),
        ("hyperband", {"min_iter": 1, "eta": 2}, 12),
    ],
)
def test_the_plans_rungs_are_the_ones_rays_scheduler_is_built_with(scheduler: str, options: dict, epochs: int) -> None:
    """--plan reads no Ray, so it computes the rungs itself: checked here against the scheduler the search builds."""
    from tune_inat.plan import rungs
    from tune_inat.space import parse_space
    from tune_inat.strategies import SCHEDULERS

    spec = parse_space(
        {
            "parameters": {"lr": {"value": 0.01}, "epochs": {"value": epochs}},
            "tune_inat": {"scheduler": {"type": scheduler, **options}},
        },
        "inline",
    )
    built = SCHEDULERS[scheduler].build(spec)
    milestones = sorted(int(m) for m, _ in built._brackets[0]._rungs if m < epochs)
    assert rungs(spec) == milestones and milestones
