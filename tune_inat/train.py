"""`python -m tune_inat.train` and `tune_inat.train(...)`: one fine-tuning run without Ray, a line per epoch,
the model saved.

Settings come from the flags, or from `--config FILE` (for example the `best_config.yaml` a search
writes), flags overriding the file. `--demo` trains on the generated demo folder with settings
that suit a CPU.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tune_inat.cli import (
    add_data_arguments,
    command_flags,
    command_parser,
    data_config_from_args,
    make_callable,
    parse_flags,
    run_command,
    setup_logging,
)
from tune_inat.data.dataset import TrainValData, prepare_train_val
from tune_inat.engine import FineTuning, resolve_device
from tune_inat.errors import UserError
from tune_inat.models import fetch_weights, save_model_file
from tune_inat.settings import TrainConfig, coerce_settings, read_settings_text

# Random init, small images, a small network: a run that learns the demo folder on 2 CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "backbone": "resnet18", "weights": "none", "image_size": 48, "freeze_fraction": 0.0,
    "lr": 1e-3, "backbone_lr_scale": 1.0, "batch_size": 32, "epochs": 10, "crop_scale_min": 0.5,
}  # fmt: skip


def read_settings_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (damaged or binary), cannot be read as YAML") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from err
    return read_settings_text(text, str(path))


SETTING_HELP = {
    "backbone": "torchvision backbone (python -m tune_inat.models list)",
    "weights": "imagenet (torchvision's default weights), none (random init), or a state_dict file",
    "image_size": "input resolution in pixels (native: the backbone's own)",
    "freeze_fraction": "share of the backbone frozen, 0 (train all) to 1 (head only)",
    "freeze_form": "freezing as a strategy (head_only, all, last_block, partial), from:LAYER, trainable:N or "
    "frozen:N blocks; replaces freeze_fraction (docs/training.md's freezing table)",
    "optimizer": "adamw, adam, nadam, rmsprop (torch's defaults) or sgd (Nesterov momentum)",
    "lr": "the head's learning rate",
    "backbone_lr_scale": "the backbone learns at lr times this",
    "weight_decay": "decoupled weight decay (not on biases and norms)",
    "momentum": "SGD momentum",
    "dropout": "dropout before the new classifier (and its hidden layer)",
    "head_hidden": "width of one hidden layer (ReLU) before the new classifier; 0: none",
    "label_smoothing": "on the training loss",
    "batch_size": "the effective batch",
    "epochs": "epochs; the warmup + cosine schedule spans them",
    "warmup_epochs": "linear learning-rate warmup, in epochs",
    "augment": "random resized crops and flips",
    "crop_scale_min": "smallest random crop, as a share of the image area",
    "color_jitter": "brightness/contrast/saturation jitter strength (0: off)",
    "grad_accum_steps": "micro-batches per optimiser step (batch_size / this images each)",
    "frozen_features": "with augment off, compute the frozen prefix's outputs once and train the rest on them",
    "compile": "torch.compile the trained part of the network",
    "seed": "seed of initialisation, batches and augmentation",
}


def train_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m tune_inat.train",
        "One fine-tuning run (no search): prints a line per epoch and saves the final model.",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML of settings, e.g. a search's best_config.yaml"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="model file (default results/train-<backbone>-<time>/model.pt)"
    )
    settings = parser.add_argument_group("settings (flags override the config file, which overrides the defaults)")
    defaults = TrainConfig()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = f"{SETTING_HELP[field.name]} (default {'native' if default is None else default})"
        if field.type == "bool":
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            settings.add_argument(flag, default=None, metavar=field.name.upper(), help=text)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = dict(DEMO_SETTINGS) if args.demo else {}
    if args.config:
        values.update(coerce_settings(read_settings_file(args.config), str(args.config)))
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    values.update(flags)
    return TrainConfig.from_dict(values, "settings")


def format_epoch(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']:>3}/{epochs}  train_loss {metrics['train_loss']:.3f}  "
        f"train_acc {100 * metrics['train_acc']:5.1f}%  val_loss {metrics['val_loss']:.3f}  "
        f"val_acc {100 * metrics['val_acc']:5.1f}%  {metrics['epoch_seconds']:6.1f} s  "
        f"{metrics['images_per_second']:7.0f} img/s"
    )


def fit(config: TrainConfig, data: TrainValData, device_name: str, output: Path) -> list[dict[str, float]]:
    """Train `config` to the end, print each epoch, save the model and the per-epoch metrics."""
    fine_tuning = FineTuning(config, data, resolve_device(device_name))
    model = fine_tuning.model
    print(
        f"{config.backbone} ({config.describe_weights()}), {config.image_size} px, {config.describe_freezing()}: "
        f"{model.num_trainable_parameters():,} of {model.num_parameters():,} parameters train; "
        f"{len(data.train_rows)} train / {len(data.val_rows)} validation images, {len(data.classes)} classes, "
        f"device {fine_tuning.device}"
    )
    history = []
    while not fine_tuning.done:
        metrics = fine_tuning.run_epoch()
        history.append(metrics)
        print(format_epoch(metrics, config.epochs), flush=True)
    save_model_file(output, model, data.classes, config.image_size, config.to_dict())
    with open(output.with_name("epochs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    output.with_name("config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"model: {output}\nmetrics: {output.with_name('epochs.csv')}\nconfig: {output.with_name('config.yaml')}")
    return history


def train_from_args(args: argparse.Namespace) -> Path:
    """The command's run: settings, weights, data, training; returns the model file."""
    config = train_config_from_args(args)
    if config.weights == "imagenet":
        fetch_weights(config.backbone, random_init_hint="--weights none")  # fail fast, before decoding any image
    data = prepare_train_val(data_config_from_args(args), config.image_size)
    output = args.output or Path("results") / f"train-{config.backbone}-{time.strftime('%Y%m%d-%H%M%S')}" / "model.pt"
    fit(config, data, args.device, output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    def train(args: argparse.Namespace) -> int:
        train_from_args(args)
        return 0

    return run_command(train_parser(), train, argv)


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote: the model file, its per-epoch metrics and its settings."""

    model: Path
    epochs: pd.DataFrame  # epochs.csv: one row per epoch
    config: dict[str, Any]  # config.yaml: the settings it ran with

    @property
    def val_acc(self) -> float:
        """The last epoch's validation accuracy (the model saved is the last epoch's)."""
        return float(self.epochs["val_acc"].iloc[-1])


def run(data: str | Path | None = None, config: str | Path | dict | None = None, **options: Any) -> TrainResult:
    """`tune_inat.train(data=..., config=..., lr=1e-3, ...)`: the command from Python, its flags as keywords;
    `config` is a settings file (a search's best_config.yaml) or a dict of settings, keywords override it."""
    parser = train_parser()
    settings = {f.name for f in fields(TrainConfig)}
    if isinstance(config, dict):
        unknown = sorted(set(config) - settings)
        if unknown:
            raise UserError(f"unknown settings {', '.join(unknown)}; the settings: {', '.join(sorted(settings))}")
        options = {**config, **options}
        config = None
    flags = command_flags(parser, {"data": data, "config": config, **options})
    args = parse_flags(parser, flags)
    setup_logging(args.debug, args.quiet)
    output = train_from_args(args)
    return TrainResult(
        output,
        pd.read_csv(output.with_name("epochs.csv")),
        yaml.safe_load(output.with_name("config.yaml").read_text()),
    )


make_callable(__name__, run)  # tune_inat.train(...) is the API, python -m tune_inat.train the command

if __name__ == "__main__":
    sys.exit(main())
