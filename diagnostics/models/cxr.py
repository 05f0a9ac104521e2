"""CXR networks: torchvision and MONAI backbones behind one head that also yields a CAM.

Every network is `features -> 1x1 conv -> CAM (B, F, h, w) -> spatial mean -> logits (B, F)`.
A 1x1 convolution followed by global average pooling equals global average pooling followed by
a linear layer, so the logits are those of the usual classifier, and the class activation map
(Zhou et al. 2016) comes out of the same graph: it exports to ONNX, and a clinic needs no torch
to draw heatmaps.

Backbones take 1 or 3 input channels. ImageNet weights are optional and off by default; with one
input channel the first convolution's pretrained weights are summed over RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diagnostics.models.registry import register_model


class CAMClassifier(nn.Module):
    """features (B, C, h, w) -> CAM (B, F, h, w) and logits (B, F) = CAM averaged over h, w.

    Optionally a population head (`add_population_head`): one logit per image from the pooled
    features, high for images of the population the model is made for, trained with images
    from outside it (outlier exposure). It is part of the exported graph, so the clinic's input
    QC needs no torch.
    """

    def __init__(
        self, features: nn.Module, n_features: int, num_classes: int, dropout: float = 0.0
    ):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(n_features, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self.n_features = n_features
        self.population: nn.Linear | None = None

    def add_population_head(self) -> CAMClassifier:
        self.population = nn.Linear(self.n_features, 1)
        return self

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, F) and the population logit (B,) or None, in one pass."""
        feats = self.features(x)  # (B, C, h, w)
        logits = self.head(self.dropout(feats)).mean(dim=(2, 3))
        if self.population is None:
            return logits, None
        return logits, self.population(self.dropout(feats.mean(dim=(2, 3)))).squeeze(1)

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(self.dropout(self.features(x)))  # (B, F, h, w), logit units
        return cam.mean(dim=(2, 3)), cam  # (B, F), (B, F, h, w)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits (B, F), CAM (B, F, h, w) and the pooled features (B, C) the head sees.

        The pooled features are what input QC measures against the training distribution.
        """
        feats = self.features(x)  # (B, C, h, w)
        cam = self.head(self.dropout(feats))
        return cam.mean(dim=(2, 3)), cam, feats.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cam(x)[0]


class WithCAM(nn.Module):
    """Export wrapper: outputs (logits, cam, embedding), and `population` (B,) when the model
    has a population head."""

    def __init__(self, model: CAMClassifier):
        super().__init__()
        self.model = model

    def output_names(self) -> list[str]:
        names = ["logits", "cam", "embedding"]
        return [*names, "population"] if self.model.population is not None else names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, cam, embedding = self.model.forward_all(x)
        if self.model.population is None:
            return logits, cam, embedding
        return logits, cam, embedding, self.model.population(embedding).squeeze(1)


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The same convolution for `in_channels` inputs; pretrained RGB weights are summed."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:
            new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    return new


def _torchvision(
    builder: Callable[..., nn.Module], pretrained: bool, weights_path: str | Path | None
) -> nn.Module:
    """A torchvision model: random, ImageNet (downloaded once to TORCH_HOME) or local weights."""
    if weights_path is not None:
        model = builder(weights=None)
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model
    return builder(weights="DEFAULT" if pretrained else None)


def _check(in_channels: int, num_classes: int) -> None:
    if in_channels not in (1, 3):
        raise ValueError("in_channels must be 1 or 3")
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")


def _densenet_features(net: Any, in_channels: int) -> tuple[nn.Module, int]:
    net.features.conv0 = adapt_first_conv(net.features.conv0, in_channels)
    # torchvision applies the final ReLU outside `features`
    return nn.Sequential(net.features, nn.ReLU(inplace=False)), net.classifier.in_features


def _resnet_features(net: Any, in_channels: int) -> tuple[nn.Module, int]:
    net.conv1 = adapt_first_conv(net.conv1, in_channels)
    layers = (
        net.conv1,
        net.bn1,
        net.relu,
        net.maxpool,
        net.layer1,
        net.layer2,
        net.layer3,
        net.layer4,
    )
    return nn.Sequential(*layers), net.fc.in_features


def _efficientnet_features(net: Any, in_channels: int) -> tuple[nn.Module, int]:
    net.features[0][0] = adapt_first_conv(net.features[0][0], in_channels)
    return net.features, net.classifier[1].in_features


def _register_torchvision(
    name: str, features: Callable[[Any, int], tuple[nn.Module, int]], doc: str
) -> None:
    """Register torchvision's `name` behind the CAM head, with the standard factory arguments."""

    def factory(
        in_channels: int = 1,
        num_classes: int = 14,
        pretrained: bool = False,
        weights_path: str | Path | None = None,
        dropout: float = 0.0,
    ) -> CAMClassifier:
        import torchvision.models

        _check(in_channels, num_classes)
        net = _torchvision(getattr(torchvision.models, name), pretrained, weights_path)
        body, n_features = features(net, in_channels)
        return CAMClassifier(body, n_features, num_classes, dropout)

    factory.__name__, factory.__doc__ = name, doc
    register_model(name)(factory)


