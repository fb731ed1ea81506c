"""CIFAR ResNets exactly as in the distillation benchmarks (CRD, mdistiller ``resnet.py``).

Post-activation BasicBlocks, a 3x3 stride-1 stem and three stages at strides 1, 2, 4 with
n = (depth - 2) / 6 blocks each. Standard sizes use stem/stage channels 16/16/32/64; the ``x4``
ones 32/64/128/256. Module names follow mdistiller (``conv1``, ``bn1``, ``layer1``..``layer3``,
``downsample``) so its checkpoints map over by renaming ``fc`` to ``head``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

from autosplit.errors import UserError
from autosplit.models._base import ZooModel, describe_taps, scale_channels
from autosplit.models._registry import MODELS

# name -> (depth, (stem, stage1, stage2, stage3) channels at width 1)
_CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
NAMES: tuple[str, ...] = tuple(_CONFIGS)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus a (1x1 conv + bn) shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNetCifar(ZooModel):
    """A CIFAR ResNet of depth 6n+2; taps ``stage1..3`` at strides 1, 2, 4."""

    def __init__(
        self,
        *,
        depth: int,
        channels: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        n_blocks = (depth - 2) // 6
        stem, *stage_channels = channels
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        previous = stem
        layers = []
        for index, out_channels in enumerate(stage_channels):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(n_blocks):
                blocks.append(BasicBlock(previous, out_channels, stride if block_index == 0 else 1))
                previous = out_channels
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.head = nn.Linear(previous, num_classes)
        self.feature_info = describe_taps(
            [(stage_channels[0], 1), (stage_channels[1], 2), (stage_channels[2], 4)],
            previous,
            num_classes,
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))  # (B, C0, H, W)
        stage1 = self.layer1(x)  # (B, C1, H, W)
        stage2 = self.layer2(stage1)  # (B, C2, H/2, W/2)
        stage3 = self.layer3(stage2)  # (B, C3, H/4, W/4)
        return {"stage1": stage1, "stage2": stage2, "stage3": stage3}


def check_depth(name: str, depth: int, *, offset: int, minimum: int) -> None:
    """Depths of the form 6n + offset with depth >= minimum; otherwise say which are valid."""
    if depth < minimum or (depth - offset) % 6 != 0:
        examples = ", ".join(str(minimum + 6 * i) for i in range(5))
        raise UserError(
            f"model {name!r}: depth must be 6n+{offset} with n >= 1 ({examples}, ...), got {depth}"
        )


def register_6n(
    model: Callable[..., ZooModel],
    configs: dict[str, tuple[int, tuple[int, int, int, int]]],
    *,
    offset: int,
    minimum: int,
    doc: str,
) -> None:
    """Register each ``name: (depth, channels)`` of ``configs`` as ``model`` (a CIFAR ResNet or
    a WRN) of that depth = 6n + ``offset`` by default, any such depth >= ``minimum`` on request,
    every channel count scaled by ``width``. ``doc`` is formatted with name, depth, channels."""

    def register(name: str, default_depth: int, channels: tuple[int, int, int, int]) -> None:
        def build(
            *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int | None = None
        ) -> ZooModel:
            depth = default_depth if depth is None else depth
            check_depth(name, depth, offset=offset, minimum=minimum)
            scaled = tuple(scale_channels(c, width) for c in channels)
            return model(
                depth=depth, channels=scaled, num_classes=num_classes, in_channels=in_channels
            )

        build.__doc__ = doc.format(name=name, depth=default_depth, channels=channels)
        MODELS.add(name, build)

    for name, (depth, channels) in configs.items():
        register(name, depth, channels)


register_6n(
    ResNetCifar,
    _CONFIGS,
    offset=2,
    minimum=8,
    doc="{name}: CIFAR ResNet, depth {depth}, channels {channels} at width 1.",
)
