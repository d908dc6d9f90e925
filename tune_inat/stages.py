"""Every backbone's forward pass as a flat list of stages, so the frozen prefix can be split off.

`forward_stages(net, backbone)` returns modules that, applied in order, compute exactly what
`net(x)` computes in evaluation mode (tested for every backbone). The leading stages without a
trainable parameter form the frozen prefix: it runs in evaluation mode, and when augmentation is
off its outputs are the same every epoch, so they can be computed once and cached.
"""

from __future__ import annotations

import torch
from torch import nn


class TransformInput(nn.Module):
    """googlenet/inception_v3 with ImageNet weights re-normalise their input first."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._transform = net._transform_input  # a bound method: no parameters, no module registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x)


class ViTEmbed(nn.Module):
    """Patch embedding plus the class token (VisionTransformer._process_input and the concatenation)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.hidden_dim = net.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        return torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)


class ViTPositions(nn.Module):
    """The encoder's position embedding and dropout, before its layers."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.pos_embedding = encoder.pos_embedding
        self.dropout = encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pos_embedding)


class ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _expand(container: nn.Module) -> list[nn.Module]:
    """Children of a Sequential, one level deep (plain Sequentials of blocks are opened, others kept)."""
    stages: list[nn.Module] = []
    for child in container.children():
        stages.extend(child.children() if type(child) is nn.Sequential else [child])
    return stages


def forward_stages(net: nn.Module, backbone: str) -> list[nn.Module]:
    """The modules whose composition is `net`'s forward in evaluation mode (no auxiliary heads)."""
    if backbone.startswith("resnet"):
        return [net.conv1, net.bn1, net.relu, net.maxpool, *net.layer1, *net.layer2, *net.layer3, *net.layer4,
                net.avgpool, nn.Flatten(1), net.fc]
    if backbone.startswith("vgg"):
        return [*net.features, net.avgpool, nn.Flatten(1), *net.classifier]
    if backbone.startswith(("efficientnet", "mobilenet")):
        return [*_expand(net.features), net.avgpool, nn.Flatten(1), *net.classifier]
    if backbone.startswith("convnext"):
        return [*_expand(net.features), net.avgpool, *net.classifier]
    if backbone.startswith("vit"):
        return [ViTEmbed(net), ViTPositions(net.encoder), *net.encoder.layers, net.encoder.ln, ClassToken(), *net.heads]
    head = [TransformInput(net)] if getattr(net, "transform_input", False) else []
    if backbone == "googlenet":
        return [*head, net.conv1, net.maxpool1, net.conv2, net.conv3, net.maxpool2, net.inception3a, net.inception3b,
                net.maxpool3, net.inception4a, net.inception4b, net.inception4c, net.inception4d, net.inception4e,
                net.maxpool4, net.inception5a, net.inception5b, net.avgpool, nn.Flatten(1), net.dropout, net.fc]
    if backbone == "inception_v3":
        return [*head, net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
                net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
                net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool,
                net.dropout, nn.Flatten(1), net.fc]
    raise KeyError(f"no stage list for {backbone}")


def frozen_prefix_length(stages: list[nn.Module]) -> int:
    """How many leading stages own no trainable parameter (the last stage, the head, always trains)."""
    for index, stage in enumerate(stages):
        if any(p.requires_grad for p in stage.parameters()):
            return index
    return len(stages)
