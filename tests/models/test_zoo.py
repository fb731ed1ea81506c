"""Contract tests over every registered model, plus each family's width/depth rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autosplit.errors import UserError
from autosplit.models import MODELS, ZooModel, create_model
from autosplit.models.mobilenetv2 import STANDARD_DEPTH, blocks_per_group
from autosplit.models.torchvision_models import NAMES as TORCHVISION_NAMES

ALL_MODELS = MODELS.names()
# Models whose width (any positive float) and depth the search may vary freely; the torchvision
# models are meant as teachers, their depth fixed by the name.
CIFAR_STYLE = [name for name in ALL_MODELS if name not in TORCHVISION_NAMES]
NUM_CLASSES = 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-2 forwards of small nets: threads only add contention on the 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo():
    """Build each (name, in_channels) once per module; models are put in eval mode."""
    cache: dict[tuple[str, int], ZooModel] = {}

    def get(name: str, in_channels: int) -> ZooModel:
        if (name, in_channels) not in cache:
            torch.manual_seed(0)
            model = create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)
            cache[name, in_channels] = model.eval()
        return cache[name, in_channels]

    return get


def _contract_cases():
    for name in ALL_MODELS:
        sizes = (64,) if name in TORCHVISION_NAMES else (28, 32)
        for in_channels in (1, 3):
            for size in sizes:
                yield pytest.param(name, in_channels, size, id=f"{name}-{in_channels}x{size}")


@pytest.mark.parametrize(("name", "in_channels", "size"), list(_contract_cases()))
def test_taps_match_feature_info(zoo, name: str, in_channels: int, size: int) -> None:
    model = zoo(name, in_channels)
    images = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        taps = model.forward_taps(images)
        logits = model(images)

    maps = [tap for tap in model.feature_info if tap.kind == "map"]
    assert [tap.name for tap in maps] == [f"stage{i}" for i in range(1, len(maps) + 1)]
    assert model.stage_names == [tap.name for tap in maps]
    for tap in maps:
        expected = math.ceil(size / tap.stride)  # padded convs round up
        assert taps[tap.name].shape == (2, tap.channels, expected, expected), tap
    assert isinstance(model.head, nn.Linear)
    assert taps["pooled"].shape == (2, model.head.in_features)
    assert model.tap("pooled").channels == model.head.in_features
    assert taps["logits"].shape == (2, NUM_CLASSES)
    assert model.tap("logits").channels == NUM_CLASSES
    assert torch.allclose(logits, taps["logits"], atol=1e-5)
    assert torch.allclose(model.head(taps["pooled"]), logits, atol=1e-5)


def test_reference_parameter_counts() -> None:
    """Same architectures as CRD / mdistiller: their published parameter counts at 100 classes."""
    expected = {
        "resnet20": 278_324,
        "resnet56": 861_620,
        "resnet110": 1_736_564,
        "resnet8x4": 1_233_540,
        "resnet32x4": 7_433_860,
        "wrn_16_2": 703_284,
        "wrn_40_2": 2_255_156,
    }
    for name, count in expected.items():
        model = create_model(name, num_classes=100)
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_width_scales_every_channel_count() -> None:
    model = create_model("resnet20", num_classes=10, width=0.5)
    assert [model.tap(f"stage{i}").channels for i in (1, 2, 3)] == [8, 16, 32]
    assert model.conv1.out_channels == 8
    model = create_model("resnet8x4", num_classes=10, width=0.3)  # 32/64/128/256 * 0.3, rounded
    assert model.conv1.out_channels == 10
    assert [model.tap(f"stage{i}").channels for i in (1, 2, 3)] == [19, 38, 77]
    model = create_model("wrn_16_2", num_classes=10, width=1.5)
    assert [model.tap(f"stage{i}").channels for i in (1, 2, 3)] == [48, 96, 192]
    model = create_model("resnet18", num_classes=10, width=0.5)
    assert [model.tap(f"stage{i}").channels for i in (1, 2, 3, 4)] == [32, 64, 128, 256]


def test_tiny_widths_keep_one_channel() -> None:
    model = create_model("resnet20", num_classes=3, in_channels=1, width=0.01).eval()
    assert model.conv1.out_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_torchvision_mobilenet_width_mult_and_stem() -> None:
    model = create_model("mobilenet_v2", num_classes=10, in_channels=1, width=0.5)
    assert model.features[0][0].in_channels == 1
    assert model.tap("stage1").channels == 8  # 16 * 0.5, rounded to a multiple of 8
    model = create_model("mobilenet_v3_small", num_classes=10)
    assert model.head.in_features == 1024  # the MLP's hidden layer is `pooled`


def test_torchvision_models_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for name in TORCHVISION_NAMES:
        create_model(name, num_classes=10)


@pytest.mark.parametrize(
    ("name", "depth", "same_as"),
    [("resnet20", 32, "resnet32"), ("resnet8x4", 32, "resnet32x4"), ("wrn_40_2", 16, "wrn_16_2")],
)
def test_depth_overrides_the_named_depth(name: str, depth: int, same_as: str) -> None:
    model = create_model(name, num_classes=10, depth=depth)
    reference = create_model(same_as, num_classes=10)
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]


@pytest.mark.parametrize(
    ("name", "depth", "message"),
    [
        ("resnet20", 21, r"6n\+2"),
        ("resnet20", 2, r"6n\+2"),
        ("wrn_16_2", 18, r"6n\+4"),
        ("mobilenetv2", 6, ">= 7"),
        ("tiny", 0, ">= 1"),
        ("resnet18", 34, "fixed"),
        ("mobilenet_v3_small", 10, "fixed"),
    ],
)
def test_invalid_depth_says_what_is_valid(name: str, depth: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_model(name, num_classes=10, depth=depth)


def test_mobilenetv2_depth_spreads_blocks() -> None:
    assert blocks_per_group(STANDARD_DEPTH) == [1, 2, 3, 4, 3, 3, 1]
    assert blocks_per_group(7) == [1] * 7
    for depth in range(7, 60):
        counts = blocks_per_group(depth)
        assert sum(counts) == depth and min(counts) >= 1
    n_blocks = sum(
        len(group) for group in create_model("mobilenetv2", num_classes=10, depth=11).blocks
    )
    assert n_blocks == 11


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf"), "wide", True])
def test_invalid_width_is_a_user_error(width) -> None:
    with pytest.raises(UserError, match="width"):
        create_model("resnet20", num_classes=10, width=width)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet21'.*resnet20.*wrn_16_2"):
        create_model("resnet21", num_classes=10)


def test_bad_class_and_channel_counts() -> None:
    with pytest.raises(UserError, match="num_classes"):
        create_model("tiny", num_classes=0)
    with pytest.raises(UserError, match="in_channels"):
        create_model("tiny", num_classes=10, in_channels=0)


_OTHER_DEPTH = {"resnet": 14, "wrn": 10, "mobilenetv2": 9, "tiny": 2}


@pytest.mark.parametrize("name", CIFAR_STYLE)
def test_searchable_families_take_any_width_and_depth(name: str) -> None:
    assert name in MODELS and name not in TORCHVISION_NAMES
    depth = next(d for prefix, d in _OTHER_DEPTH.items() if name.startswith(prefix))
    narrow = create_model(name, num_classes=10, in_channels=1, width=0.37, depth=depth).eval()
    default = create_model(name, num_classes=10, in_channels=1)
    assert sum(p.numel() for p in narrow.parameters()) < sum(
        p.numel() for p in default.parameters()
    )
    with torch.no_grad():
        assert narrow(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_models_take_only_the_depth_of_their_name(name: str) -> None:
    natural = int(name.removeprefix("resnet")) if name.startswith("resnet") else None
    if natural is not None:  # the name's own depth may be given
        assert len(create_model(name, num_classes=10, depth=natural).feature_info) == 6
    with pytest.raises(UserError, match="fixed by the torchvision architecture"):
        create_model(name, num_classes=10, depth=(natural or 0) + 6)
