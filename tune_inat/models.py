"""One factory for every supported torchvision backbone: build, new head, freeze, parameter groups.

`build_model(name, num_classes, weights, image_size, freeze_fraction)` is the only way a model
is made, for any backbone (like timm's `create_model`): the torchvision architecture, the
weights (`imagenet`, `none`, or a state_dict file), a fresh `num_classes` head (auxiliary heads
too), and the freeze fraction applied. The result is a `FineTuneModel` whose `forward` always
returns the main logits and whose `training_loss` adds the auxiliary heads where they help.

Freeze semantics: the backbone's parameterised modules (modules owning parameters directly),
in forward order, without the new head and auxiliary branches; the first
`floor(f * count)` of them are frozen. f = 0 trains everything, f = 1 only the head.
BatchNorm layers in the frozen part stay in eval mode, so their running statistics never move.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.vision_transformer import interpolate_embeddings

from tune_inat.backbones import BACKBONES, Backbone, check_image_size, get_backbone
from tune_inat.cli import command_parser, run_command
from tune_inat.data.batches import IMAGENET_MEAN, IMAGENET_STD
from tune_inat.data.decode import EVAL_CROP_FRACTION
from tune_inat.errors import UserError
from tune_inat.stages import frozen_prefix_length


def native_image_size(name: str) -> int:
    """The input size the ImageNet weights were evaluated at (299 for inception_v3, 384 for efficientnet_v2_s)."""
    return get_backbone(name).native_size


class FineTuneModel(nn.Module):
    """A torchvision network with a new head and a frozen prefix whose BatchNorms stay in eval mode."""

    def __init__(self, net: nn.Module, backbone: str, aux_weight: float, frozen_modules: list[str]) -> None:
        super().__init__()
        self.net = net
        self.backbone = backbone
        self.aux_weight = aux_weight
        self.frozen_modules = frozen_modules
        self._frozen_norms = [
            m for name in frozen_modules if isinstance(m := net.get_submodule(name), nn.modules.batchnorm._BatchNorm)
        ]
        self.stages = get_backbone(backbone).stages(net)  # a plain list: the same modules, not registered twice
        self.prefix_length = frozen_prefix_length(self.stages)

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        self.keep_frozen_in_eval()
        return self

    def keep_frozen_in_eval(self) -> None:
        """The frozen prefix runs as in evaluation (no dropout, fixed BatchNorm), whatever the mode."""
        for norm in self._frozen_norms:
            norm.eval()
        for stage in self.stages[: self.prefix_length]:
            stage.eval()

    @property
    def has_active_aux_heads(self) -> bool:
        return any(getattr(self.net, branch.module, None) is not None for branch in get_backbone(self.backbone).aux)

    def split_frozen_prefix(self) -> tuple[nn.Module, nn.Module] | None:
        """(frozen prefix, trainable rest) with rest(prefix(x)) == self(x); None when nothing is frozen."""
        if self.prefix_length == 0 or self.has_active_aux_heads:
            return None
        return nn.Sequential(*self.stages[: self.prefix_length]).eval(), TrainableSuffix(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _main_logits(self.net(images))

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to optimise, main head's loss, main logits): aux heads add `aux_weight * their loss`."""
        outputs = self.net(images)
        logits = _main_logits(outputs)
        main_loss = criterion(logits, labels)
        loss = main_loss
        if isinstance(outputs, tuple):
            for aux_logits in outputs[1:]:
                if aux_logits is not None:
                    loss = loss + self.aux_weight * criterion(aux_logits, labels)
        return loss, main_loss, logits

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def frozen_parameter_share(self) -> float:
        """The share of the model's parameters that do not train: what a freeze form or fraction came to."""
        return 1.0 - self.num_trainable_parameters() / self.num_parameters()

    def head_parameter_names(self) -> set[str]:
        """Parameters of the new head and of the auxiliary heads: they train at the full `lr`."""
        backbone = get_backbone(self.backbone)
        prefixes = tuple(f"net.{head}." for head in [backbone.head, *(branch.head for branch in backbone.aux)])
        return {name for name, _ in self.named_parameters() if name.startswith(prefixes)}


