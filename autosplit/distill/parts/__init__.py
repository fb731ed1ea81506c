"""The loss parts of a recipe, one file each; importing this package registers them.

``LOGIT_LOSSES``: ce, kd, dkd, aekt. ``FEATURE_LOSSES``: none (in :mod:`autosplit.distill._base`),
hint, iekd. A structure's own loss (RKD, ResKD, ERA) lives in the structure's file and reads the
structure's ``Params``; TWI's CE term is the part a structure names as its ``twi_part``.
"""

from autosplit.distill._base import NoLoss
from autosplit.distill.parts.aekt import AEKT
from autosplit.distill.parts.ce import CrossEntropy
from autosplit.distill.parts.dkd import DKD
from autosplit.distill.parts.hint import Hint
from autosplit.distill.parts.iekd import IEKD
from autosplit.distill.parts.kd import KD
from autosplit.distill.parts.twi import TWI

__all__ = ["AEKT", "DKD", "IEKD", "KD", "TWI", "CrossEntropy", "Hint", "NoLoss"]
