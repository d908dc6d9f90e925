"""Every fact about a backbone in one registry entry: torchvision builder, native size, heads, stages, layout.

Like timm's per-model config: the model factory (`models.py`), the frozen-prefix split
(`stages.py`), the training loop (`engine.py`) and the settings validation (`settings.py`) all ask
the entry and never test a backbone's name. Adding a torchvision backbone is one `register(...)`
call (see `tests/test_models.py`, which registers one the project does not ship and trains it).

Importing this module loads neither torch nor torchvision: validating a space file or reading
results needs the facts, not the networks. The stage functions import torch when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tune_inat.errors import UserError


@dataclass(frozen=True)
class AuxBranch:
    """An auxiliary classifier: its module, its final Linear, and the trunk block it reads."""

    module: str
    head: str
    attached_to: str


@dataclass(frozen=True)
class Backbone:
    """One torchvision architecture, as the factory, the stage split and the loop need it."""

    name: str
    native_size: int  # the input size its ImageNet weights were evaluated at (torchvision's metadata)
    head: str  # dotted path of the final Linear classifier, replaced by a fresh one
    stages: Callable[[Any], list]  # net -> modules whose composition is net's forward in eval mode
    aux: tuple[AuxBranch, ...] = ()
    aux_weight: float = 0.0  # loss weight of each auxiliary head (from the papers)
    aux_min_size: int = 0  # smallest input the auxiliary branches accept
    min_size: int = 16
    size_multiple: int = 1
    channels_last: bool = True  # a convolutional net: NHWC memory format on CUDA
    fixed_input_size: bool = False  # built for one input size (ViT): image_size is a constructor argument
    builder: str = ""  # torchvision model name; empty: the same as `name`
    last_block: str = ""  # the module where "the last block" begins (freeze_form last_block trains it and after)

    @property
    def torchvision_name(self) -> str:
        return self.builder or self.name


BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add (or replace) a registry entry; returns it."""
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def check_image_size(name: str, image_size: int) -> None:
    backbone = get_backbone(name)
    if image_size < backbone.min_size:
        raise UserError(f"{name} needs image_size >= {backbone.min_size}, got {image_size}")
    if image_size % backbone.size_multiple:
        raise UserError(f"{name} needs image_size divisible by {backbone.size_multiple}, got {image_size}")


# -- stage lists: each backbone's forward pass as a flat list of modules ------------------------


def _flatten() -> Any:
    from torch import nn

    return nn.Flatten(1)


def _expand(container: Any) -> list:
    """Children of a Sequential, one level deep (plain Sequentials of blocks are opened, others kept)."""
    from torch import nn

    stages: list = []
    for child in container.children():
        stages.extend(child.children() if type(child) is nn.Sequential else [child])
    return stages


def _input_transform(net: Any) -> list:
    from tune_inat.stages import TransformInput

    return [TransformInput(net)] if getattr(net, "transform_input", False) else []


def resnet_stages(net: Any) -> list:
    return [
        net.conv1,
        net.bn1,
        net.relu,
        net.maxpool,
        *net.layer1,
        *net.layer2,
        *net.layer3,
        *net.layer4,
        net.avgpool,
        _flatten(),
        net.fc,
    ]


def vgg_stages(net: Any) -> list:
    return [*net.features, net.avgpool, _flatten(), *net.classifier]


def features_classifier_stages(net: Any) -> list:
    """EfficientNet, MobileNet, RegNet-like nets: features, pooling, classifier."""
    return [*_expand(net.features), net.avgpool, _flatten(), *net.classifier]


def convnext_stages(net: Any) -> list:
    return [*_expand(net.features), net.avgpool, *net.classifier]


def vit_stages(net: Any) -> list:
    from tune_inat.stages import ClassToken, ViTEmbed, ViTPositions

    return [ViTEmbed(net), ViTPositions(net.encoder), *net.encoder.layers, net.encoder.ln, ClassToken(), *net.heads]


def densenet_stages(net: Any) -> list:
    from torch import nn

    return [*net.features.children(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), _flatten(), net.classifier]


def mobilenet_v2_stages(net: Any) -> list:
    from torch import nn

    return [*net.features, nn.AdaptiveAvgPool2d(1), _flatten(), *net.classifier]


def swin_stages(net: Any) -> list:
    return [*_expand(net.features), net.norm, net.permute, net.avgpool, net.flatten, net.head]


def regnet_stages(net: Any) -> list:
    return [net.stem, *net.trunk_output, net.avgpool, _flatten(), net.fc]


