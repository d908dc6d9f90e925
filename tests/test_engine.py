"""The plain-PyTorch loop: settings, schedule, determinism, resume, and learning the demo folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune_inat.data.dataset import DataConfig, prepare_train_val
from tune_inat.engine import FineTuning, TrainConfig, warmup_cosine
from tune_inat.errors import UserError
from tune_inat.train import DEMO_SETTINGS

CPU = torch.device("cpu")
TINY = dict(backbone="resnet18", weights="none", image_size=32, freeze_fraction=0.0, batch_size=32, epochs=3)


@pytest.fixture(scope="module")
def demo_data_32(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return prepare_train_val(DataConfig(demo_root, tmp_path_factory.mktemp("cache"), progress=False), 32)


def test_seed_names_and_yaml_types_are_accepted() -> None:
    config = TrainConfig.from_dict(
        {"backbone": "resnet18", "learning_rate": "1e-3", "freeze": "freeze_all", "epochs": 5.0, "augment": "false"}
    )
    assert config.lr == 1e-3 and config.freeze_fraction == 1.0 and config.epochs == 5 and config.augment is False
    assert config.image_size == 224  # resolved to the native size
    assert TrainConfig.from_dict({"freeze": "unfreeze_all", "backbone": "resnet18"}).freeze_fraction == 0.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": -1}, "lr must be a positive number"),
        ({"freeze_fraction": 1.2}, r"freeze_fraction must be a number in \[0, 1\]"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"batch_size": 32.5}, "batch_size must be an integer"),
        ({"epochs": "many"}, "epochs must be an integer"),
        ({"optimizer": "lion"}, "optimizer must be adamw, adam, nadam, rmsprop or sgd"),
        ({"grad_accum_steps": 3}, "divides batch_size"),
        ({"learnin_rate": 0.1}, "unknown setting 'learnin_rate'"),
        ({"lr": 0.1, "learning_rate": 0.2}, "lr is given twice"),
        ({"backbone": "resnet5"}, "unknown backbone"),
        ({"augment": "maybe"}, "augment must be true or false"),
    ],
)
def test_bad_settings_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        TrainConfig.from_dict({"backbone": "resnet18", **values} if "backbone" not in values else values)
    assert "\n" not in str(info.value)


def test_warmup_then_cosine_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] < 0.01


def test_same_seed_same_metrics_on_cpu(demo_data_32) -> None:
    config = TrainConfig(**TINY, seed=5)
    runs = [FineTuning(config, demo_data_32, CPU) for _ in range(2)]
    for _ in range(2):
        first, second = (run.run_epoch() for run in runs)
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert first[key] == second[key]
    other = FineTuning(TrainConfig(**TINY, seed=6), demo_data_32, CPU).run_epoch()
    assert other["train_loss"] != first["train_loss"] or other["val_loss"] != first["val_loss"]


def test_restored_run_continues_exactly(demo_data_32) -> None:
    config = TrainConfig(**{**TINY, "freeze_fraction": 0.4}, seed=2)
    straight = FineTuning(config, demo_data_32, CPU)
    history = [straight.run_epoch() for _ in range(3)]

    interrupted = FineTuning(config, demo_data_32, CPU)
    interrupted.run_epoch()
    interrupted.run_epoch()
    state = interrupted.state_dict()
    resumed = FineTuning(config, demo_data_32, CPU)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    third = resumed.run_epoch()
    assert third["epoch"] == 3 and resumed.done
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert third[key] == pytest.approx(history[2][key], rel=1e-5, abs=1e-6)


def test_checkpoint_leaves_out_the_frozen_part(demo_data_32) -> None:
    run = FineTuning(TrainConfig(**{**TINY, "freeze_fraction": 0.8}), demo_data_32, CPU)
    saved = run.state_dict()["model"]
    everything = run.model.state_dict()
    assert "net.conv1.weight" not in saved and "net.layer1.0.bn1.running_mean" not in saved
    assert "net.fc.weight" in saved and "net.layer4.1.bn2.running_mean" in saved
    parameters = dict(run.model.named_parameters())
    assert sum(v.numel() for k, v in saved.items() if k in parameters) == run.model.num_trainable_parameters()
    assert len(saved) < len(everything)


def test_gradient_accumulation_keeps_the_effective_batch(demo_data_32) -> None:
    run = FineTuning(TrainConfig(**{**TINY, "epochs": 1}, grad_accum_steps=2), demo_data_32, CPU)
    assert run.train_batches.batch_size == 16
    steps_before = run.scheduler.last_epoch
    metrics = run.run_epoch()
    assert run.scheduler.last_epoch - steps_before == len(run.train_batches) // 2
    assert 0.0 <= metrics["train_acc"] <= 1.0


def test_demo_run_learns_well_above_chance(demo_root: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_dict(DEMO_SETTINGS)
    data = prepare_train_val(DataConfig(demo_root, tmp_path / "cache", progress=False), config.image_size)
    run = FineTuning(config, data, CPU)
    history = [run.run_epoch() for _ in range(config.epochs)]
    assert max(h["val_acc"] for h in history[-3:]) >= 0.6, [round(h["val_acc"], 3) for h in history]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