class TrainableSuffix(nn.Module):
    """The stages after the frozen prefix: trained on the prefix's cached outputs instead of images."""

    def __init__(self, model: FineTuneModel) -> None:
        super().__init__()
        self.rest = nn.Sequential(*model.stages[model.prefix_length :])
        object.__setattr__(self, "_model", model)  # not a submodule: its modes are kept, not its parameters twice

    def train(self, mode: bool = True) -> TrainableSuffix:
        super().train(mode)
        self._model.keep_frozen_in_eval()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.rest(features)

    def training_loss(
        self, features: torch.Tensor, labels: torch.Tensor, criterion: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.rest(features)
        loss = criterion(logits, labels)
        return loss, loss, logits


def _main_logits(outputs: Any) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs  # torchvision's aux namedtuples


@dataclass(frozen=True)
class HeadSpec:
    """The new classifier: dropout before it, and optionally one hidden layer (the users' dense_size)."""

    dropout: float = 0.0
    hidden: int = 0

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        if not self.dropout and not self.hidden:
            return nn.Linear(in_features, num_classes)
        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout else []
        if self.hidden:
            layers += [nn.Linear(in_features, self.hidden), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(self.dropout)] if self.dropout else []
        return nn.Sequential(*layers, nn.Linear(self.hidden or in_features, num_classes))


def _replace_linear(net: nn.Module, path: str, num_classes: int, head: HeadSpec = HeadSpec()) -> None:
    old = net.get_submodule(path)
    net.set_submodule(path, head.build(old.in_features, num_classes))


def parameterised_modules(net: nn.Module, backbone: Backbone) -> list[str]:
    """Names of the backbone's modules that own parameters, in forward order, without heads and aux branches."""
    excluded = [backbone.head] + [branch.module for branch in backbone.aux]
    return [
        name
        for name, module in net.named_modules()
        if any(True for _ in module.parameters(recurse=False))
        and not any(name == ex or name.startswith(ex + ".") for ex in excluded)
    ]


def blocks(net: nn.Module, backbone: Backbone) -> list[nn.Module]:
    """The backbone's blocks, in forward order: the stages of its registry entry that hold parameters, head excluded.

    What a freeze count means ("freeze the first 5", "leave the last 2 trainable"): resnet50 has 18
    (conv1, bn1 and its 16 bottlenecks), vgg16 15 (13 convolutions, then the two hidden linears of its
    classifier), vit_b_16 15 (embedding, positions, 12 encoder layers, final norm).
    """
    head = net.get_submodule(backbone.head)
    return [stage for stage in backbone.stages(net)[:-1] if stage is not head and any(True for _ in stage.parameters())]


def frozen_module_count(net: nn.Module, backbone: Backbone, modules: list[str], fraction: float, form: str) -> int:
    """How many of `modules` (parameterised, forward order) a freeze form freezes; `fraction` when form is ''."""
    kind, _, value = form.partition(":")
    if form in ("", "head_only", "all", "partial") or kind in ("trainable", "frozen"):
        if form in ("", "head_only", "all"):
            share = {"head_only": 1.0, "all": 0.0}.get(form, fraction)
            return math.floor(share * len(modules) + 1e-9)
        stages = blocks(net, backbone)
        count = {"partial": len(stages) // 2, "frozen": int(value or 0)}.get(kind, len(stages) - int(value or 0))
        count = min(max(count, 0), len(stages))
        if count == len(stages):
            return len(modules)
        first_trained = {id(p) for p in stages[count].parameters()}
        return next(i for i, name in enumerate(modules) if _owns_any(net, name, first_trained))
    layer = backbone.last_block if form == "last_block" else value
    index = next((i for i, name in enumerate(modules) if name == layer or name.startswith(layer + ".")), None)
    if index is None:
        raise UserError(
            f"{backbone.name} has no layer {layer!r} to unfreeze from; "
            f"its layers: {', '.join(layer_names(net, backbone))}"
        )
    return index


def _owns_any(net: nn.Module, name: str, parameter_ids: set[int]) -> bool:
    return any(id(p) in parameter_ids for p in net.get_submodule(name).parameters(recurse=False))


def layer_names(net: nn.Module, backbone: Backbone) -> list[str]:
    """The names a user can unfreeze from: the top-level modules and their direct children that hold parameters."""
    names = []
    for name, module in net.named_modules():
        if (
            name
            and name.count(".") <= 1
            and not name.startswith(backbone.head)
            and any(True for _ in module.parameters())
        ):
            names.append(name)
    return names


@functools.cache
def layer_names_of(name: str) -> tuple[str, ...]:
    """The module names of backbone `name` a freeze can start at: those holding parameters, head and auxiliary
    branches excluded (built on the meta device: no memory, no weights)."""
    backbone = get_backbone(name)
    with torch.device("meta"):
        net = tv_models.get_model(backbone.torchvision_name, weights=None)
    excluded = [backbone.head, *(branch.module for branch in backbone.aux)]
    return tuple(
        n
        for n, module in net.named_modules()
        if n
        and not any(n == ex or n.startswith(ex + ".") for ex in excluded)
        and any(True for _ in module.parameters())
    )


def freeze_prefix(net: nn.Module, modules: list[str], fraction: float, count: int | None = None) -> list[str]:
    """Freeze the first `count` modules (default floor(fraction * len(modules))); return their names."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"freeze_fraction must be in [0, 1], got {fraction}")
    frozen = modules[: math.floor(fraction * len(modules) + 1e-9) if count is None else count]
    for name in frozen:
        for param in net.get_submodule(name).parameters(recurse=False):
            param.requires_grad_(False)
    return frozen


def _load_torchvision(backbone: Backbone, weights: str, image_size: int, aux: bool) -> nn.Module:
    name = backbone.torchvision_name
    kwargs: dict[str, Any] = {}
    if backbone.aux:
        kwargs["aux_logits"] = aux
        if weights == "none":
            kwargs["init_weights"] = False
    if backbone.fixed_input_size and weights == "none":
        kwargs["image_size"] = image_size
    if weights == "imagenet":
        fetch_weights(backbone.name)  # one clear line when offline, before torchvision tries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet: "auxiliary heads are not pretrained"
            return tv_models.get_model(name, weights=tv_models.get_model_weights(name).DEFAULT, **kwargs)
    net = tv_models.get_model(name, weights=None, **kwargs)
    if weights != "none":
        _load_state_dict_file(net, Path(weights), name)
    return net


def _load_state_dict_file(net: nn.Module, path: Path, name: str) -> None:
    """Load backbone weights from a state_dict file; head tensors of another shape are skipped."""
    if not path.is_file():
        raise UserError(f"weights must be 'imagenet', 'none' or a state_dict file; {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read weights file {path}: {str(err).splitlines()[0]}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    if all(key.startswith("net.") for key in state):
        state = {key[len("net.") :]: value for key, value in state.items()}
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    if len(missing) > 0.2 * len(own):
        raise UserError(
            f"weights file {path} does not fit {name}: {len(missing)} of {len(own)} tensors missing or of another shape"
        )
    net.load_state_dict(usable, strict=False)


def _resize_fixed_input(net: nn.Module, backbone: Backbone, image_size: int) -> nn.Module:
    """Rebuild a net made for one input size (ViT) for another, interpolating its position embeddings."""
    patch_size = net.patch_size
    state = interpolate_embeddings(image_size, patch_size, net.state_dict())
    resized = tv_models.get_model(backbone.torchvision_name, weights=None, image_size=image_size)
    resized.load_state_dict(state)
    return resized


def build_model(
    name: str,
    num_classes: int,
    weights: str = "imagenet",
    image_size: int | None = None,
    freeze_fraction: float = 0.0,
    auxiliary_heads: bool = True,
    freeze_form: str = "",
    head: HeadSpec = HeadSpec(),
) -> FineTuneModel:
    """Build `name` with a fresh `num_classes` head and the first `freeze_fraction` of it frozen.

    Auxiliary heads (googlenet, inception_v3) are kept only for training that can use them:
    `auxiliary_heads` is True, the input is large enough, and the block they read still learns.
    """
    backbone = get_backbone(name)
    image_size = image_size or backbone.native_size
    check_image_size(name, image_size)
    if num_classes < 2:
        raise UserError(f"need at least 2 classes, got {num_classes}")
    head_only = freeze_form == "head_only" or (not freeze_form and freeze_fraction >= 1.0)
    use_aux = auxiliary_heads and bool(backbone.aux) and not head_only and image_size >= backbone.aux_min_size
    net = _load_torchvision(backbone, weights, image_size, aux=use_aux)
    if backbone.fixed_input_size and weights != "none" and image_size != net.image_size:
        net = _resize_fixed_input(net, backbone, image_size)
    _replace_linear(net, backbone.head, num_classes, head)
    modules = parameterised_modules(net, backbone)
    count = frozen_module_count(net, backbone, modules, freeze_fraction, freeze_form)
    frozen = freeze_prefix(net, modules, freeze_fraction, count)
    for branch in backbone.aux if use_aux else ():
        _replace_linear(net, branch.head, num_classes)
        if not any(p.requires_grad for p in net.get_submodule(branch.attached_to).parameters()):
            setattr(net, branch.module, None)  # an aux head helps only if the block it reads still learns
    return FineTuneModel(net, name, backbone.aux_weight, frozen_modules=frozen)


def parameter_groups(
    model: FineTuneModel, lr: float, backbone_lr_scale: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Head at `lr`, backbone at `lr * backbone_lr_scale`; no weight decay on biases and norms."""
    heads = model.head_parameter_names()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name in heads, param.ndim > 1), []).append(param)
    return [
        {
            "params": params,
            "lr": lr if is_head else lr * backbone_lr_scale,
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{'head' if is_head else 'backbone'}{'' if decays else '_no_decay'}",
        }
        for (is_head, decays), params in sorted(groups.items(), reverse=True)
    ]


