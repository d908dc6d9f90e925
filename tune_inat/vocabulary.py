"""The users' vocabulary: the names and values real W&B sweep files use, translated into our settings.

In a W&B sweep a parameter's name is an argument of the user's own training script, so every
course repository names things its own way (`model_name: ResNet50`, `num_epochs`, `freeze_strategy:
fc_only`, `optimizer: Adam`, `metric: valid_acc`). This module is the one place that knows those
names: a key alias says which setting a user's key means (and how its value maps), a value alias
which of our values a user's value means. It imports neither torch nor Ray.

Every translation is recorded as a `Reading` (the user's name and value -> our setting and value,
with a note where a choice was made), which `--plan` prints; every problem is collected, so a file
with thirteen unknown keys is told all thirteen at once, each with the nearest known name.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from tune_inat.backbones import BACKBONES

# -- keys -----------------------------------------------------------------------------------------

# a user's key (normalised: lower case, snake_case) -> the setting it means; our own names map to themselves
KEY_ALIASES: dict[str, str] = {
    # the backbone
    "model": "backbone",
    "model_type": "backbone",
    "base_model": "backbone",
    "model_name": "backbone",
    "model_arch": "backbone",
    "arch": "backbone",
    "architecture": "backbone",
    "network": "backbone",
    "net": "backbone",
    "resnet_variant": "backbone",
    "pretrained_model": "backbone",
    "pretrained_models": "backbone",
    "pre_trained_model": "backbone",
    "backbone_name": "backbone",
    "weights": "weights",
    # optimisation
    "learning_rate": "lr",
    "lr": "lr",
    "learningrate": "lr",
    "lrate": "lr",
    "l_rate": "lr",
    "lr_rate": "lr",
    "init_lr": "lr",
    "optim": "optimizer",
    "optimiser": "optimizer",
    "optimizer_name": "optimizer",
    "batch": "batch_size",
    "batchsize": "batch_size",
    "bs": "batch_size",
    "wd": "weight_decay",
    "weight_decay": "weight_decay",
    "l2": "weight_decay",
    "l2_reg": "weight_decay",
    "accumulation_steps": "grad_accum_steps",
    "gradient_accumulation_steps": "grad_accum_steps",
    "grad_accum": "grad_accum_steps",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "epoch": "epochs",
    "max_epochs": "epochs",
    "max_epoch": "epochs",
    "warmup": "warmup_epochs",
    "smoothing": "label_smoothing",
    # data
    "img_size": "image_size",
    "in_dims": "image_size",
    "input_size": "image_size",
    "image_dim": "image_size",
    "img_dim": "image_size",
    "resolution": "image_size",
    "data_augment": "augment",
    "augment_data": "augment",
    "is_data_aug": "augment",
    "aug": "augment",
    "augmentation": "augment",
    "data_aug": "augment",
    "data_augmentation": "augment",
    "use_augmentation": "augment",
    # the head
    "dropout": "dropout",
    "dropout_rate": "dropout",
    "drop_out": "dropout",
    "dropout_prob": "dropout",
    "dense_size": "head_hidden",
    "dense_layer_size": "head_hidden",
    "dense_layers": "head_hidden",
    "dense_units": "head_hidden",
    "fc_size": "head_hidden",
    "hidden_size": "head_hidden",
    # freezing: a fraction
    "freeze": "freeze_fraction",
    "freeze_percent": "freeze_fraction",
    "freeze_ratio": "freeze_fraction",
    "fraction_of_trainable_layers": "freeze_fraction",  # 1 - ours: see VALUE_FLIPS
    "trainable_fraction": "freeze_fraction",
}
# freezing as a strategy, a layer or a count: the key says which (the value alone cannot)
FREEZE_KEYS: dict[str, str] = {
    "freeze_strategy": "strategy",
    "strategy": "strategy",
    "fine_tune_strategy": "strategy",
    "finetune_strategy": "strategy",
    "fine_tuning_strategy": "strategy",
    "freezing": "strategy",
    "freeze_mode": "strategy",
    "unfreeze_from": "from",
    "unfreeze_layer": "from",
    "train_from": "from",
    "freeze_layers": "frozen",
    "layers_to_freeze": "frozen",
    "num_frozen_layers": "frozen",
    "freeze_first": "frozen",
    "k_layers": "trainable",
    "freeze_k_layers": "trainable",
    "trainable_layers": "trainable",
    "layers_unfreeze": "trainable",
    "unfreezed_from_last": "trainable",
    "unfreeze_last": "trainable",
    "num_trainable_layers": "trainable",
}
VALUE_FLIPS = {"fraction_of_trainable_layers", "trainable_fraction"}  # a trainable share: our fraction is 1 - it

# plumbing: keys a training script needs that a search sets itself; accepted when fixed to one value
PLUMBING: dict[str, str] = {
    "data_dir": "the data come from --data",
    "dataset_path": "the data come from --data",
    "data_path": "the data come from --data",
    "dataset_dir": "the data come from --data",
    "train_dir": "the data come from --data (its train/ folder)",
    "val_dir": "the data come from --data (its val/ folder)",
    "test_dir": "the test set is read only by final",
    "root": "the data come from --data",
    "wandb_project": "the wandb project comes from --wandb-project",
    "project": "the wandb project comes from --wandb-project",
    "project_name": "the wandb project comes from --wandb-project",
    "entity": "wandb's own entity setting applies (wandb login)",
    "wandb_entity": "wandb's own entity setting applies (wandb login)",
    "device": "Ray places each trial on a GPU share or the CPU",
    "gpu": "Ray places each trial on a GPU share or the CPU",
    "num_workers": "decoding is done once, into the image cache",
    "workers": "decoding is done once, into the image cache",
    "save_dir": "checkpoints go to the results folder",
    "output_dir": "checkpoints go to the results folder",
    "checkpoint_dir": "checkpoints go to the results folder",
    "log_interval": "every epoch is logged",
    "wandb_log": "wandb is on unless --no-wandb",
    "use_wandb": "wandb is on unless --no-wandb",
    "num_classes": "the classes are the data's class folders",
    "pretrained": "weights: imagenet is the default (weights: none trains from scratch)",
}


def normalise_key(key: str) -> str:
    """'modelName' -> 'model_name', 'Learning-Rate' -> 'learning_rate', 'isDataAug' -> 'is_data_aug'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key).strip())
    return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_")


