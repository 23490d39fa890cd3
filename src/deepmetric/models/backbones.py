"""Backbones: each constructor returns a module mapping images ``(B, C, H, W)`` to a feature map
``(B, F, h, w)`` and sets ``out_channels = F``.

Catalogued in :data:`deepmetric.models.BACKBONES`: ``resnet18/34/50/101`` (torchvision layout, so
torchvision and timm ResNet state dicts load by key), ``small_cnn`` (tiny grayscale images such as
digits and Fashion-MNIST), and any timm model as ``timm:<name>``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ParameterError


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier.

    Args:
        depth: 18, 34, 50 or 101.
        last_stride: stride of ``layer4`` (2 as in ImageNet; 1 for re-ID, doubling the final map).
        stem_relu: keep the ReLU after the stem BatchNorm. The XBM and Centroids-ReID ResNet50s omit
            it (research-xbm's and centroids-reid's ``resnet.py``); set False to reproduce them.
        in_chans: input channels (weights for 3 channels are averaged when loading for 1 channel).
    """

    def __init__(self, depth: int = 50, last_stride: int = 2, stem_relu: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        import torchvision.models as tvm

        ctor = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101}[depth]
        net = ctor(weights=None)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv1, self.bn1, self.maxpool = net.conv1, net.bn1, net.maxpool
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if last_stride != 2:
            block = self.layer4[0]
            strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # v1.5 bottleneck strides the 3x3
            strided.stride = (last_stride, last_stride)
            if block.downsample is not None:
                block.downsample[0].stride = (last_stride, last_stride)
        self.out_channels = 512 * (4 if depth >= 50 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet(depth: int):
    def build(last_stride: int = 2, stem_relu: bool = True, in_chans: int = 3) -> ResNetTrunk:
        return ResNetTrunk(depth, last_stride=last_stride, stem_relu=stem_relu, in_chans=in_chans)

    build.__name__ = f"resnet{depth}"
    return build


resnet18, resnet34, resnet50, resnet101 = (_resnet(depth) for depth in (18, 34, 50, 101))


NORMS = ("batch", "group", "none")


class SmallCNN(nn.Module):
    """Four conv-norm-ReLU blocks for tiny grayscale images (8x8 digits, 28x28 Fashion-MNIST).

    ``norm``: ``batch`` (default), ``group`` (8 groups; per-sample, so multi-process training matches
    one process exactly without SyncBatchNorm) or ``none``.

    ``grid``: 0 returns the final feature map (the head pools it globally). ``g > 0`` average-pools it
    to ``g x g`` cells and stacks them as channels (a ``(B, C*g*g, 1, 1)`` map): in tiny images *where*
    a stroke is carries the class, and global pooling would discard it.
    """

    def __init__(self, in_chans: int = 1, width: int = 64, norm: str = "batch", grid: int = 0) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ParameterError(f"{{norm}} must be one of {', '.join(NORMS)}, got '{norm}'", "norm")
        chans = [in_chans, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            c = chans[i + 1]
            norm_layer = {"batch": lambda: nn.BatchNorm2d(c), "group": lambda: nn.GroupNorm(min(8, c), c),
                          "none": lambda: nn.Identity()}[norm]()
            layers += [
                nn.Conv2d(chans[i], c, 3, padding=1, bias=norm == "none"),
                norm_layer,
                nn.ReLU(inplace=True),
            ]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.body = nn.Sequential(*layers)
        self.grid = int(grid)
        self.out_channels = chans[-1] * max(1, self.grid) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if self.grid:
            x = grid_pool(x, self.grid).flatten(1)[:, :, None, None]
        return x


def grid_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, g)``: ``(B, C, H, W) -> (B, C, g, g)``, cell ``i`` of an axis of length
    ``n`` averaging rows ``floor(i n / g)`` to ``ceil((i + 1) n / g) - 1`` (PyTorch's bins).

    The ONNX exporter cannot write an adaptive pooling to ``g > 1`` cells over a dynamic ``H, W``, so
    an export computes the same bins as two averaging matrices built from the traced size:
    ``P_H x P_W^T`` (equal to PyTorch's within float rounding). Training and eager inference keep
    PyTorch's kernel.
    """
    if not torch.onnx.is_in_onnx_export():
        return nn.functional.adaptive_avg_pool2d(x, g)
    return _bin_matrix(x.shape[-2], g, x.dtype) @ x @ _bin_matrix(x.shape[-1], g, x.dtype).transpose(0, 1)


def _bin_matrix(n, g: int, dtype: torch.dtype) -> torch.Tensor:
    """``(g, n)``: row ``i`` averages the entries of adaptive-pooling cell ``i`` (``n`` may be traced)."""
    i = torch.arange(g)
    start = torch.div(i * n, g, rounding_mode="floor")
    end = torch.div((i + 1) * n + g - 1, g, rounding_mode="floor")
    j = torch.arange(n)
    inside = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(dtype)
    return inside / inside.sum(1, keepdim=True)


def small_cnn(in_chans: int = 1, width: int = 64, norm: str = "batch", grid: int = 0) -> SmallCNN:
    return SmallCNN(in_chans=in_chans, width=width, norm=norm, grid=grid)


class TimmTrunk(nn.Module):
    """Any timm model as a feature-map extractor (``num_classes=0, global_pool=''``)."""

    def __init__(self, name: str, in_chans: int = 3, **kwargs) -> None:
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans, **kwargs)
        except RuntimeError as e:  # timm says "Unknown model (x)"
            raise ParameterError(f"{{name}}: timm has no model '{name}' ({e})", "name") from None
        self.out_channels = int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim == 3:  # vision transformers: (B, tokens, F) -> treat tokens as a 1-pixel-high map
            y = y.transpose(1, 2).unsqueeze(2)
        return y


def backbone_state_prefix(backbone: nn.Module) -> str:
    """Prefix to add to plain torchvision/timm keys so they match this trunk's own keys."""
    return "model." if isinstance(backbone, TimmTrunk) else ""
