"""Values of the method parts, the staged schedule, recipes, and real training on digits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F
from distill_cases import CLASSES, INPUT_SHAPE, batch, make_candidate

from autosplit.cache import LiveTeacher
from autosplit.config import TrainConfig
from autosplit.data import Split, Splits
from autosplit.device import Runtime
from autosplit.distill import (
    METHODS,
    Distiller,
    build_distiller,
    recipe_candidate,
    train_candidate,
)
from autosplit.distill.exit import candidate_thresholds, exit_profile, measure_exit
from autosplit.distill.losses import factor_distance, kd_loss, reskd_residual_mse, tckd_nckd
from autosplit.distill.run import split_epochs, stage_config
from autosplit.errors import UserError
from autosplit.loader import TensorLoader, eval_loader
from autosplit.models import ZooModel, create_model
from autosplit.search.space import SearchSpace
from autosplit.train import Classifier, fit, make_optimizer


@pytest.fixture(scope="module")
def teacher(tiny_teacher: ZooModel) -> ZooModel:
    return tiny_teacher.requires_grad_(False)


def make_distiller(teacher: ZooModel, *args: Any, **kwargs: Any) -> Distiller:
    torch.manual_seed(0)
    return build_distiller(
        make_candidate(*args, **kwargs),
        teacher=teacher,
        num_classes=CLASSES,
        in_channels=1,
        input_shape=INPUT_SHAPE,
    )


def step(distiller: Distiller, teacher: ZooModel, *, epoch: int = 0, term: str = "loss") -> dict:
    """Forward, loss, backward of ``term``; returns the loss dict (graph kept)."""
    images, labels = batch()
    outputs = distiller(images)
    with torch.no_grad():
        taps = teacher.forward_taps(images)
    losses = distiller.loss(
        outputs, {k: taps[k] for k in distiller.teacher_taps}, labels, epoch=epoch
    )
    losses[term].backward()
    return {"outputs": outputs, "losses": losses, "taps": taps, "labels": labels}


def sgd_step(distiller: Distiller, teacher: ZooModel) -> None:
    """One real optimiser step (momentum, weight decay) as ``fit`` takes it."""
    optimizer = make_optimizer(distiller.trainable_parameters(), TrainConfig(lr=0.5))
    distiller.train()
    optimizer.zero_grad()
    step(distiller, teacher)
    optimizer.step()


# --- residual methods -------------------------------------------------------------------------


def test_rkd_assistant_target_is_detached(teacher: ZooModel) -> None:
    distiller = make_distiller(teacher, "assistant", "ce")
    run = step(distiller, teacher, term="loss_rkd_residual")
    student = distiller.student
    base_side = [*student.base.parameters(), *student.adapter_base.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in base_side)
    assert all(p.grad is not None and p.grad.any() for p in student.adapter_assistant.parameters())
    feat_teacher = run["taps"][teacher.last_stage.name]
    residual = feat_teacher - run["outputs"]["feat_base"]
    expected = F.mse_loss(run["outputs"]["feat_assistant"], residual) / residual.pow(2).mean()
    assert torch.allclose(run["losses"]["loss_rkd_residual"], expected)


@pytest.mark.parametrize(
    ("mimic_stages", "stages"), [("all", {"stage1", "stage2"}), ("last", {"stage2"})]
)
def test_rkd_mimics_the_stages_its_candidate_names(
    teacher: ZooModel, tmp_path: Path, mimic_stages: str, stages: set[str]
) -> None:
    """``structure.mimic_stages`` set by a space's draw reaches the loss: the teacher taps it
    asks for, one mimic term per stage with its value, and the base learns from each one."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "data: {name: digits, augment: false}\n"
        "teacher: {model: tiny, width: 1.5}\n"
        "candidate: {student: {family: tiny}, split: {base_width: 0.5, part_width: 0.25},\n"
        "            structure: {name: assistant}, logit_loss: {name: ce}}\n"
        "params:\n"
        "  structure.mimic_stages: {choices: [all, last], when: {structure.name: [assistant]}}\n"
    )
    draw = optuna.trial.FixedTrial({"structure.mimic_stages": mimic_stages})
    candidate = SearchSpace.from_yaml(space_file).suggest(draw, 10**6)
    assert candidate.structure.get("mimic_stages") == mimic_stages
    torch.manual_seed(0)
    distiller = build_distiller(
        candidate, teacher=teacher, num_classes=CLASSES, in_channels=1, input_shape=INPUT_SHAPE
    )
    assert distiller.teacher_taps == stages  # the CE logit loss reads no teacher output
    run = step(distiller, teacher, term="loss_rkd_mimic_stage1" if "stage1" in stages else "loss")
    out, losses, taps = run["outputs"], run["losses"], run["taps"]
    assert {k for k in losses if k.startswith("loss_rkd_mimic")} == {
        f"loss_rkd_mimic_{stage}" for stage in stages
    }
    student = distiller.student
    last = F.mse_loss(out["feat_base"], taps["stage2"]) / taps["stage2"].pow(2).mean()
    assert torch.allclose(losses["loss_rkd_mimic_stage2"], last)
    if "stage1" in stages:  # the early adapter r_1: base stage1 -> teacher stage1's shape
        adapter = distiller.parts["structure"].adapters["stage1"]
        feat = adapter(out["base_taps"]["stage1"])  # same 4x4 size: no resize
        assert feat.shape == taps["stage1"].shape
        expected = F.mse_loss(feat, taps["stage1"]) / taps["stage1"].pow(2).mean()
        assert torch.allclose(losses["loss_rkd_mimic_stage1"], expected)
        # That term trains the base's first stage and r_1, never the assistant.
        assert any(p.grad is not None and p.grad.any() for p in student.base.parameters())
        assert all(p.grad is not None for p in adapter.parameters())
        assert all(p.grad is None for p in student.assistant.parameters())
        assert {"loss_rkd_mimic_stage1", "loss_rkd_mimic_stage2"} <= distiller.stages("staged")[
            0
        ].terms