# -- values ---------------------------------------------------------------------------------------


def squash(text: Any) -> str:
    """Lower case, letters and digits only: 'EfficientNet-V2_S' -> 'efficientnetv2s'."""
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


# a family name (squashed) -> its documented default; `--plan` says which was taken
BACKBONE_FAMILIES: dict[str, str] = {
    "resnet": "resnet50",
    "vgg": "vgg16",
    "vggnet": "vgg16",
    "efficientnetv2": "efficientnet_v2_s",
    "efficientnet": "efficientnet_b0",
    "vit": "vit_b_16",
    "visiontransformer": "vit_b_16",
    "vitbase": "vit_b_16",
    "vitbasepatch16224": "vit_b_16",
    "inception": "inception_v3",
    "inceptionnet": "inception_v3",
    "googlenet": "googlenet",
    "googlelenet": "googlenet",
    "inceptionv1": "googlenet",
    "convnext": "convnext_tiny",
    "mobilenet": "mobilenet_v3_large",
    "mobilenetv3": "mobilenet_v3_large",
    "densenet": "densenet121",
    "resnext": "resnext50_32x4d",
    "wideresnet": "wide_resnet50_2",
    "swin": "swin_t",
    "swintransformer": "swin_t",
    "shufflenet": "shufflenet_v2_x1_0",
    "shufflenetv2": "shufflenet_v2_x1_0",
    "regnet": "regnet_y_800mf",
}
OPTIMIZER_NAMES = {"adam": "adam", "adamw": "adamw", "nadam": "nadam", "rmsprop": "rmsprop", "sgd": "sgd"}
TRUE_WORDS = {"true", "yes", "on", "1", "y"}
FALSE_WORDS = {"false", "no", "off", "0", "n", "none"}

