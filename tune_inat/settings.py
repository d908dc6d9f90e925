"""The trial settings: one fine-tuning recipe's fields, types, defaults, aliases, validation and conversions.

Everything that reads or checks a recipe uses this module: the space files (`space.py`), the
training loop (`engine.py`), the results tables (`results.py`), `final`, `train`. It imports
neither torch nor Ray, so validating a space file or reading results stays light.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from tune_inat.backbones import check_image_size, get_backbone
from tune_inat.errors import UserError
from tune_inat.vocabulary import KEY_ALIASES, VALUE_FLIPS, normalise_key

OPTIMIZERS = ("adamw", "adam", "nadam", "rmsprop", "sgd")  # torch.optim's own
FREEZE_NAMES = ("head_only", "all", "last_block", "partial")  # and from:LAYER, trainable:N, frozen:N


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one fine-tuning run: the hyperparameters a search explores."""

    backbone: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "none", or a path to a state_dict file
    image_size: int | None = None  # None: the backbone's native input size
    freeze_fraction: float = 0.8
    freeze_form: str = ""  # freezing as a strategy, layer or count (see is_freeze_form); empty: freeze_fraction
    optimizer: str = "adamw"
    lr: float = 1e-3  # the head's; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only (Adam, NAdam, RMSprop at torch's defaults)
    dropout: float = 0.0  # before the new classifier (and its hidden layer)
    head_hidden: int = 0  # width of one hidden layer (ReLU) before the new classifier; 0: none
    label_smoothing: float = 0.1
    batch_size: int = 32
    epochs: int = 10
    warmup_epochs: float = 0.5
    augment: bool = True
    crop_scale_min: float = 0.25
    color_jitter: float = 0.0
    grad_accum_steps: int = 1  # batch_size is the effective batch; micro-batches are batch_size / this
    frozen_features: bool = True  # without augmentation, compute the frozen prefix once and train the rest on it
    compile: bool = False  # torch.compile the trained part (off by default: see the Performance section)
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a plain mapping (YAML, Ray config, a results row): aliases accepted, types coerced, checked.

        Any problem raises one UserError line naming `source` and the key.
        """
        return cls(**coerce_settings(values, source)).validated()

    def validated(self) -> TrainConfig:
        """Check every value; resolve `image_size` to the backbone's native size when None."""
        image_size = self.image_size or get_backbone(self.backbone).native_size
        check_image_size(self.backbone, image_size)
        checks = [
            (
                self.weights in ("imagenet", "none") or Path(self.weights).expanduser().is_file(),
                "weights",
                "'imagenet', 'none' or the path of a state_dict file",
            ),
            (0.0 <= self.freeze_fraction <= 1.0, "freeze_fraction", "a number in [0, 1]"),
            (
                is_freeze_form(self.freeze_form),
                "freeze_form",
                f"one of {', '.join(FREEZE_NAMES)}, from:LAYER, trainable:N, frozen:N",
            ),
            (0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)"),
            (
                0 <= self.head_hidden <= 65536,
                "head_hidden",
                "a whole number of units in [0, 65536] (0: no hidden layer)",
            ),
            (self.optimizer in OPTIMIZERS, "optimizer", ", ".join(OPTIMIZERS[:-1]) + " or " + OPTIMIZERS[-1]),
            (self.lr > 0, "lr", "a positive number"),
            (self.backbone_lr_scale > 0, "backbone_lr_scale", "a positive number"),
            (self.weight_decay >= 0, "weight_decay", "a number >= 0"),
            (0.0 <= self.momentum < 1.0, "momentum", "a number in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", "a number in [0, 1)"),
            (self.batch_size >= 2, "batch_size", "an integer >= 2"),
            (self.epochs >= 1, "epochs", "an integer >= 1"),
            (self.warmup_epochs >= 0, "warmup_epochs", "a number >= 0"),
            (0.0 < self.crop_scale_min <= 1.0, "crop_scale_min", "a number in (0, 1]"),
            (0.0 <= self.color_jitter < 1.0, "color_jitter", "a number in [0, 1)"),
            (
                self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0,
                "grad_accum_steps",
                "an integer >= 1 that divides batch_size",
            ),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise UserError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        return replace(self, image_size=image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe_freezing(self) -> str:
        """What decides the freezing: the user's form when given ("freeze last_block"), else the fraction."""
        return f"freeze {self.freeze_form}" if self.freeze_form else f"freeze {self.freeze_fraction:g}"

    def describe_weights(self) -> str:
        """How people say it: "ImageNet weights", "random init", or the file."""
        return {"imagenet": "ImageNet weights", "none": "random init"}.get(self.weights, f"weights {self.weights}")


def is_freeze_form(form: str) -> bool:
    """'' (use freeze_fraction), a named strategy, 'from:<layer>', 'trainable:<N>' or 'frozen:<N>'."""
    kind, _, value = form.partition(":")
    if not value:
        return form == "" or form in FREEZE_NAMES
    if kind == "from":
        return bool(re.fullmatch(r"[A-Za-z_][\w.]*", value))
    return kind in ("trainable", "frozen") and value.isdigit()


FIELD_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool, "int | None": int}[f.type]
    for f in fields(TrainConfig)
}
SETTING_NAMES = tuple(FIELD_TYPES)
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}