def test_rkd_early_adapters_are_training_only(teacher: ZooModel) -> None:
    from autosplit.distill import student_flops

    every = make_distiller(teacher, "assistant", "ce", **{"structure.mimic_stages": "all"})
    last = make_distiller(teacher, "assistant", "ce", **{"structure.mimic_stages": "last"})
    assert len(list(every.parts["structure"].parameters())) > 0
    assert len(list(last.parts["structure"].parameters())) == 0
    assert student_flops(every.student, INPUT_SHAPE) == student_flops(last.student, INPUT_SHAPE)
    with pytest.raises(UserError, match="structure.mimic_stages: 'first' is not one of"):
        make_candidate("assistant", **{"structure.mimic_stages": "first"})


def test_reskd_kd_trains_only_the_res_student_through_the_sum(teacher: ZooModel) -> None:
    distiller = make_distiller(teacher, "res_chain", "kd")
    run = step(distiller, teacher, term="loss_kd_z1")
    student = distiller.student
    assert all(p.grad is None for p in student.base.parameters())
    assert all(p.grad is None for p in student.res2.parameters())
    assert any(p.grad is not None and p.grad.any() for p in student.res1.parameters())
    z1 = run["outputs"]["partial_logits"][1]  # sg(z^(0)) + z_R1 has z^(1)'s value
    assert torch.allclose(run["losses"]["loss_kd_z1"], 0.9 * kd_loss(z1, run["taps"]["logits"]))


def test_reskd_mse_matches_the_gap(teacher: ZooModel) -> None:
    distiller = make_distiller(
        teacher,
        "res_chain",
        "kd",
        **{"structure.residual": "mse", "structure.residual_weight": 2.0},
    )
    run = step(distiller, teacher, term="loss_reskd_2")
    out, losses = run["outputs"], run["losses"]
    assert "loss_kd_z1" not in losses and "loss_kd" in losses  # the logit loss sees z^(0) only
    expected = reskd_residual_mse(
        out["part_logits"][1], run["taps"]["logits"], out["partial_logits"][1]
    )
    assert torch.allclose(losses["loss_reskd_2"], 2.0 * expected)
    assert all(
        p.grad is None
        for p in [*distiller.student.base.parameters(), *distiller.student.res1.parameters()]
    )


@pytest.mark.parametrize("twi", [True, False])
def test_era_terms(teacher: ZooModel, twi: bool) -> None:
    distiller = make_distiller(teacher, "branches", "kd", twi=twi, **{"logit_loss.ce_weight": 0.3})
    run = step(distiller, teacher)
    out, losses, labels = run["outputs"], run["losses"], run["labels"]
    assert ("loss_era_recon_ce" in losses) is twi and ("loss_era_proj_ce" in losses) is twi
    assert torch.allclose(
        losses["loss_era_feat"], 5.0 * F.mse_loss(out["pooled_proj"], run["taps"]["pooled"])
    )
    if twi:  # TWI's cross-entropies are scaled by the KD base's CE weight (ERA's code)
        recon = out["recon_logits"]
        expected = sum(0.5**i * F.cross_entropy(z, labels) for i, z in enumerate(recon)) / len(
            recon
        )
        assert torch.allclose(losses["loss_era_recon_ce"], 0.3 * expected)
        proj_ce = F.cross_entropy(out["proj_logits"], labels)
        assert torch.allclose(losses["loss_era_proj_ce"], 0.3 * proj_ce)
        assert torch.allclose(losses["loss_ce"], 0.3 * F.cross_entropy(out["logits"], labels))