MODEL_FILE_FORMAT = "tune-inat-model/1"


def save_model_file(
    path: Path, model: FineTuneModel, classes: Sequence[str], image_size: int, config: dict[str, Any]
) -> None:
    """One self-contained file: weights (without aux branches), classes, backbone, input size, normalisation."""
    aux_prefixes = tuple(f"net.{branch.module}." for branch in get_backbone(model.backbone).aux)
    payload = {
        "format": MODEL_FILE_FORMAT,
        "backbone": model.backbone,
        "classes": list(classes),
        "image_size": int(image_size),
        "eval_crop_fraction": EVAL_CROP_FRACTION,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(aux_prefixes)},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


def load_model_file(path: Path) -> tuple[FineTuneModel, dict[str, Any]]:
    """Load a file written by `save_model_file` (weights_only: no code is unpickled); damage is one UserError line."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist") from None
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a tune-inat model file ({reason[:200]})") from err
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise UserError(f"{path} is not a tune-inat model file (no {MODEL_FILE_FORMAT!r} format tag)")
    missing = [key for key in ("backbone", "classes", "image_size", "state_dict") if key not in payload]
    if missing:
        raise UserError(f"{path} is damaged: it has no {', '.join(missing)}")
    classes, state = payload["classes"], payload["state_dict"]
    if not isinstance(classes, list) or len(classes) < 2 or not isinstance(state, dict):
        raise UserError(f"{path} is damaged: its class list or weights are not what a model file holds")
    saved = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    try:
        head = HeadSpec(float(saved.get("dropout", 0.0)), int(saved.get("head_hidden", 0)))
    except (TypeError, ValueError):
        raise UserError(f"{path} is damaged: its head settings are not numbers") from None
    model = build_model(
        payload["backbone"], len(classes), "none", payload["image_size"], auxiliary_heads=False, head=head
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        head = state.get(f"net.{get_backbone(model.backbone).head}.weight")
        if head is not None and head.shape[0] != len(classes):
            raise UserError(
                f"{path} is damaged: its class list has {len(classes)} names but its head {head.shape[0]} outputs"
            ) from None
        raise UserError(
            f"{path} is damaged: its weights do not fit {model.backbone} ({str(err).splitlines()[0][:160]})"
        ) from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta


def is_weights_cached(name: str) -> bool:
    """True when the ImageNet weights of `name` are already in the torch hub cache (no download needed)."""
    url = tv_models.get_model_weights(get_backbone(name).torchvision_name).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


def fetch_weights(names: str | Sequence[str], random_init_hint: str = "--set weights=none") -> None:
    """Make sure the ImageNet weights of every backbone in `names` are in the torch hub cache.

    Those that cannot be downloaded are named together in one UserError line, with the one command
    that fetches them all and `random_init_hint`, the flag that trains without them.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    failed, reason = [], ""
    for name in names:
        backbone = get_backbone(name)
        if is_weights_cached(name):
            continue
        try:
            tv_models.get_model_weights(backbone.torchvision_name).DEFAULT.get_state_dict(
                progress=True, check_hash=True
            )
        except (OSError, http.client.HTTPException, RuntimeError) as err:
            failed.append(name)
            reason = reason or (str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__)
    if failed:
        raise UserError(
            f"cannot download the ImageNet weights of {', '.join(failed)} ({reason}); fetch them once on a connected "
            f"machine with `python -m tune_inat.models fetch {' '.join(failed)}` (stored in "
            f"{torch.hub.get_dir()}/checkpoints), or train from random init with `{random_init_hint}`"
        )


