"""WideResNets WRN-d-k as in CRD's ``wrn.py`` (Zagoruyko & Komodakis, BMVC 2016).

Pre-activation blocks (bn-relu-conv twice), a 3x3 stem of 16 channels, three stages of
16k/32k/64k channels with n = (depth - 4) / 6 blocks each, and a final bn-relu before pooling.
That final bn-relu is part of ``stage3`` here, so ``pooled`` is the average of ``stage3`` as the
``ZooModel`` surface requires. Module names follow CRD (``conv1``, ``block1.layer.0.bn1``, ...,
``bn1``) so its checkpoints map over by renaming ``fc`` to ``head``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from autosplit.models._base import ZooModel, describe_taps
from autosplit.models.resnet_cifar import register_6n

# name -> (depth, widen factor k)
_CONFIGS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}
NAMES: tuple[str, ...] = tuple(_CONFIGS)


class PreActBlock(nn.Module):
    """CRD's WRN BasicBlock: when the shape changes, the shortcut reads the activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        # CRD tests only in == out; a stride check too keeps tiny widths (where 16k*w and 32k*w
        # can both round to 1) from adding maps of different sizes.
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.conv_shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))  # (B, C_out, H/s, W/s)
        out = self.conv2(out)
        if self.conv_shortcut is None:
            return x + out
        return self.conv_shortcut(activated) + out


class NetworkBlock(nn.Module):
    """One stage: ``layer`` holds its blocks (the name CRD's checkpoints use)."""

    def __init__(self, n_blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(
                    in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1
                )
                for i in range(n_blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ZooModel):
    """WRN of depth 6n+4; taps ``stage1..3`` at strides 1, 2, 4."""

    def __init__(
        self,
        *,
        depth: int,
        channels: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        n_blocks = (depth - 4) // 6
        stem, c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n_blocks, stem, c1, 1)
        self.block2 = NetworkBlock(n_blocks, c1, c2, 2)
        self.block3 = NetworkBlock(n_blocks, c2, c3, 2)
        self.bn1 = nn.BatchNorm2d(c3)
        self.head = nn.Linear(c3, num_classes)
        self.feature_info = describe_taps([(c1, 1), (c2, 2), (c3, 4)], c3, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        x = self.conv1(images)  # (B, C0, H, W)
        stage1 = self.block1(x)  # (B, C1, H, W), pre-activation
        stage2 = self.block2(stage1)  # (B, C2, H/2, W/2), pre-activation
        stage3 = F.relu(self.bn1(self.block3(stage2)))  # (B, C3, H/4, W/4), activated
        return {"stage1": stage1, "stage2": stage2, "stage3": stage3}


register_6n(
    WideResNet,
    {
        name: (depth, (16, 16 * widen, 32 * widen, 64 * widen))
        for name, (depth, widen) in _CONFIGS.items()
    },
    offset=4,
    minimum=10,
    doc="{name}: WRN-{depth}, channels {channels} at width 1.",
)