# named freeze strategies (squashed) -> our freeze form
FREEZE_STRATEGIES: dict[str, str] = {
    **dict.fromkeys(
        ("fconly", "headonly", "freezeall", "classifieronly", "linearprobe", "featureextraction", "featureextractor",
         "frozen", "lastlayer", "lastlayeronly", "trainhead", "headonlyfinetune"),
        "head_only",
    ),
    **dict.fromkeys(
        ("allunfrozen", "unfreezeall", "full", "fullfinetune", "fullfinetuning", "finetuneall", "finetune", "none",
         "nofreeze", "trainall", "all", "unfrozen", "scratch"),
        "all",
    ),
    **dict.fromkeys(("lastblock", "unfreezelastblock", "trainlastblock", "lastblockonly", "lastconvblock"),
                    "last_block"),
    **dict.fromkeys(("partial", "partialfinetune", "partialfinetuning", "half", "partiallyfrozen"), "partial"),
}  # fmt: skip
FREEZE_COUNT_STRATEGY = re.compile(r"^(freeze_?first|unfreeze_?last|train_?last|freeze|unfreeze)_?(\d+)$")


def resolve_backbone(value: Any) -> tuple[str | None, str]:
    """(our backbone, note) for a user's backbone name; (None, hint) when none matches."""
    squashed = squash(value)
    exact = {squash(name): name for name in BACKBONES}
    if squashed in exact:
        return exact[squashed], ""
    if squashed in BACKBONE_FAMILIES and BACKBONE_FAMILIES[squashed] in BACKBONES:
        chosen = BACKBONE_FAMILIES[squashed]
        return chosen, f"the family {value!r} means {chosen} here (name a size to choose another)"
    near = difflib.get_close_matches(squashed, list(exact) + list(BACKBONE_FAMILIES), n=3, cutoff=0.6)
    names = [exact.get(n) or BACKBONE_FAMILIES[n] for n in near]
    hint = f"; nearest: {', '.join(dict.fromkeys(names))}" if names else f"; choose one of: {', '.join(BACKBONES)}"
    return None, f"unknown backbone {value!r}{hint}"