@pytest.mark.parametrize(
    ("structure", "logit", "values", "ce_weight"),
    [
        ("single", "kd", {"logit_loss.ce_weight": 0.9}, 0.9),
        ("single", "ce", {"logit_loss.weight": 2.0}, 2.0),
        ("res_chain", "dkd", {"logit_loss.ce_weight": 0.5}, 0.5),
    ],
)
def test_twi_part_takes_the_logit_losss_ce_weight(
    teacher: ZooModel, structure: str, logit: str, values: dict, ce_weight: float
) -> None:
    distiller = make_distiller(teacher, structure, logit, twi=True, **values)
    run = step(distiller, teacher)
    expected = F.cross_entropy(run["outputs"]["proj_logits"], run["labels"])
    assert torch.allclose(run["losses"]["loss_twi"], ce_weight * expected)


@pytest.mark.parametrize("structure", ["single", "branches", "assistant", "res_chain"])
def test_twi_head_is_the_teachers_and_never_steps(teacher: ZooModel, structure: str) -> None:
    teacher = copy.deepcopy(teacher).requires_grad_(True)  # freezing is the distiller's job
    distiller = make_distiller(teacher, structure, "kd", twi=True)
    if structure in ("single", "res_chain"):
        head = distiller.parts["twi"].teacher_head
    else:
        head = distiller.student.teacher_head if structure == "branches" else distiller.student.head
    assert torch.equal(head.weight, teacher.head.weight) and torch.equal(
        head.bias, teacher.head.bias
    )
    sgd_step(distiller, teacher)
    sgd_step(distiller, teacher)
    assert torch.equal(head.weight, teacher.head.weight) and torch.equal(
        head.bias, teacher.head.bias
    )
    assert not {id(p) for p in head.parameters()} & {
        id(p) for p in distiller.trainable_parameters()
    }


@pytest.mark.parametrize(
    ("structure", "stage_index"),
    [("res_chain", 1), ("res_chain", 0), ("assistant", 0), ("assistant", 1), ("branches", 1)],
)
def test_staged_step_changes_only_the_stage(
    teacher: ZooModel, structure: str, stage_index: int
) -> None:
    distiller = make_distiller(teacher, structure, "dkd", "hint", schedule="staged")
    stages = distiller.stages()
    assert len(stages) == (3 if structure == "res_chain" else 2)
    stage = stages[stage_index]
    names = {id(p): name for name, p in distiller.named_parameters()}
    owners = {names[id(p)].split(".")[1] for p in stage.parameters}  # student children / parts
    expected = {
        ("res_chain", 0): {"base", "feature"},
        ("res_chain", 1): {"res1"},
        # "structure": RKD's early-stage adapters r_k train with the base (mimic_stages all)
        ("assistant", 0): {"base", "adapter_base", "feature", "structure"},
        ("assistant", 1): {"assistant", "adapter_assistant", "head"},
        ("branches", 1): {"projector", "branch1", "branch2", "branch3", "branch4"},
    }
    assert owners == expected[structure, stage_index]
    distiller.set_stage(stage)
    before = copy.deepcopy(distiller.state_dict())
    sgd_step(distiller, teacher)
    in_stage = {names[id(p)] for p in stage.parameters}
    changed = {k for k, v in distiller.state_dict().items() if not torch.equal(v, before[k])}
    assert changed & in_stage  # the stage trained...
    moved = {k for k in changed - in_stage if not k.endswith("num_batches_tracked")}
    # ...and nothing else moved, BN statistics of frozen modules included, except the running
    # statistics of the stage's own batch-norms.
    own_bn = {k.rsplit(".", 1)[0] for k in in_stage}
    assert {k for k in moved if k.rsplit(".", 1)[0] not in own_bn} == set()
    if structure == "res_chain" and stage_index == 1:
        assert distiller.predict(batch()[0]).shape == (8, CLASSES)
        assert {k for k in changed if k.startswith(("student.base.", "student.res2."))} == set()
    distiller.set_stage(None)
    assert len(distiller.trainable_parameters()) == len(stages[0].parameters) + sum(
        len(s.parameters) for s in stages[1:]
    )