NAMED_FREEZE_FRACTIONS = {"freeze_all": 1.0, "unfreeze_all": 0.0}


def canonical_setting(name: str) -> str:
    """Our name for a setting: our own, or what the users' vocabulary says their name means (`vocabulary.py`)."""
    if name in FIELD_TYPES:
        return name
    key = normalise_key(name)
    return KEY_ALIASES[key] if key in KEY_ALIASES and key not in VALUE_FLIPS else name


def coerce_setting(name: str, value: Any, source: str = "config") -> Any:
    """`value` as the type TrainConfig's field `name` holds (YAML reads 1e-3 as a string, 5.0 as a float)."""
    kind = FIELD_TYPES.get(name)
    if kind is None:
        raise UserError(f"{source}: unknown setting {name!r}; known: {', '.join(sorted(FIELD_TYPES))}")
    value = plain(value)
    if name == "freeze_fraction" and isinstance(value, str) and value in NAMED_FREEZE_FRACTIONS:
        return NAMED_FREEZE_FRACTIONS[value]
    if name == "image_size" and (value is None or value == "native"):
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return str(value).lower() in ("true", "yes", "on", "1")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{source}: {name} must be {_TYPE_WORDS[kind]}, got {value!r}") from None


def coerce_settings(values: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Rename aliases and coerce every value; a setting given twice (by two names) is an error."""
    settings: dict[str, Any] = {}
    for key, value in values.items():
        name = canonical_setting(str(key))
        if name in settings:
            raise UserError(f"{source}: {name} is given twice (as {key!r} and another name)")
        settings[name] = coerce_setting(name, value, source)
    return settings


def plain(value: Any) -> Any:
    """NumPy and pandas scalars as plain Python values (for YAML, JSON and comparisons)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def settings_of_row(row: Mapping[str, Any], source: str) -> TrainConfig:
    """A trials-table row back into the recipe it trained: its settings, and the epochs it was given."""
    values = {name: plain(row[name]) for name in SETTING_NAMES if name in row}
    max_epochs = plain(row.get("max_epochs"))
    if max_epochs is not None and max_epochs == max_epochs:  # not NaN: the epochs it ran to (a cap included)
        values["epochs"] = int(max_epochs)
    return TrainConfig.from_dict(values, source)


SETTINGS_FILE_END = f"# end: all {len(FIELD_TYPES)} settings"


def settings_yaml(config: TrainConfig, header: str = "") -> str:
    """The YAML `python -m tune_inat.train --config` reads back; `header` becomes a comment line.

    The last line marks the file complete, so a file cut short (a crash, a full disk) is told from
    a hand-written one that sets only some settings.
    """
    comment = f"# {header}\n" if header else ""
    return comment + yaml.safe_dump(config.to_dict(), sort_keys=False) + SETTINGS_FILE_END + "\n"


def read_settings_text(text: str, source: str) -> dict[str, Any]:
    """Settings from a YAML text; a file this program wrote whose end marker is missing is cut short."""
    if text.startswith("# best of search") and not text.rstrip().endswith(SETTINGS_FILE_END):
        raise UserError(
            f"{source}: cut short (a search wrote it, but its last lines are missing); "
            f"write it again from the search's trials.parquet or with python -m tune_inat.analyze"
        )
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}: YAML syntax error{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    return values
