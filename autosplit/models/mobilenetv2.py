"""MobileNetV2 for small images, after CRD / mdistiller's ``mobilenetv2.py`` (Sandler et al., CVPR 2018).

Differences from mdistiller, on purpose:

- the stem is stride 1 (mdistiller's is stride 2), so a 28x28 or 32x32 image still reaches the
  last stage at 4x4 rather than 2x2;
- ``width`` scales every channel count with the zoo's rounding rule, the final 1x1 conv (1280)
  included, so FLOPs keep shrinking at the small widths a tight budget needs (mdistiller keeps
  1280 below width 1 and truncates channels with ``int``);
- ``depth`` is the total number of inverted-residual blocks (17 in the standard network), spread
  over the seven block groups in proportion to the standard counts.

Like mdistiller, every block keeps its 1x1 expansion conv (also when t = 1) and uses ReLU.
Taps follow mdistiller's features: ``stage1`` (24 ch, stride 1), ``stage2`` (32, 2), ``stage3``
(96, 4), ``stage4`` (the 1280-channel conv, stride 8).
"""

from __future__ import annotations

from torch import Tensor, nn

from autosplit.errors import UserError
from autosplit.models._base import ZooModel, describe_taps, scale_channels
from autosplit.models._registry import MODELS

EXPANSION = 6
# (expansion t, output channels c, blocks n, stride s) per block group, as in the paper,
# except the first group's stride, which is the stem's job on ImageNet.
_GROUPS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (EXPANSION, 24, 2, 1),
    (EXPANSION, 32, 3, 2),
    (EXPANSION, 64, 4, 2),
    (EXPANSION, 96, 3, 1),
    (EXPANSION, 160, 3, 2),
    (EXPANSION, 320, 1, 1),
)
STANDARD_DEPTH = sum(n for _, _, n, _ in _GROUPS)  # 17
# Stage k ends after these block groups (mdistiller's f1..f4).
_STAGE_ENDS = (2, 3, 5, 7)
_NAMED_WIDTHS = {"mobilenetv2": 1.0, "mobilenetv2_050": 0.5}
NAMES: tuple[str, ...] = tuple(_NAMED_WIDTHS)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; identity shortcut when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels, hidden, 1, 1),  # (B, t*C_in, H, W)
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # (B, t*C_in, H/s, W/s)
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def blocks_per_group(depth: int) -> list[int]:
    """Spread ``depth`` blocks over the groups: one each, the rest in the standard proportions.

    Largest-remainder rounding keeps the sum exact; ``depth`` = 17 gives the paper's (1,2,3,4,3,3,1).
    """
    extra_weights = [n - 1 for _, _, n, _ in _GROUPS]  # (0, 1, 2, 3, 2, 2, 0), sums to 10
    extra = depth - len(_GROUPS)
    quotas = [extra * w / sum(extra_weights) for w in extra_weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: extra - sum(counts)]:
        counts[i] += 1
    return [1 + c for c in counts]


class MobileNetV2(ZooModel):
    """MobileNetV2 with a stride-1 stem; taps ``stage1..4`` at strides 1, 2, 4, 8."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        depth: int = STANDARD_DEPTH,
    ) -> None:
        super().__init__()
        stem = scale_channels(32, width)
        self.conv1 = conv_bn_relu(in_channels, stem, 3, 1)  # (B, 32w, H, W)
        previous, stride_so_far, stage_shapes = stem, 1, []
        groups = []
        for index, ((t, c, _, s), n) in enumerate(
            zip(_GROUPS, blocks_per_group(depth), strict=True)
        ):
            out_channels = scale_channels(c, width)
            group = []
            for block_index in range(n):
                group.append(
                    InvertedResidual(previous, out_channels, s if block_index == 0 else 1, t)
                )
                previous = out_channels
            groups.append(nn.Sequential(*group))
            stride_so_far *= s
            if index + 1 in _STAGE_ENDS:
                stage_shapes.append((out_channels, stride_so_far))
        self.blocks = nn.ModuleList(groups)
        last = scale_channels(1280, width)
        self.conv2 = conv_bn_relu(previous, last, 1, 1)  # (B, 1280w, H/8, W/8)
        stage_shapes[-1] = (last, stride_so_far)
        self.head = nn.Linear(last, num_classes)
        self.feature_info = describe_taps(stage_shapes, last, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        x = self.conv1(images)
        stages: dict[str, Tensor] = {}
        for index, group in enumerate(self.blocks, start=1):
            x = group(x)
            if index in _STAGE_ENDS:
                stages[f"stage{len(stages) + 1}"] = x
        stages[f"stage{len(stages)}"] = self.conv2(x)  # the 1x1 conv closes the last stage
        return stages


def _register(name: str, base_width: float) -> None:
    def build(
        *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int | None = None
    ) -> MobileNetV2:
        depth = STANDARD_DEPTH if depth is None else depth
        if depth < len(_GROUPS):
            raise UserError(
                f"model {name!r}: depth is the number of inverted-residual blocks and must be >= "
                f"{len(_GROUPS)} (one per group; {STANDARD_DEPTH} is the standard network), got {depth}"
            )
        return MobileNetV2(
            num_classes=num_classes, in_channels=in_channels, width=base_width * width, depth=depth
        )

    build.__doc__ = f"{name}: small-image MobileNetV2 at width {base_width} (times ``width``)."
    MODELS.add(name, build)


for _name, _width in _NAMED_WIDTHS.items():
    _register(_name, _width)