# --- logit losses -----------------------------------------------------------------------------


def test_aekt_fixed_weight_is_weighted_tckd_nckd(teacher: ZooModel) -> None:
    distiller = make_distiller(
        teacher, "single", "aekt", **{"logit_loss.fixed_weight": 0.7, "logit_loss.warmup_epochs": 0}
    )
    run = step(distiller, teacher)
    out, labels = run["outputs"], run["labels"]
    z_dist = out["aekt_dist"][0]
    assert not torch.equal(z_dist, out["logits"])  # a separate head (near identity)
    assert torch.allclose(z_dist, out["logits"], atol=0.2)
    tckd, nckd = tckd_nckd(z_dist, run["taps"]["logits"], labels, temperature=4.0)
    expected = 16.0 * (8.0 * nckd + 0.7 * tckd).mean()
    assert torch.allclose(run["losses"]["loss_aekt"], expected)
    assert torch.allclose(run["losses"]["loss_ce"], F.cross_entropy(out["logits"], labels))
    # FC_ser is training-only: the deployed prediction is z_cls.
    distiller.eval()
    assert torch.equal(distiller.predict(batch()[0]), distiller.student(batch()[0]))


@pytest.mark.parametrize("logit", ["dkd", "aekt"])
def test_warmup_scales_with_epoch(teacher: ZooModel, logit: str) -> None:
    distiller = make_distiller(teacher, "single", logit, **{"logit_loss.warmup_epochs": 4})
    distiller.eval()
    images, labels = batch()
    outputs = distiller(images)
    taps = {"logits": teacher(images)}
    full = distiller.loss(outputs, taps, labels, epoch=3)[f"loss_{logit}"]
    assert float(full.detach()) > 0
    for epoch, factor in [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (50, 1.0)]:
        value = distiller.loss(outputs, taps, labels, epoch=epoch)[f"loss_{logit}"]
        assert torch.allclose(value, factor * full)
    ce = distiller.loss(outputs, taps, labels, epoch=0)["loss_ce"]
    assert torch.allclose(ce, F.cross_entropy(outputs["logits"], labels))


# --- feature losses ---------------------------------------------------------------------------


def test_iekd_exploration_pushes_away(teacher: ZooModel) -> None:
    weights = {"feature_loss.lambda_inherit": 200.0, "feature_loss.lambda_explore": 3.0}
    distiller = make_distiller(teacher, "single", "ce", "iekd", **weights)
    part = distiller.parts["feature"]
    distiller.eval()  # the same batch-norm behaviour before and after the step
    run = step(distiller, teacher, term="loss_iekd_explore")
    factor_teacher = part.teacher_encoder(run["taps"][teacher.last_stage.name])
    distance = factor_distance(run["outputs"]["iekd_explore"], factor_teacher)
    assert float(run["losses"]["loss_iekd_explore"].detach()) < 0
    assert torch.allclose(run["losses"]["loss_iekd_explore"], -3.0 * distance)
    assert torch.allclose(
        run["losses"]["loss_iekd_inherit"],
        200.0 * factor_distance(run["outputs"]["iekd_inherit"], factor_teacher),
    )
    optimizer = torch.optim.SGD(part.encode_explore.parameters(), lr=0.05)
    optimizer.step()  # a step on the exploration term alone: the factors move apart
    with torch.no_grad():
        after = factor_distance(distiller(batch()[0])["iekd_explore"], factor_teacher)
    assert float(after) > float(distance.detach())


class _CachedMaps:
    """A teacher cache for IE-KD's pre-training: batch i -> low-rank non-negative maps shaped
    like the tiny teacher's last stage (24, 2, 2), which an auto-encoder can learn."""

    def __init__(self, n_batches: int, tap: str) -> None:
        gen = torch.Generator().manual_seed(0)
        basis = torch.randn(6, 24 * 2 * 2, generator=gen)
        self.tap = tap
        self.maps = [
            F.relu(torch.randn(32, 6, generator=gen) @ basis).view(32, 24, 2, 2)
            for _ in range(n_batches)
        ]

    def outputs(self, batch: int) -> dict[str, torch.Tensor]:
        return {self.tap: self.maps[batch]}


def test_iekd_defaults_are_the_official_codes() -> None:
    candidate = make_candidate("single", "ce", "iekd")
    assert candidate.feature_loss.as_dict() == {
        "ratio": 0.5,
        "lambda_inherit": 1.0,  # config/ie_kd.yaml: inh and exp loss weights 1, constant
        "lambda_explore": 1.0,
        "factor_ratio": 0.5,  # resnet20's 64 channels -> 32-channel factors there
        "ae_epochs": 30,  # num_epoch_embedS
        "ae_lr": 0.1,
    }
    with pytest.raises(UserError, match="feature_loss.ae_epochs: must be >= 0"):
        make_candidate("single", "ce", "iekd", **{"feature_loss.ae_epochs": -1})


