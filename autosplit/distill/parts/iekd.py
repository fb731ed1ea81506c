"""IE-KD: part of the base's last map inherits the teacher's factor, the rest explores away."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autosplit.distill._base import Outputs, Part, PartContext, need_teacher
from autosplit.distill.losses import factor_distance
from autosplit.distill.registry import FEATURE_LOSSES
from autosplit.errors import UserError
from autosplit.modules import resize as resize_map
from autosplit.train import sgd, timed_images_per_second

if TYPE_CHECKING:
    from autosplit.device import Runtime
    from autosplit.train import TeacherSource

log = logging.getLogger(__name__)

# Teacher auto-encoders this process has trained, by what they were trained on (``_memo_key``):
# one depends only on the teacher's maps, the rows, the seed and its own settings, so every
# IE-KD trial of a search after the first reuses it instead of training 30 epochs again.
_TRAINED: dict[tuple[Any, ...], dict[str, Tensor]] = {}
_KEEP = 4


def coder(channels_in: int, channels_out: int) -> nn.Sequential:
    """IE-KD's coder, as its official code builds one (encoder and decoder alike): LeakyReLU(0.1),
    then three 3x3 conv (no bias) + BN + LeakyReLU(0.1), in -> in -> out -> out. Convs start
    from N(0, 2 / (9 * out)), batch-norms from weight 1, bias 0."""
    widths = (channels_in, channels_in, channels_out, channels_out)
    # Not in place: the first activation reads a view of the base's or the teacher's map.
    layers: list[nn.Module] = [nn.LeakyReLU(0.1)]
    for c_in, c_out in zip(widths, widths[1:], strict=False):
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.1, inplace=True),
        ]
    return init_coder(nn.Sequential(*layers))


def init_coder(coder: nn.Module) -> nn.Module:
    """(Re)set a coder's weights as the official code starts them: each conv N(0, 2 / (9 * out)),
    each batch-norm weight 1, bias 0 and fresh running statistics."""
    for module in coder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / (9 * module.out_channels)))
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
            module.reset_running_stats()
    return coder


def autoencoder_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.SGD:
    """The official code's optimiser for the teacher auto-encoder: SGD, momentum 0.9, Nesterov,
    weight decay 5e-4, a constant learning rate."""
    return sgd(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def autoencoder_step(coders: nn.Module, optimizer: torch.optim.Optimizer, maps: Tensor) -> Tensor:
    """One step of the teacher auto-encoder: L1 reconstruction (mean |x - x_hat|) of ``maps``."""
    loss = F.l1_loss(coders(maps), maps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@FEATURE_LOSSES.register("iekd")
class IEKD(Part):
    """Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration
    Framework", CVPR, 2021.

    Matches the teacher's factor (its last map through a frozen auto-encoder's encoder) with the
    inheriting channels of the base's last map and pushes the exploring channels away from it:
    ``lambda_inherit * D(enc_I(F_I), enc_T(F_T)) - lambda_explore * D(enc_E(F_E), enc_T(F_T))``
    with ``D`` the mean |difference| of per-sample L2-normalised factors. F_I = the first
    ``round(ratio * C)`` channels (ratio 0.5 in the paper). Encoders are training-only.

    As the official code (github.com/aliyun/Revisiting-Knowledge-Distillation-an-Inheritance-
    and-Exploration-Framework) does it: the coders are its layers (``coder``); the teacher
    auto-encoder (factor channels ``factor_ratio * C_t``, 0.5 there) is pre-trained in
    ``prepare`` with L1 reconstruction for ``ae_epochs`` (30) epochs of SGD at ``ae_lr`` (0.1,
    constant; ``autoencoder_optimizer``), then frozen; the inherit and explore weights are its
    config's 1 and 1 (``config/ie_kd.yaml``). D is small (each factor has unit norm), so a search
    may want larger weights (factor transfer, its parent, uses 500): search them on a log scale.
    """

    @dataclass(frozen=True)
    class Params:
        ratio: float = 0.5
        lambda_inherit: float = 1.0
        lambda_explore: float = 1.0
        factor_ratio: float = 0.5
        ae_epochs: int = 30  # auto-encoder pre-training epochs over the train split
        ae_lr: float = 0.1

        def validate(self, path: str = "feature_loss") -> None:
            if self.ae_epochs < 0:
                raise UserError(f"{path}.ae_epochs: must be >= 0, got {self.ae_epochs}")
            if not self.ae_lr > 0:
                raise UserError(f"{path}.ae_lr: must be > 0, got {self.ae_lr}")

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.student_tap, self.teacher_tap = ctx.base_stages[-1], ctx.teacher_stages[-1]
        channels = ctx.base_shapes[self.student_tap][0]
        channels_teacher, *self.size = ctx.teacher_shapes[self.teacher_tap]
        if channels < 2 or not 0.0 < params.ratio < 1.0:
            raise UserError(
                f"feature_loss.ratio: splitting {channels} channels needs >= 2 "
                f"channels and a ratio in (0, 1), got {params.ratio}"
            )
        self.n_inherit = min(max(round(params.ratio * channels), 1), channels - 1)
        factor = max(1, round(params.factor_ratio * channels_teacher))
        self.encode_inherit = coder(self.n_inherit, factor)
        self.encode_explore = coder(channels - self.n_inherit, factor)
        self.teacher_encoder = coder(channels_teacher, factor)
        self.teacher_decoder = coder(factor, channels_teacher)
        for p in [*self.teacher_encoder.parameters(), *self.teacher_decoder.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({self.teacher_tap})

    def extend(self, outputs: Outputs) -> None:
        feat = outputs["base_taps"][self.student_tap]  # (B, C, H, W)
        feat = resize_map(feat, tuple(self.size))  # (B, C, H_t, W_t)
        outputs["iekd_inherit"] = self.encode_inherit(feat[:, : self.n_inherit])  # (B, k, H_t, W_t)
        outputs["iekd_explore"] = self.encode_explore(feat[:, self.n_inherit :])

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        feat_teacher = need_teacher(teacher_outputs, self.teacher_tap, "iekd")  # (B, C_t, H_t, W_t)
        with torch.no_grad():
            factor_teacher = self.teacher_encoder(feat_teacher)  # (B, k, H_t, W_t)
        inherit = factor_distance(outputs["iekd_inherit"], factor_teacher)
        explore = factor_distance(outputs["iekd_explore"], factor_teacher)
        return {
            "loss_iekd_inherit": self.params.lambda_inherit * inherit,
            # the minus: exploring channels are rewarded for differing from the teacher's factor
            "loss_iekd_explore": -self.params.lambda_explore * explore,
        }

    def term_stages(self) -> dict[str, int]:
        return {"loss_iekd_inherit": 0, "loss_iekd_explore": 0}

    @property
    def prepare_passes(self) -> int:
        return self.params.ae_epochs

    def prepare(
        self, teacher_source: TeacherSource, train_loader: Iterable[Any], runtime: Runtime
    ) -> int:
        """Pre-train the teacher auto-encoder with L1 reconstruction, then freeze it.

        ``ae_epochs`` passes over ``train_loader``; the teacher's maps come from
        ``teacher_source`` (the teacher cache when there is one: no teacher forward, cheap).
        Returns the images it trained over (0 when reused).
        """
        if bool(self.prepared):
            return 0
        coders = nn.Sequential(self.teacher_encoder, self.teacher_decoder)
        key = self._memo_key(teacher_source, train_loader)
        if key is not None and key in _TRAINED:
            coders.load_state_dict(_TRAINED[key])
            coders.eval()
            self.prepared.fill_(True)
            log.info("iekd: teacher auto-encoder reused (trained earlier in this process)")
            return 0
        seed = getattr(train_loader, "seed", 0)
        # Its own seed, whatever was built before it: reused or trained afresh, it is the same.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_coder(coders)
        params = list(coders.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = autoencoder_optimizer(params, self.params.ae_lr)
        coders.train()
        loss = torch.zeros(())
        images = 0
        try:
            for epoch in range(self.params.ae_epochs):
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(epoch)
                for batch in train_loader:
                    feat_teacher = teacher_source.outputs(batch)[self.teacher_tap].float()
                    images += feat_teacher.shape[0]
                    loss = autoencoder_step(coders, optimizer, feat_teacher)
        finally:
            for p in params:
                p.requires_grad_(False)
            coders.eval()
        self.prepared.fill_(True)
        if key is not None:
            while len(_TRAINED) >= _KEEP:
                _TRAINED.pop(next(iter(_TRAINED)))
            _TRAINED[key] = {k: v.detach().clone() for k, v in coders.state_dict().items()}
        log.info(
            "iekd: teacher auto-encoder pre-trained for %d epochs, last L1 %.4f",
            self.params.ae_epochs,
            float(loss.detach()),
        )
        return images

    def prepare_seconds_per_image(self, runtime: Runtime, batch_size: int) -> float:
        """The auto-encoder's training step (L1 reconstruction, its SGD) timed here on a copy,
        over random maps of the teacher tap's shape, as ``prepare`` runs it on cached maps."""
        if not self.params.ae_epochs:
            return 0.0
        coders = copy.deepcopy(nn.Sequential(self.teacher_encoder, self.teacher_decoder))
        coders = coders.to(runtime.device).train()
        params = list(coders.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = autoencoder_optimizer(params, self.params.ae_lr)
        channels = self.teacher_encoder[1].in_channels
        generator = torch.Generator().manual_seed(0)
        maps = torch.randn(batch_size, channels, *self.size, generator=generator)
        maps = maps.to(runtime.device)

        return 1.0 / timed_images_per_second(
            lambda: autoencoder_step(coders, optimizer, maps), batch_size, runtime, max_seconds=1.0
        )

    def _memo_key(self, teacher_source: Any, train_loader: Any) -> tuple[Any, ...] | None:
        """What the trained auto-encoder depends on; None (train it every time) for a teacher
        source that is not a cache file (a live teacher)."""
        path = getattr(teacher_source, "path", None)
        if path is None:
            return None
        p = self.params
        return (
            str(path),
            self.teacher_tap,
            tuple(self.teacher_encoder[1].weight.shape),
            p.factor_ratio,
            p.ae_epochs,
            p.ae_lr,
            getattr(train_loader, "num_samples", None),
            getattr(train_loader, "first_row", 0),
            getattr(train_loader, "batch_size", None),
            getattr(train_loader, "seed", None),
            getattr(train_loader, "augment", None),
            getattr(train_loader, "n_views", None),
            getattr(train_loader, "drop_last", None),
        )
