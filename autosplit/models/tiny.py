"""``tiny``: a two-stage convnet registered like the real models, so tests run in seconds.

Stem conv (8 ch) then two stages of conv-bn-relu (8 and 16 channels, strides 2 and 4). ``width``
scales the channels like every family; ``depth`` is the number of convolutions per stage.
"""

from __future__ import annotations

from torch import Tensor, nn

from autosplit.errors import UserError
from autosplit.models._base import ZooModel, describe_taps, scale_channels
from autosplit.models._registry import MODELS

NAMES: tuple[str, ...] = ("tiny",)


def _stage(in_channels: int, out_channels: int, n_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(n_convs):
        stride = 2 if index == 0 else 1
        layers += [
            nn.Conv2d(
                in_channels if index == 0 else out_channels, out_channels, 3, stride, 1, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class TinyNet(ZooModel):
    """Taps ``stage1`` (8w ch, stride 2) and ``stage2`` (16w ch, stride 4)."""

    def __init__(
        self, *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int = 1
    ) -> None:
        super().__init__()
        c0, c1, c2 = (scale_channels(c, width) for c in (8, 8, 16))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        self.stage1 = _stage(c0, c1, depth)
        self.stage2 = _stage(c1, c2, depth)
        self.head = nn.Linear(c2, num_classes)
        self.feature_info = describe_taps([(c1, 2), (c2, 4)], c2, num_classes)

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        stage1 = self.stage1(self.stem(images))  # (B, 8w, H/2, W/2)
        stage2 = self.stage2(stage1)  # (B, 16w, H/4, W/4)
        return {"stage1": stage1, "stage2": stage2}


@MODELS.register("tiny")
def tiny(
    *, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int | None = None
) -> TinyNet:
    """The test model; ``depth`` = convolutions per stage (default 1)."""
    depth = 1 if depth is None else depth
    if depth < 1:
        raise UserError(
            f"model 'tiny': depth is convolutions per stage and must be >= 1, got {depth}"
        )
    return TinyNet(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