def test_iekd_coders_are_the_official_layers(teacher: ZooModel) -> None:
    part = make_distiller(teacher, "single", "ce", "iekd").parts["feature"]
    channels_teacher, factor = 24, 12  # the tiny teacher's last stage; factor_ratio 0.5

    def layout(module: torch.nn.Module) -> list[tuple]:
        out: list[tuple] = []
        for layer in module:
            if isinstance(layer, torch.nn.Conv2d):
                shape = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.padding)
                out.append(("conv", *shape, layer.bias is None))
            elif isinstance(layer, torch.nn.BatchNorm2d):
                out.append(("bn", layer.num_features))
            else:
                assert isinstance(layer, torch.nn.LeakyReLU) and layer.negative_slope == 0.1
                out.append(("lrelu",))
        return out

    def official(c_in: int, c_out: int) -> list[tuple]:
        block = [("lrelu",)]
        for a, b in ((c_in, c_in), (c_in, c_out), (c_out, c_out)):
            block += [("conv", a, b, (3, 3), (1, 1), True), ("bn", b), ("lrelu",)]
        return block

    assert layout(part.teacher_encoder) == official(channels_teacher, factor)
    assert layout(part.teacher_decoder) == official(factor, channels_teacher)
    assert layout(part.encode_inherit) == official(part.n_inherit, factor)


class _Passes:
    """A loader of batch indices that counts the passes made over it and the epochs it is told."""

    def __init__(self, n_batches: int) -> None:
        self.n_batches, self.passes, self.epochs = n_batches, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(range(self.n_batches))


@pytest.mark.parametrize("epochs", [0, 3])
def test_iekd_autoencoder_trains_ae_epochs_with_sgd(
    teacher: ZooModel, cpu: Runtime, epochs: int
) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    distiller = make_distiller(
        teacher, "single", "ce", "iekd", **{"feature_loss.ae_epochs": epochs}
    )
    loader = _Passes(2)
    steps: list[tuple[type, dict]] = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: steps.append((type(optimizer), optimizer.defaults))
    )
    try:
        distiller.prepare(_CachedMaps(2, teacher.last_stage.name), loader, cpu)
    finally:
        handle.remove()
    assert loader.passes == epochs and loader.epochs == list(range(epochs))
    assert len(steps) == 2 * epochs  # one step per batch per epoch
    for kind, defaults in steps:  # the official code's optimiser
        assert kind is torch.optim.SGD
        assert (defaults["lr"], defaults["momentum"], defaults["nesterov"]) == (0.1, 0.9, True)
        assert defaults["weight_decay"] == 5e-4
    assert bool(distiller.parts["feature"].prepared)


def test_iekd_prepare_pretrains_then_freezes_the_teacher_autoencoder(
    teacher: ZooModel, cpu: Runtime
) -> None:
    distiller = make_distiller(teacher, "single", "ce", "iekd")  # the official 30 epochs
    part = distiller.parts["feature"]
    source = _CachedMaps(4, teacher.last_stage.name)
    feats = torch.cat(source.maps)
    coders = torch.nn.Sequential(part.teacher_encoder, part.teacher_decoder)

    def l1() -> float:
        coders.eval()
        with torch.no_grad():
            return float(F.l1_loss(coders(feats), feats))

    before = l1()
    distiller.prepare(source, _Passes(4), cpu)
    after = l1()
    assert bool(part.prepared) and after < 0.5 * before
    assert after < 0.5 * float(feats.abs().mean())  # far better than reconstructing zeros
    assert all(not p.requires_grad for p in coders.parameters())
    weights = copy.deepcopy(coders.state_dict())
    sgd_step(distiller, teacher)
    assert all(torch.equal(v, coders.state_dict()[k]) for k, v in weights.items())
    distiller.prepare(source, _Passes(4), cpu)  # prepared once: a second call trains nothing
    assert all(torch.equal(v, coders.state_dict()[k]) for k, v in weights.items())


class _CacheFile(_CachedMaps):
    """The same maps as a teacher cache file would serve them, counting the batches asked."""

    def __init__(self, n_batches: int, tap: str, path: str) -> None:
        super().__init__(n_batches, tap)
        self.path, self.asked = path, 0

    def outputs(self, batch: int) -> dict[str, torch.Tensor]:
        self.asked += 1
        return super().outputs(batch)