def freeze_form(kind: str, value: Any) -> tuple[str | None, str]:
    """Our freeze form ('head_only', 'all', 'last_block', 'partial', 'from:layer4', 'trainable:2', 'frozen:5')
    for a value given under a key of `kind` ('strategy', 'from', 'frozen', 'trainable'); (None, why) if none."""
    if kind == "from":
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", value):
            return None, f"must name a layer of the backbone (such as layer4), got {value!r}"
        return f"from:{value}", ""
    if kind in ("frozen", "trainable"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or value < 0:
            return None, f"must be a whole number of blocks >= 0, got {value!r}"
        return f"{kind}:{int(value)}", ""
    if isinstance(value, bool) or not isinstance(value, str):
        return (
            None,
            f"must be a freeze strategy name ({', '.join(sorted(set(FREEZE_STRATEGIES.values())))}), got {value!r}",
        )
    if squash(value) in FREEZE_STRATEGIES:
        return FREEZE_STRATEGIES[squash(value)], ""
    counted = FREEZE_COUNT_STRATEGY.match(normalise_key(value))
    if counted:
        verb, count = counted.groups()
        return (f"trainable:{count}" if verb.replace("_", "") in ("unfreezelast", "trainlast", "unfreeze")
                else f"frozen:{count}"), ""  # fmt: skip
    near = difflib.get_close_matches(squash(value), list(FREEZE_STRATEGIES), n=1, cutoff=0.6)
    hint = f"; nearest: {FREEZE_STRATEGIES[near[0]]}" if near else ""
    return None, (
        f"unknown freeze strategy {value!r} (known: head_only, all, last_block, partial, freeze_first_N, "
        f"unfreeze_last_N, and their usual spellings){hint}"
    )


def translate_value(setting: str, value: Any) -> tuple[Any, str]:
    """A user's value for `setting` as ours, and a note where a choice was made; a bad value stays as it is
    (the settings check names it). Raises ValueError with the reason for a name no alias covers."""
    if setting == "backbone" and isinstance(value, str):
        chosen, note = resolve_backbone(value)
        if chosen is None:
            raise ValueError(note)
        return chosen, note
    if setting == "optimizer" and isinstance(value, str):
        if squash(value) not in OPTIMIZER_NAMES:
            near = difflib.get_close_matches(squash(value), list(OPTIMIZER_NAMES), n=1, cutoff=0.5)
            raise ValueError(
                f"unknown optimizer {value!r}; known: {', '.join(OPTIMIZER_NAMES)}"
                + (f" (nearest: {near[0]})" if near else "")
            )
        return OPTIMIZER_NAMES[squash(value)], ""
    if setting == "augment" and isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS, ""
    if (
        setting == "weights"
        and isinstance(value, str)
        and value.strip().lower() in ("imagenet", "pretrained", "default")
    ):
        return "imagenet", ""
    if setting == "weights" and (
        value is None or (isinstance(value, str) and value.strip().lower() in ("none", "random", "scratch"))
    ):
        return "none", ""  # fmt: skip
    return value, ""


# -- metrics --------------------------------------------------------------------------------------

METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")


def resolve_metric(name: Any) -> tuple[str | None, str]:
    """Our metric for a user's metric name ('valid_acc', 'Validation Accuracy', 'val_accuracy'); (None, why)."""
    words = normalise_key(name).replace("accuracy", "acc").split("_")
    words = [{"validation": "val", "valid": "val", "training": "train", "tr": "train"}.get(w, w) for w in words]
    words = [w for w in words if w not in ("epoch", "top1", "mean", "avg", "score")]
    if words in (["acc"], ["loss"]):
        words = ["val", *words]
    candidate = "_".join(words)
    if candidate in METRICS:
        return candidate, ""
    if "test" in words:
        return None, (
            f"{name!r} is a test-set metric: the search never reads the test set (final evaluates it once, "
            f"on the recipe the validation split chose); use val_acc or val_loss"
        )
    return None, f"{name!r} is not a metric the trials report; use one of {', '.join(METRICS)}"


# -- readings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """How one key of the user's file was read: for --plan, one line each."""

    key: str  # as the user wrote it
    given: str  # the user's value or values, as text
    setting: str  # ours, or "" when ignored
    meaning: str  # our value(s), or why it is ignored
    note: str = ""


def nearest_key(key: str, known: list[str]) -> str:
    """'; did you mean X?' for an unknown key, or ''."""
    near = difflib.get_close_matches(normalise_key(key), known, n=1, cutoff=0.6)
    return f" (nearest: {near[0]})" if near else ""


def printable(key: str) -> str:
    """A key as a message can show it on one line: as written, or quoted when it holds odd characters."""
    return key if key.isprintable() and key.strip() == key and key else repr(key)


def is_plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- a sweep's parameters, translated ---------------------------------------------------------------


@dataclass(frozen=True)
class Translated:
    """A parameter in our terms: our setting, and its W&B spec with our values (value, values, min, max, ...)."""

    key: str  # the user's key, for messages
    setting: str
    spec: dict


def describe(spec: Any) -> str:
    """A parameter spec as a user reads it: 5, [a, b], uniform [0.1, 0.9]."""
    if not isinstance(spec, dict):
        return repr(spec)
    if "value" in spec:
        return repr(spec["value"])
    if "values" in spec:
        return repr(spec["values"])
    return f"{spec.get('distribution', 'range')} [{spec.get('min')!r}, {spec.get('max')!r}]"


def _choices(spec: dict) -> list | None:
    """The discrete values a spec can take (value or values), else None (a range)."""
    if "value" in spec:
        return [spec["value"]]
    if isinstance(spec.get("values"), list):
        return list(spec["values"])
    return None


def _with_choices(spec: dict, values: list) -> dict:
    rest = {k: v for k, v in spec.items() if k not in ("value", "values", "min", "max", "distribution", "q")}
    return {**rest, "value": values[0]} if "value" in spec else {**rest, "values": values}


def translate_parameters(
    parameters: dict, known: set[str], rename: dict[str, str], ignore: set[str]
) -> tuple[list[Translated], list[Reading], list[str]]:
    """The sweep's parameters in our settings' names and values, how each key was read, and every problem."""
    translated: list[Translated] = []
    readings: list[Reading] = []
    problems: list[str] = []
    known_keys = sorted(known | set(KEY_ALIASES) | set(FREEZE_KEYS) | set(PLUMBING))
    for raw_key, spec in parameters.items():
        key = str(raw_key)
        where = f"parameters.{printable(key)}"
        if key in ignore:
            readings.append(Reading(key, describe(spec), "", "ignored: the file's tune_inat.ignore names it"))
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a mapping such as {{value: ...}} or {{values: [...]}}, got {spec!r}")
            continue
        normal = normalise_key(key)
        choices = _choices(spec)
        if key in rename:
            setting, kind = rename[key], ""
            if setting not in known:
                problems.append(
                    f"tune_inat.rename.{key}: {setting!r} is not a setting{nearest_key(setting, sorted(known))}"
                )
                continue
        elif key in known:
            setting, kind = key, ""
        elif normal == "freeze" and choices and all(isinstance(v, str) for v in choices):
            setting, kind = "freeze_form", "strategy"  # freeze: fc_only (a name, not a fraction)
        elif normal in FREEZE_KEYS:
            setting, kind = "freeze_form", FREEZE_KEYS[normal]
        elif normal in KEY_ALIASES:
            setting, kind = KEY_ALIASES[normal], ("flip" if normal in VALUE_FLIPS else "")
        elif normal in known:
            setting, kind = normal, ""
        elif normal in PLUMBING:
            if choices is not None and len(set(map(repr, choices))) == 1:
                readings.append(Reading(key, describe(spec), "", f"ignored: {PLUMBING[normal]}"))
            else:
                problems.append(
                    f"{where}: the search sets this itself ({PLUMBING[normal]}), so it cannot be searched over "
                    f"{describe(spec)}; give it one value, or remove it"
                )
            continue
        else:
            problems.append(
                f"{where}: unknown setting{nearest_key(key, known_keys)}; say what it means with "
                f"tune_inat: {{rename: {{{printable(key)}: SETTING}}}}, or tune_inat: {{ignore: [{printable(key)}]}}"
            )
            continue
        result = _translate_values(where, setting, kind, spec, choices, problems)
        if result is None:
            continue
        new_spec, notes = result
        translated.append(Translated(key, setting, new_spec))
        meaning = describe(new_spec) + (" (1 - the trainable share)" if kind == "flip" else "")
        readings.append(Reading(key, describe(spec), setting, meaning, "; ".join(dict.fromkeys(n for n in notes if n))))
    seen: dict[str, str] = {}
    for item in translated:
        group = "freezing" if item.setting in ("freeze_fraction", "freeze_form") else item.setting
        if group in seen:
            problems.append(f"parameters.{item.key}: {group} is given twice (as {seen[group]!r} and {item.key!r})")
        seen[group] = item.key
    return translated, readings, problems


def _translate_values(
    where: str, setting: str, kind: str, spec: dict, choices: list | None, problems: list[str]
) -> tuple[dict, list[str]] | None:
    """`spec` with each value as ours, and the notes of the choices made; None (problems added) if a value fails."""
    if kind == "flip":  # a trainable share: ours is 1 - it, the range reversed
        if choices is not None:
            return _with_choices(spec, [1 - v if is_plain_number(v) else v for v in choices]), []
        if spec.get("distribution", "uniform") not in ("uniform", "q_uniform") or not all(
            is_plain_number(spec.get(b)) for b in ("min", "max")
        ):
            problems.append(
                f"{where}: a trainable share takes values or a uniform range of numbers, got {describe(spec)}"
            )
            return None
        return {**spec, "min": 1 - spec["max"], "max": 1 - spec["min"]}, []
    if kind:  # a freeze strategy, layer or count
        if (
            choices is None
            and kind in ("frozen", "trainable")
            and all(isinstance(spec.get(b), int) for b in ("min", "max"))
        ):
            choices = list(range(spec["min"], spec["max"] + 1)[:1000])  # a range of counts: every count in it
            spec = {k: v for k, v in spec.items() if k not in ("min", "max", "distribution", "q")} | {"values": choices}
        if choices is None:
            problems.append(f"{where}: freezing by {kind} takes value or values, not {describe(spec)}")
            return None
        forms = []
        for value in choices:
            form, why = freeze_form(kind, value)
            if form is None:
                problems.append(f"{where}: {why}")
                return None
            forms.append(form)
        return _with_choices(spec, forms), []
    if choices is None:
        return spec, []
    values, notes = [], []
    for value in choices:
        try:
            ours, note = translate_value(setting, value)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            return None
        values.append(ours)
        notes.append(note)
    return _with_choices(spec, values), notes