def models_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m tune_inat.models", "Backbones and their ImageNet weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="supported backbones, native input sizes, and whether weights are cached")
    fetch = sub.add_parser("fetch", help="download ImageNet weights into the torch cache (for offline use later)")
    fetch.add_argument(
        "backbones",
        nargs="+",
        metavar="BACKBONE",
        choices=list(BACKBONES),
        help=f"one or more of: {', '.join(BACKBONES)}",
    )
    return parser


def models_command(args: argparse.Namespace) -> int:
    if args.command == "list":
        from tune_inat.vocabulary import BACKBONE_FAMILIES

        for name, backbone in BACKBONES.items():
            cached = "cached" if is_weights_cached(name) else "not cached"
            families = sorted(family for family, chosen in BACKBONE_FAMILIES.items() if chosen == name)
            also = f"   also read from: {', '.join(families)}" if families else ""
            print(f"{name:20s} native {backbone.native_size} px   ImageNet weights {cached}{also}")
        print(
            "names are read in any case and spelling (ResNet50, EfficientNet-V2-S); docs/spaces.md's vocabulary table"
        )
        return 0
    fetch_weights(args.backbones, random_init_hint="weights: none")
    print(f"ImageNet weights of {', '.join(args.backbones)} in {torch.hub.get_dir()}/checkpoints")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(models_parser(), models_command, argv)


if __name__ == "__main__":
    sys.exit(main())