def test_iekd_autoencoder_is_trained_once_per_process_and_the_same_either_way(
    teacher: ZooModel, cpu: Runtime, tmp_path: Any
) -> None:
    """A second IE-KD candidate on the same teacher cache, rows and seed reuses the trained
    auto-encoder; what it gets equals training afresh (its init is seeded, not left to what was
    built before it)."""
    first = make_distiller(teacher, "single", "ce", "iekd", **{"feature_loss.ae_epochs": 2})
    source = _CacheFile(2, teacher.last_stage.name, str(tmp_path / "a.pt"))
    first.prepare(source, _Passes(2), cpu)
    assert source.asked == 4  # 2 epochs x 2 batches
    torch.manual_seed(123)  # a different RNG state before the second build
    second = make_distiller(
        teacher, "single", "ce", "iekd", **{"feature_loss.ae_epochs": 2, "train.lr": 0.2}
    )
    second.parts["feature"].prepare(source, _Passes(2), cpu)
    assert source.asked == 4  # reused: not one batch more
    fresh = make_distiller(teacher, "single", "ce", "iekd", **{"feature_loss.ae_epochs": 2})
    torch.manual_seed(7)
    other = _CacheFile(2, teacher.last_stage.name, str(tmp_path / "b.pt"))  # another cache
    fresh.prepare(other, _Passes(2), cpu)
    assert other.asked == 4
    for a, b, c in zip(
        first.parts["feature"].teacher_encoder.state_dict().values(),
        second.parts["feature"].teacher_encoder.state_dict().values(),
        fresh.parts["feature"].teacher_encoder.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_hint_adapter_is_training_only(teacher: ZooModel) -> None:
    from autosplit.distill import student_flops

    plain = make_distiller(teacher, "single", "ce")
    hinted = make_distiller(teacher, "single", "ce", "hint")
    assert student_flops(plain.student, INPUT_SHAPE) == student_flops(hinted.student, INPUT_SHAPE)
    run = step(hinted, teacher)
    tap = hinted.parts["feature"].teacher_tap
    assert run["outputs"]["hint_feat"].shape == run["taps"][tap].shape
    assert torch.allclose(
        run["losses"]["loss_hint"],
        100.0 * F.mse_loss(run["outputs"]["hint_feat"], run["taps"][tap]),
    )


def test_refused_combination(teacher: ZooModel) -> None:
    with pytest.raises(UserError, match="parallel"):
        make_distiller(teacher, "res_chain", "aekt", **{"logit_loss.layout": "parallel"})


# --- recipes and schedule ---------------------------------------------------------------------


def test_recipes_have_the_papers_defaults() -> None:
    assert set(METHODS) == {"ce", "kd", "dkd", "fitnets", "rkd", "reskd", "iekd", "era", "aekt"}
    base = make_candidate(logit="dkd", **{"logit_loss.beta": 2.0})
    dkd = recipe_candidate("dkd", base)
    assert dkd.logit_loss.get("beta") == 8.0 and dkd.logit_loss.get("warmup_epochs") == 20
    assert recipe_candidate("kd", base).logit_loss.as_dict() == {
        "ce_weight": 0.1,
        "kd_weight": 0.9,
        "temperature": 4.0,
    }
    assert recipe_candidate("fitnets", base).feature_loss.get("weight") == 100.0
    era = recipe_candidate("era", base)
    assert era.twi and era.structure.get("n_parts") == 4 and era.structure.get("lambda_f") == 5.0
    rkd = recipe_candidate("rkd", make_candidate().with_values({"split.base_width": None}))
    assert rkd.structure.name == "assistant" and rkd.schedule == "staged"
    assert rkd.split.base_share < 1.0
    assert recipe_candidate("ce", rkd).structure.name == "single"  # part widths dropped
    assert recipe_candidate("iekd", base).feature_loss.get("ratio") == 0.5
    with pytest.raises(UserError, match="unknown method"):
        recipe_candidate("nope", base)


@pytest.mark.parametrize(
    ("data", "weights"),
    [
        ({"data.name": "digits"}, (0.9, 1.0, 4.0)),
        ({"data.name": "cifar100"}, (0.9, 1.0, 4.0)),
        ({"data.name": "fashion-mnist"}, (0.9, 1.0, 4.0)),
        ({"data.name": "imagefolder:/data/tiny", "data.image_size": 64}, (0.9, 1.0, 4.0)),
        ({"data.name": "imagefolder:/data/imagenet", "data.image_size": 224}, (1.0, 2.0, 1.0)),
    ],
)
def test_era_recipe_uses_eras_own_kd_base_for_the_data(
    teacher: ZooModel, data: dict, weights: tuple[float, float, float]
) -> None:
    """ERA's code: CE 0.9 / KD 1.0 at tau 4 on CIFAR-like data, CE 1 / KD 2 at tau 1 on
    ImageNet; not Hinton's 0.1 / 0.9. The loss the distiller computes carries them."""
    base = make_candidate(**{"logit_loss.ce_weight": 0.1, "logit_loss.temperature": 2.0, **data})
    era = recipe_candidate("era", base)
    ce, kd, tau = weights
    assert era.logit_loss.name == "kd" and era.logit_loss.as_dict() == {
        "ce_weight": ce,
        "kd_weight": kd,
        "temperature": tau,
    }
    if data["data.name"] != "digits":
        return  # the tiny teacher is for digits-shaped input
    torch.manual_seed(0)
    distiller = build_distiller(
        era, teacher=teacher, num_classes=CLASSES, in_channels=1, input_shape=INPUT_SHAPE
    )
    run = step(distiller, teacher)
    out, losses, labels = run["outputs"], run["losses"], run["labels"]
    logits_teacher = run["taps"]["logits"]
    assert torch.allclose(losses["loss_ce"], ce * F.cross_entropy(out["logits"], labels))
    assert torch.allclose(
        losses["loss_kd"], kd * kd_loss(out["logits"], logits_teacher, temperature=tau)
    )
    proj_ce = F.cross_entropy(out["proj_logits"], labels)
    assert torch.allclose(losses["loss_era_proj_ce"], ce * proj_ce)


def test_epochs_split_evenly() -> None:
    assert split_epochs(7, 3) == [3, 2, 2] and split_epochs(4, 2) == [2, 2]
    with pytest.raises(UserError, match="train.epochs"):
        split_epochs(2, 3)
    cfg = stage_config(
        TrainConfig(epochs=240, schedule="multistep", milestones=(150, 180, 210), warmup_epochs=5),
        80,
    )
    assert cfg.epochs == 80 and cfg.milestones == (50, 60, 70) and cfg.warmup_epochs == 5


# --- real training on digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_teacher(digits_splits: Splits, cpu: Runtime) -> ZooModel:
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=CLASSES, in_channels=1, width=1.5)
    info = digits_splits.info
    train = TensorLoader(digits_splits.train, info, batch_size=64, shuffle=True, augment=False)
    val = TensorLoader(digits_splits.val, info, batch_size=512, shuffle=False, augment=False)
    fit(Classifier(model), train, val, TrainConfig(epochs=4, batch_size=64), cpu, progress=False)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize(
    ("structure", "schedule", "stage_epochs", "epochs", "per_stage"),
    [
        ("single", "joint", "full", 2, [2]),
        ("res_chain", "joint", "full", 2, [2]),
        # The papers' procedure: every stage trains the whole schedule (3 stages x 2 epochs).
        ("res_chain", "staged", "full", 2, [2, 2, 2]),
        # Equal training cost: the epochs shared over the stages.
        ("res_chain", "staged", "shared", 3, [1, 1, 1]),
    ],
)
def test_train_candidate_on_digits(
    trained_teacher: ZooModel,
    digits_splits: Splits,
    cpu: Runtime,
    structure: str,
    schedule: str,
    stage_epochs: str,
    epochs: int,
    per_stage: list[int],
) -> None:
    candidate = make_candidate(
        structure,
        "kd",
        schedule=schedule,
        **{"train.epochs": epochs, "train.lr": 0.1, "train.stage_epochs": stage_epochs},
    )
    seen: list[int] = []
    result = train_candidate(
        candidate,
        digits_splits,
        trained_teacher,
        cpu,
        progress=False,
        on_epoch_end=lambda stats: seen.append(stats.epoch),
    )
    total = sum(per_stage)
    assert result.val_acc > 30.0  # chance is 10%
    assert seen == list(range(1, total + 1)) == [h.epoch for h in result.history]
    assert result.flops.worst_case > 0 and result.params > 0 and result.seconds > 0
    assert [e for _, e in result.stages] == per_stage
    # Training cost: every epoch of every stage sees the training rows the loader keeps.
    rows = len(digits_splits.train)
    rows -= round(0.1 * rows) if structure == "res_chain" else 0  # held out to calibrate
    per_epoch = rows - rows % candidate.train.batch_size
    assert result.train_images == total * per_epoch
    assert result.train_flops == result.train_images * result.flops.worst_case
    assert result.train_cost == pytest.approx(total / epochs)
    if structure == "res_chain":
        assert result.exit is not None and result.expected_flops <= result.flops.worst_case
        assert result.student.exit_threshold == result.exit.threshold
        assert result.calibration is not None
        assert result.calibration.threshold == result.exit.threshold
        assert [name for name, _ in result.stages] == (
            ["base", "part1", "part2"] if schedule == "staged" else ["joint"]
        )
    else:
        assert result.exit is None and result.expected_flops == result.flops.worst_case


