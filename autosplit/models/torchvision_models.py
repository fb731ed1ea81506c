"""torchvision's ImageNet models wrapped as ``ZooModel``: typical teachers for larger images.

Always built with ``weights=None`` (nothing is ever downloaded; a trained teacher comes from a
user checkpoint). ``in_channels != 3`` replaces the stem convolution. torchvision is imported
inside the builders so that importing the zoo stays cheap.

- ResNets are assembled here from torchvision's own blocks, because torchvision fixes their
  channel counts; that is what makes ``width`` work (64/128/256/512 scaled by the zoo's rule).
  Module names match torchvision's except ``fc``, which is ``head``.
- MobileNets use torchvision's ``width_mult`` (channels rounded to multiples of 8, so FLOPs move
  in steps). Their ``features`` keep torchvision's names; stages are cut where the stride
  doubles. For MobileNetV3, whose classifier is an MLP, ``pooled`` is the input of the last
  Linear (after Linear-Hardswish-Dropout) and ``head`` is that last Linear.

Depth is fixed by the name: pick ``resnet18``/``resnet34``/``resnet50`` rather than a depth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autosplit.errors import UserError
from autosplit.models._base import ZooModel, describe_taps, scale_channels
from autosplit.models._registry import MODELS

_RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_MOBILENETS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
NAMES: tuple[str, ...] = (*_RESNETS, *_MOBILENETS)


class TorchvisionResNet(ZooModel):
    """ImageNet ResNet (7x7/2 stem + max-pool); taps ``stage1..4`` at strides 4, 8, 16, 32."""

    def __init__(
        self,
        *,
        block_kind: str,
        layers: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck

        block = BasicBlock if block_kind == "basic" else Bottleneck
        self.inplanes = scale_channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stage_shapes = []
        for index, n_blocks in enumerate(layers):
            planes, stride = scale_channels(64 * 2**index, width), 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, planes, n_blocks, stride))
            stage_shapes.append((self.inplanes, 4 * 2**index))
        self.head = nn.Linear(self.inplanes, num_classes)
        self.feature_info = describe_taps(stage_shapes, self.inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[nn.Module], planes: int, n_blocks: int, stride: int
    ) -> nn.Sequential:
        """torchvision's ``ResNet._make_layer`` for groups=1, no dilation."""
        out_channels = planes * block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        blocks += [block(self.inplanes, planes) for _ in range(1, n_blocks)]
        return nn.Sequential(*blocks)

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, 64w, H/4, W/4)
        stages = {}
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)  # (B, C_i, H/2^(i+1), W/2^(i+1))
            stages[f"stage{index}"] = x
        return stages


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.stride[0] > 1 for m in module.modules())


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class TorchvisionMobileNet(ZooModel):
    """A torchvision MobileNet's ``features``, cut into stages where the stride doubles."""

    def __init__(self, network: nn.Module, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features: nn.Sequential = network.features  # type: ignore[assignment]
        if in_channels != 3:
            old = self.features[0][0]
            self.features[0][0] = nn.Conv2d(
                in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        # stage k = features[starts[k]:starts[k+1]]; a new stage starts at each downsampling module
        self.stage_starts = [0] + [
            i for i, m in enumerate(self.features) if i > 0 and _downsamples(m)
        ]
        ends = [*self.stage_starts[1:], len(self.features)]
        stage_shapes = [
            (_out_channels(self.features[end - 1]), 2 ** (k + 1)) for k, end in enumerate(ends)
        ]
        classifier = list(network.classifier)  # type: ignore[arg-type]
        self.pre_head = nn.Sequential(*classifier[:-1])  # v2: Dropout; v3: Linear-Hardswish-Dropout
        self.head: nn.Linear = classifier[-1]
        self.feature_info = describe_taps(stage_shapes, self.head.in_features, num_classes)

    def pool(self, feature_map: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C_pooled): average, then the classifier up to its last Linear."""
        return self.pre_head(torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1))

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        stages, x = {}, images
        ends = set(self.stage_starts[1:]) | {len(self.features)}
        for index, module in enumerate(self.features):
            x = module(x)
            if index + 1 in ends:
                stages[f"stage{len(stages) + 1}"] = x  # (B, C_k, H/2^k, W/2^k)
        return stages


def _register_resnet(name: str, block_kind: str, layers: tuple[int, int, int, int]) -> None:
    natural_depth = int(name.removeprefix("resnet"))

    def build(
        *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int | None = None
    ) -> TorchvisionResNet:
        _check_fixed_depth(name, natural_depth, depth)
        return TorchvisionResNet(
            block_kind=block_kind,
            layers=layers,
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
        )

    build.__doc__ = f"{name}: torchvision ImageNet ResNet-{natural_depth}, random init."
    MODELS.add(name, build)


def _register_mobilenet(name: str) -> None:
    def build(
        *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int | None = None
    ) -> TorchvisionMobileNet:
        import torchvision.models

        _check_fixed_depth(name, None, depth)
        network = getattr(torchvision.models, name)(
            weights=None, num_classes=num_classes, width_mult=width
        )
        return TorchvisionMobileNet(network, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"{name}: torchvision ImageNet {name}, random init, torchvision's width_mult."
    MODELS.add(name, build)


def _check_fixed_depth(name: str, natural_depth: int | None, depth: int | None) -> None:
    if depth is not None and depth != natural_depth:
        choices = ", ".join(_RESNETS) if name in _RESNETS else "none"
        raise UserError(
            f"model {name!r}: depth is fixed by the torchvision architecture; omit depth "
            f"(other fixed depths: {choices}), got depth={depth}"
        )


for _name, (_kind, _layers) in _RESNETS.items():
    _register_resnet(_name, _kind, _layers)
for _name in _MOBILENETS:
    _register_mobilenet(_name)