def googlenet_stages(net: Any) -> list:
    return [
        *_input_transform(net),
        net.conv1,
        net.maxpool1,
        net.conv2,
        net.conv3,
        net.maxpool2,
        net.inception3a,
        net.inception3b,
        net.maxpool3,
        net.inception4a,
        net.inception4b,
        net.inception4c,
        net.inception4d,
        net.inception4e,
        net.maxpool4,
        net.inception5a,
        net.inception5b,
        net.avgpool,
        _flatten(),
        net.dropout,
        net.fc,
    ]


def inception_v3_stages(net: Any) -> list:
    return [
        *_input_transform(net),
        net.Conv2d_1a_3x3,
        net.Conv2d_2a_3x3,
        net.Conv2d_2b_3x3,
        net.maxpool1,
        net.Conv2d_3b_1x1,
        net.Conv2d_4a_3x3,
        net.maxpool2,
        net.Mixed_5b,
        net.Mixed_5c,
        net.Mixed_5d,
        net.Mixed_6a,
        net.Mixed_6b,
        net.Mixed_6c,
        net.Mixed_6d,
        net.Mixed_6e,
        net.Mixed_7a,
        net.Mixed_7b,
        net.Mixed_7c,
        net.avgpool,
        net.dropout,
        _flatten(),
        net.fc,
    ]


# -- the shipped backbones ------------------------------------------------------------------------

for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"):
    register(Backbone(_name, 224, head="fc", stages=resnet_stages, last_block="layer4"))
register(Backbone("vgg16", 224, head="classifier.6", stages=vgg_stages, last_block="features.24"))
register(Backbone("vgg16_bn", 224, head="classifier.6", stages=vgg_stages, last_block="features.34"))
register(Backbone("alexnet", 224, head="classifier.6", stages=vgg_stages, min_size=64, last_block="features.10"))
register(
    Backbone(
        "googlenet",
        224,
        head="fc",
        stages=googlenet_stages,
        aux_weight=0.3,
        aux=(AuxBranch("aux1", "aux1.fc2", "inception4a"), AuxBranch("aux2", "aux2.fc2", "inception4d")),
        last_block="inception5a",
    )
)
register(
    Backbone(
        "inception_v3",
        299,
        head="fc",
        stages=inception_v3_stages,
        aux_weight=0.4,
        aux_min_size=299,
        min_size=75,
        aux=(AuxBranch("AuxLogits", "AuxLogits.fc", "Mixed_6e"),),
        last_block="Mixed_7a",
    )
)
register(
    Backbone("efficientnet_v2_s", 384, head="classifier.1", stages=features_classifier_stages, last_block="features.6")
)
register(
    Backbone("efficientnet_v2_m", 480, head="classifier.1", stages=features_classifier_stages, last_block="features.7")
)
register(
    Backbone("efficientnet_b0", 224, head="classifier.1", stages=features_classifier_stages, last_block="features.7")
)
register(
    Backbone("efficientnet_b3", 300, head="classifier.1", stages=features_classifier_stages, last_block="features.7")
)
register(Backbone("convnext_tiny", 224, head="classifier.2", stages=convnext_stages, last_block="features.7"))
register(Backbone("convnext_small", 224, head="classifier.2", stages=convnext_stages, last_block="features.7"))
register(
    Backbone(
        "densenet121", 224, head="classifier", stages=densenet_stages, min_size=32, last_block="features.denseblock4"
    )
)
register(Backbone("mobilenet_v2", 224, head="classifier.1", stages=mobilenet_v2_stages, last_block="features.17"))
register(Backbone("regnet_y_800mf", 224, head="fc", stages=regnet_stages, last_block="trunk_output.block4"))
register(
    Backbone(
        "swin_t", 224, head="head", stages=swin_stages, size_multiple=32, channels_last=False, last_block="features.7"
    )
)
for _name, _patch in (("vit_b_16", 16), ("vit_b_32", 32)):
    register(
        Backbone(
            _name,
            224,
            head="heads.head",
            stages=vit_stages,
            size_multiple=_patch,
            channels_last=False,
            fixed_input_size=True,
            last_block="encoder.layers.encoder_layer_11",
        )
    )
register(
    Backbone(
        "mobilenet_v3_small", 224, head="classifier.3", stages=features_classifier_stages, last_block="features.11"
    )
)
register(
    Backbone(
        "mobilenet_v3_large", 224, head="classifier.3", stages=features_classifier_stages, last_block="features.15"
    )
)