class _RowsSeen(LiveTeacher):
    """The live teacher, noting every training row it is asked about."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rows: set[int] = set()

    def outputs(self, batch: Any) -> dict[str, torch.Tensor]:
        self.rows.update(batch.indices.tolist())
        return super().outputs(batch)


@pytest.mark.parametrize("rule", [{}, {"exit_flops_share": 0.8}])
def test_exit_gate_is_calibrated_on_held_out_training_rows_and_measured_on_val(
    trained_teacher: ZooModel, digits_splits: Splits, cpu: Runtime, rule: dict[str, float]
) -> None:
    """theta comes from the first 10 % of the training rows (class-interleaved, so every class
    is there in proportion), which training never sees; the reported accuracy and expected FLOPs
    are the gate's on validation at that theta."""
    candidate = make_candidate(
        "res_chain",
        "kd",
        structure_params={"n_parts": 2, **rule},
        **{"train.epochs": 2, "train.lr": 0.1},
    )
    source = _RowsSeen(trained_teacher, ["logits"], cpu)
    result = train_candidate(
        candidate, digits_splits, trained_teacher, cpu, teacher_source=source, progress=False
    )
    n = len(digits_splits.train)
    cut = round(0.1 * n)
    assert source.rows and min(source.rows) == cut  # the calibration rows never trained

    student, flops = result.student, result.flops
    tail = Split(digits_splits.train.images[:cut], digits_splits.train.labels[:cut])
    on_tail = exit_profile(student, eval_loader(tail, digits_splits.info), cpu)
    on_val = exit_profile(student, eval_loader(digits_splits.val, digits_splits.info), cpu)
    choices = [measure_exit(on_tail, flops, t) for t in candidate_thresholds(on_tail)]
    chosen = result.calibration
    assert chosen is not None and chosen.threshold == result.exit.threshold
    assert chosen == measure_exit(on_tail, flops, chosen.threshold)  # measured on the tail
    if rule:  # the most accurate theta within the expected-FLOPs target, on the tail
        within = [c for c in choices if c.expected_flops <= 0.8 * flops.worst_case]
        assert chosen.expected_flops <= 0.8 * flops.worst_case
        assert chosen.accuracy == max(c.accuracy for c in within)
    else:  # the cheapest theta within 0.1 points of the whole chain, on the tail
        whole = measure_exit(on_tail, flops, None).accuracy
        near = [c for c in choices if c.accuracy >= whole - 0.1]
        assert chosen.accuracy >= whole - 0.1
        assert chosen.expected_flops == min(c.expected_flops for c in near)
    # What the trial reports is validation's, at the calibrated theta.
    assert result.exit == measure_exit(on_val, flops, chosen.threshold)
    assert result.val_acc == result.exit.accuracy


