"""The pieces of a backbone's forward pass as a flat list of stages, so the frozen prefix can be split off.

Each registry entry's `stages(net)` (`backbones.py`) returns modules that, applied in order,
compute exactly what `net(x)` computes in evaluation mode (tested for every backbone); the
helper modules it needs for the steps torchvision writes inline live here. The leading stages without a
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


def frozen_prefix_length(stages: list[nn.Module]) -> int:
    """How many leading stages own no trainable parameter (the last stage, the head, always trains)."""
    for index, stage in enumerate(stages):
        if any(p.requires_grad for p in stage.parameters()):
            return index
    return len(stages)