_register_torchvision("densenet121", _densenet_features, "DenseNet-121, the CheXNet architecture.")
_register_torchvision("resnet18", _resnet_features, "ResNet-18 (torchvision).")
_register_torchvision("resnet50", _resnet_features, "ResNet-50 (torchvision).")
_register_torchvision("efficientnet_b0", _efficientnet_features, "EfficientNet-B0 (torchvision).")


@register_model("monai_densenet121")
def monai_densenet121(
    in_channels: int = 1,
    num_classes: int = 14,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    dropout: float = 0.0,
) -> CAMClassifier:
    """MONAI's DenseNet121 (2D). MONAI ships no ImageNet weights for it: `weights_path` loads a
    state dict saved from the same MONAI network."""
    from monai.networks.nets import DenseNet121

    _check(in_channels, num_classes)
    if pretrained and weights_path is None:
        raise ValueError("monai_densenet121 has no downloadable ImageNet weights; set weights_path")
    net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
    if weights_path is not None:
        net.load_state_dict(torch.load(Path(weights_path), map_location="cpu", weights_only=True))
    n_features = net.class_layers.out.in_features
    features = nn.Sequential(net.features, nn.ReLU(inplace=False))  # class_layers start with ReLU
    return CAMClassifier(features, n_features, num_classes, dropout)


def _conv_blocks(c_in: int, width: int, blocks: int) -> tuple[list[nn.Module], int]:
    """`blocks` x (conv3x3-BN-ReLU, conv3x3-BN-ReLU, max-pool but after the last), `width`
    doubling per block. Returns the layers and the output channels."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        c_out = width * 2**i
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if i < blocks - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    return layers, c_in


def _small_cnn(
    name: str,
    stem: list[nn.Module],
    c_in: int,
    num_classes: int,
    pretrained: bool,
    weights_path: str | Path | None,
    dropout: float,
    width: int,
    blocks: int,
) -> CAMClassifier:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights")
    body, c_out = _conv_blocks(c_in, width, blocks)
    model = CAMClassifier(nn.Sequential(*stem, *body), c_out, num_classes, dropout)
    if weights_path is not None:
        model.load_state_dict(torch.load(Path(weights_path), map_location="cpu", weights_only=True))
    return model


@register_model("tiny_cnn")
def tiny_cnn(
    in_channels: int = 1,
    num_classes: int = 14,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    dropout: float = 0.0,
    width: int = 16,
    blocks: int = 4,
) -> CAMClassifier:
    """A small CNN for tests and the demo: `blocks` x (conv3x3-BN-ReLU, conv3x3-BN-ReLU, pool)."""
    _check(in_channels, num_classes)
    return _small_cnn(
        "tiny_cnn", [], in_channels, num_classes, pretrained, weights_path, dropout, width, blocks
    )


@register_model("compact_cnn")
def compact_cnn(
    in_channels: int = 1,
    num_classes: int = 14,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    dropout: float = 0.0,
    width: int = 32,
    blocks: int = 4,
    stem: int = 16,
) -> CAMClassifier:
    """A compact CNN for low-resolution CXR, trained from scratch in minutes on a CPU:
    a stride-2 stem, then `blocks` x (conv3x3-BN-ReLU x 2, max-pool), `width` doubling per
    block. At 128 px: 1.2 M parameters, 0.47 GFLOP per image, an 8 x 8 CAM."""
    _check(in_channels, num_classes)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
    ]
    return _small_cnn(
        "compact_cnn", layers, stem, num_classes, pretrained, weights_path, dropout, width, blocks
    )