def test_a_pinned_exit_threshold_trains_on_every_row(
    trained_teacher: ZooModel, digits_splits: Splits, cpu: Runtime
) -> None:
    candidate = make_candidate(
        "res_chain", "kd", structure_params={"n_parts": 1, "exit_threshold": 0.9}
    )
    source = _RowsSeen(trained_teacher, ["logits"], cpu)
    result = train_candidate(
        candidate, digits_splits, trained_teacher, cpu, teacher_source=source, progress=False
    )
    assert max(source.rows) == len(digits_splits.train) - 1
    assert result.calibration is None and result.exit.threshold == 0.9


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"calibration_share": 1.0}, "structure.calibration_share: must be in"),
        ({"exit_flops_share": 0.0}, "structure.exit_flops_share: must be in"),
        ({"exit_max_drop": -1.0}, "structure.exit_max_drop: must be >= 0"),
    ],
)
def test_exit_rule_values_are_checked(values: dict[str, float], message: str) -> None:
    from autosplit.distill.student import build_student

    with pytest.raises(UserError, match=message):
        build_student(
            make_candidate("res_chain", "kd", structure_params=values),
            num_classes=CLASSES,
            in_channels=1,
            input_shape=INPUT_SHAPE,
            teacher=create_model("tiny", num_classes=CLASSES, in_channels=1),
        )
